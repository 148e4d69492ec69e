// Manifest reading: the checks and the one-line messages of runtime/manifest.py.
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>

#include "fixture.h"
#include "tidar/blake2b.h"
#include "tidar/manifest.h"

namespace {

using fixture::error_of;
using tidar::Json;

std::string load_error(const Json& m) {
  const std::string dir = fixture::write(m);
  return error_of([&] { tidar::load_manifest(dir); });
}

/// The message after "<dir>/manifest.json: ".
std::string tail(const std::string& message) {
  auto at = message.find("manifest.json: ");
  return at == std::string::npos ? message : message.substr(at + 15);
}

TEST(Manifest, LoadsWhatTheExporterWrites) {
  const std::string dir = fixture::write(fixture::manifest());
  const tidar::Manifest m = tidar::load_manifest(dir);
  EXPECT_EQ(m.block_size, 2);
  EXPECT_EQ(m.proposals, (std::vector<int>{1, 2}));
  EXPECT_EQ(m.max_seq_len, 16);
  EXPECT_EQ(m.max_batch, 2);
  EXPECT_EQ(m.step_len, 6);
  EXPECT_EQ(m.n_out, 4);
  EXPECT_EQ(m.vocab_size, 32);
  EXPECT_EQ(m.mask_token_id, 31);
  EXPECT_EQ(m.ar_step, "gqa");
  EXPECT_EQ(m.eos_ids, (std::vector<std::int64_t>{30}));
  EXPECT_EQ(m.kv_update_of("step"), "slice");
  EXPECT_EQ(m.kv_update_of("ar_step"), "inplace");
  EXPECT_EQ(m.kv_update_of("prefill"), "");
  EXPECT_EQ(m.graphs.at("step").rows.size(), 4u);
  EXPECT_EQ(m.graphs.at("step").rows[2].block, 1);
  EXPECT_EQ(m.graphs.at("prefill").rows[1].block, 0);
  EXPECT_EQ(m.graph_order, (std::vector<std::string>{"prefill", "step", "ar_step"}));
}

TEST(Manifest, EosIsAnIdOrAList) {
  Json m = fixture::manifest();
  m["tokenizer"]["eos_token_id"] = {30, 2};
  EXPECT_EQ(tidar::load_manifest(fixture::write(m)).eos_ids, (std::vector<std::int64_t>{30, 2}));
  m["tokenizer"]["eos_token_id"] = nullptr;
  EXPECT_TRUE(tidar::load_manifest(fixture::write(m)).eos_ids.empty());
  m["tokenizer"]["eos_token_id"] = {30, 32};
  EXPECT_EQ(tail(load_error(m)), "malformed manifest (tokenizer.eos_token_id[1] must be an integer in 0..31, got 32)");
}

TEST(Manifest, AnotherVersionSaysReExport) {
  Json m = fixture::manifest();
  m["version"] = 1;
  EXPECT_EQ(tail(load_error(m)),
            "manifest version 1 is not supported by this runtime (it reads version 2): re-export the artifact with "
            "this version of tidar-export");
  m["version"] = 2.0;  // Python's == holds
  EXPECT_EQ(load_error(m), "");
  m["format"] = "other";
  EXPECT_EQ(tail(load_error(m)), "not a TiDAR manifest");
}

TEST(Manifest, MissingAndUnknownFields) {
  const std::vector<std::pair<std::function<void(Json&)>, std::string>> cases = {
      {[](Json& m) { m.erase("export"); }, "missing field 'export'"},
      {[](Json& m) { m["dims"].erase("batch"); }, "missing field 'dims.batch'"},
      {[](Json& m) { m["export"].erase("ar_step"); }, "missing field 'export.ar_step'"},
      {[](Json& m) { m["extra"] = 1; }, "unknown field 'extra'"},
      {[](Json& m) { m["dims"]["wat"] = 1; }, "unknown field dims.wat"},
      {[](Json& m) { m["graphs"]["step"]["wat"] = 1; }, "unknown field graphs.step.wat"},
  };
  for (const auto& [edit, want] : cases) {
    Json m = fixture::manifest();
    edit(m);
    EXPECT_EQ(tail(load_error(m)), "malformed manifest (" + want + ")");
  }
}

TEST(Manifest, BoundsAndTypes) {
  struct Case {
    std::string section, key;
    Json value;
    std::string want;
  };
  const std::vector<Case> cases = {
      {"dims", "block_size", 0, "dims.block_size must be an integer in 1..1024, got 0"},
      {"dims", "batch", true, "dims.batch must be an integer in 1..4096, got True"},
      {"dims", "batch", 2.0, "dims.batch must be an integer in 1..4096, got 2.0"},
      {"dims", "prompt_len", 3, "dims.prompt_len must be null (a dynamic dim), got 3"},
      {"dims", "n_out", 5, "dims.n_out must be 4 (block_size 2, proposals [1, 2]), got 5"},
      {"dims", "q_len", 7, "dims.q_len must be 6 (block_size 2, proposals [1, 2]), got 7"},
      {"dims", "max_seq_len", 6, "dims.max_seq_len must be at least q_len + 1 = 7, got 6"},
      {"dims", "max_seq_len", 65, "dims.max_seq_len must be at most the model's max_position_embeddings 64, got 65"},
      {"dims", "kv_heads", 3, "dims.kv_heads must be a divisor of num_heads 2, got 3"},
      {"export", "proposals", {2}, "export.proposals must be ascending distinct integers in 1..2 starting with 1, got [2]"},
      {"export", "proposals", {1, 1},
       "export.proposals must be ascending distinct integers in 1..2 starting with 1, got [1, 1]"},
      {"export", "mask_token_id", 32, "export.mask_token_id must be an integer in 0..31, got 32"},
      {"export", "precision", "fp64",
       "export.precision must be one of fp32, fp16, bf16, int8, fp8, int4, int8-wo, got 'fp64'"},
      {"export", "ar_step", "x", "export.ar_step must be one of gqa, attention, got 'x'"},
      {"model", "head_dim", 1, "model.head_dim must be an integer in 2..1024, got 1"},
      {"tokenizer", "blake2b", 1, "tokenizer.blake2b must be a non-empty string, got 1"},
  };
  for (const auto& c : cases) {
    Json m = fixture::manifest();
    m[c.section][c.key] = c.value;
    EXPECT_EQ(tail(load_error(m)), "malformed manifest (" + c.want + ")") << c.section << "." << c.key;
  }
  Json m = fixture::manifest();
  m["adapter"] = Json::array();
  EXPECT_EQ(tail(load_error(m)), "malformed manifest (adapter must be an object, got [])");
}

TEST(Manifest, KvUpdatePerGraph) {
  Json m = fixture::manifest();
  m["graphs"]["step"]["kv_update"] = "copy";
  EXPECT_EQ(tail(load_error(m)), "malformed manifest (graphs.step.kv_update must be one of slice, inplace, got 'copy')");
  m["graphs"]["step"]["kv_update"] = nullptr;
  EXPECT_EQ(tail(load_error(m)), "malformed manifest (graphs.step.kv_update must be one of slice, inplace, got None)");
  m = fixture::manifest();
  m["graphs"]["prefill"]["kv_update"] = "slice";
  EXPECT_EQ(tail(load_error(m)),
            "malformed manifest (graphs.prefill.kv_update must be null (the prefill graph has no cache input), got "
            "'slice')");
  m = fixture::manifest();  // an inplace step returns the whole cache
  m["graphs"]["step"]["kv_update"] = "inplace";
  EXPECT_EQ(tail(load_error(m)),
            "malformed manifest (graphs.step.outputs[2] (present.0.key) shape and dtype must be float32 ['batch', "
            "'kv_heads', 'max_seq_len', 'head_dim'], got ['float32', ['batch', 'kv_heads', 'q_len', 'head_dim']])");
  for (auto& t : m["graphs"]["step"]["outputs"])
    if (t["name"].get<std::string>().rfind("present.", 0) == 0) t["shape"][2] = "max_seq_len";
  EXPECT_EQ(tidar::load_manifest(fixture::write(m)).kv_update_of("step"), "inplace");
}

TEST(Manifest, RowsAndBindingsAreTheContracts) {
  Json m = fixture::manifest();
  m["graphs"]["step"]["rows"].erase(3);
  EXPECT_EQ(tail(load_error(m)),
            "malformed manifest (graphs.step.rows must be the contract's rows [{\"ar\": 0}, {\"ar\": 1}, {\"block\": 1, "
            "\"slot\": 1}, {\"block\": 2, \"slot\": 1}], got [{'ar': 0}, {'ar': 1}, {'block': 1, 'slot': 1}])");
  m = fixture::manifest();
  m["graphs"]["ar_step"]["rows"][0]["ar"] = true;  // Python: True == 1, not 0
  EXPECT_EQ(tail(load_error(m)),
            "malformed manifest (graphs.ar_step.rows must be the contract's rows [{\"ar\": 0}], got [{'ar': True}])");
  m = fixture::manifest();
  m["graphs"]["step"]["rows"][2] = {{"slot", 1}, {"block", 1.0}};  // Python's ==: key order and 1.0 do not matter
  EXPECT_EQ(load_error(m), "");
  m = fixture::manifest();
  m["graphs"]["step"]["inputs"].erase(0);
  EXPECT_EQ(tail(load_error(m)), "malformed manifest (graphs.step.inputs lacks the binding 'draft_ids')");
  m = fixture::manifest();
  m["graphs"]["step"]["outputs"].push_back(fixture::tensor("present.1.key", "float32", {1}));
  EXPECT_EQ(tail(load_error(m)),
            "malformed manifest (graphs.step.outputs has 'present.1.key', which a 1-layer model does not have)");
  m = fixture::manifest();
  m["graphs"]["step"]["outputs"].push_back(fixture::tensor("extra", "float32", {1}));
  EXPECT_EQ(tail(load_error(m)),
            "malformed manifest (graphs.step.outputs must be the 4 bindings of the contract, got ['token_ids', "
            "'logits', 'present.0.key', 'present.0.value', )");
  m = fixture::manifest();
  m["graphs"]["step"]["inputs"][0]["shape"] = {"batch", "nope"};
  EXPECT_EQ(tail(load_error(m)),
            "malformed manifest (graphs.step.inputs[0] (draft_ids) shape and dtype must be int64 ['batch', "
            "'block_size'], got ['int64', ['batch', 'nope']])");
  m = fixture::manifest();
  m["graphs"]["step"]["inputs"][0]["dtype"] = "float64";
  EXPECT_EQ(tail(load_error(m)),
            "malformed manifest (graphs.step.inputs[0].dtype must be one of float32, float16, bfloat16, int64, int32, "
            "int8, uint8, bool, float8e4m3fn, got 'float64')");
  m = fixture::manifest();
  for (auto& g : m["graphs"])
    for (auto& t : g["outputs"])
      if (t["name"].get<std::string>().rfind("present.", 0) == 0) t["dtype"] = "int8";
  EXPECT_EQ(tail(load_error(m)),
            "malformed manifest (graphs.prefill.outputs present.0.key dtype must be one of float32, float16, bfloat16, "
            "got 'int8')");
}

TEST(Manifest, FileNamesStayInTheArtifact) {
  Json m = fixture::manifest();
  m["graphs"]["step"]["file"] = "../step.onnx";
  EXPECT_EQ(tail(load_error(m)), "graphs.step.file: '../step.onnx' points outside its folder (absolute or '..'): refused");
  m["graphs"]["step"]["file"] = "/etc/passwd";
  EXPECT_EQ(tail(load_error(m)), "graphs.step.file: '/etc/passwd' points outside its folder (absolute or '..'): refused");
  m["graphs"]["step"]["file"] = "a:b";
  EXPECT_EQ(tail(load_error(m)), "graphs.step.file: 'a:b' is not a plain file name");
  // a symlink out of the folder
  m = fixture::manifest();
  m["graphs"]["step"]["file"] = "link.onnx";
  const std::string dir = fixture::write(m);
  std::filesystem::create_symlink("/etc/hostname", dir + "/link.onnx");
  EXPECT_EQ(tail(error_of([&] { tidar::load_manifest(dir); })),
            "step file: 'link.onnx' resolves outside " + dir + " (a symlink): refused");
}

TEST(Manifest, FilesSizesAndDigests) {
  Json m = fixture::manifest();
  std::string dir = fixture::write(m);
  std::filesystem::remove(dir + "/ar_step.onnx");
  EXPECT_EQ(error_of([&] { tidar::load_manifest(dir); }), dir + ": ar_step file ar_step.onnx named by the manifest is missing");
  m["graphs"]["step"]["bytes"] = 5;
  dir = fixture::write(m);
  EXPECT_EQ(error_of([&] { tidar::load_manifest(dir); }),
            dir + ": step.onnx has 1 bytes, the manifest says 5 (truncated or modified after export)");
  m = fixture::manifest();
  m["graphs"]["step"]["digest"] = "00";
  dir = fixture::write(m);
  EXPECT_EQ(error_of([&] { tidar::load_manifest(dir); }),
            dir + ": step.onnx does not match its digest in the manifest (corrupt or modified after export)");
  EXPECT_EQ(error_of([&] { tidar::load_manifest(dir, tidar::Verify::none); }), "");
  m["graphs"]["step"]["digest"] = tidar::file_digest(dir + "/step.onnx");
  m["weights"]["sample_blake2b"] = tidar::sample_digest(dir + "/weights.bin");
  m["weights"]["blake2b"] = "ff";
  dir = fixture::write(m);
  EXPECT_EQ(error_of([&] { tidar::load_manifest(dir); }), "");  // quick: the whole-file digest is not read
  EXPECT_EQ(error_of([&] { tidar::load_manifest(dir, tidar::Verify::full); }),
            dir + ": weights.bin does not match its digest in the manifest (corrupt or modified after export)");
}

TEST(Manifest, TokenizerAndChatTemplateDigests) {
  Json m = fixture::manifest();
  m["tokenizer"]["file"] = "tokenizer.json";
  m["tokenizer"]["chat_template"] = "chat_template.jinja";
  const std::string dir = fixture::write(m);
  std::ofstream(dir + "/tokenizer.json") << "{}";
  std::ofstream(dir + "/chat_template.jinja") << "{{ messages }}";
  m["tokenizer"]["blake2b"] = tidar::file_digest(dir + "/tokenizer.json");
  m["tokenizer"]["chat_template_blake2b"] = tidar::file_digest(dir + "/chat_template.jinja");
  std::ofstream(dir + "/manifest.json") << m.dump(2);
  EXPECT_EQ(error_of([&] { tidar::load_manifest(dir); }), "");
  std::ofstream(dir + "/chat_template.jinja") << "{{ other }}";
  EXPECT_EQ(error_of([&] { tidar::load_manifest(dir); }),
            dir + ": chat_template.jinja does not match its digest in the manifest (replaced or modified after export)");
  EXPECT_EQ(error_of([&] { tidar::load_manifest(dir, tidar::Verify::none); }), "");
  m["tokenizer"]["chat_template"] = "../t.jinja";
  EXPECT_EQ(tail(load_error(m)), "tokenizer.chat_template: '../t.jinja' points outside its folder (absolute or '..'): refused");
}

TEST(Manifest, NotAnArtifact) {
  EXPECT_EQ(error_of([] { tidar::load_manifest("/nonexistent/x/"); }), "artifact directory not found: /nonexistent/x");
  const std::string dir = fixture::write(fixture::manifest());
  std::filesystem::remove(dir + "/manifest.json");
  EXPECT_EQ(error_of([&] { tidar::load_manifest(dir); }),
            dir + ": no manifest.json (not an artifact, or an interrupted export)");
  std::ofstream(dir + "/manifest.json") << "{\"a\": [1,";
  EXPECT_NE(error_of([&] { tidar::load_manifest(dir); }).find("manifest.json: invalid JSON ("), std::string::npos);
  std::ofstream(dir + "/manifest.json") << std::string(40, '[') + std::string(40, ']');
  EXPECT_EQ(tail(error_of([&] { tidar::load_manifest(dir); })), "invalid JSON (nested more than 32 levels)");
}

}  // namespace
