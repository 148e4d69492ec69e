// Manifest reading: the checks and the one-line messages of runtime/manifest.py.
#include <gtest/gtest.h>

#include <filesystem>

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
  EXPECT_EQ(m.model.vocab_size, 32);
  EXPECT_EQ(*m.eos_token_id, 30);
  EXPECT_EQ(m.kv_update_of("step"), "slice");
  EXPECT_EQ(m.kv_update_of("ar_step"), "inplace");
  EXPECT_EQ(m.kv_update_of("prefill"), "");
  EXPECT_EQ(m.graph_order, (std::vector<std::string>{"prefill", "step", "ar_step"}));
}

TEST(Manifest, UnknownVersionSaysReExport) {
  Json m = fixture::manifest();
  m["version"] = 2;
  EXPECT_EQ(tail(load_error(m)),
            "manifest version 2 is not supported by this runtime (it reads version 1); re-export the artifact or "
            "upgrade tidar-export");
  m["format"] = "other";
  EXPECT_EQ(tail(load_error(m)), "not a TiDAR manifest");
}

TEST(Manifest, MissingAndUnknownFields) {
  Json m = fixture::manifest();
  m.erase("max_batch");
  EXPECT_EQ(tail(load_error(m)), "malformed manifest (missing field 'max_batch')");
  m = fixture::manifest();
  m["extra"] = 1;
  EXPECT_EQ(tail(load_error(m)), "malformed manifest (unknown field 'extra')");
  m = fixture::manifest();
  m["graphs"]["step"]["wat"] = 1;
  EXPECT_EQ(tail(load_error(m)), "malformed manifest (unknown field graphs.step.wat)");
}

TEST(Manifest, BoundsAndTypes) {
  struct Case {
    std::string key;
    Json value;
    std::string want;
  };
  const std::vector<Case> cases = {
      {"block_size", 0, "malformed manifest (block_size must be an integer in 1..1024, got 0)"},
      {"block_size", true, "malformed manifest (block_size must be an integer in 1..1024, got True)"},
      {"max_batch", 2.0, "malformed manifest (max_batch must be an integer in 1..4096, got 2.0)"},
      {"proposals", {2}, "malformed manifest (proposals must be ascending distinct integers in 1..2 starting with 1, got [2])"},
      {"proposals", {1, 1}, "malformed manifest (proposals must be ascending distinct integers in 1..2 starting with 1, got [1, 1])"},
      {"max_seq_len", 6, "malformed manifest (max_seq_len must be an integer in 7..64, got 6)"},
      {"mask_token_id", 32, "malformed manifest (mask_token_id must be an integer in 0..31, got 32)"},
      {"precision", "fp64", "malformed manifest (precision must be one of fp32, fp16, bf16, int8, fp8, int4, int8-wo, got 'fp64')"},
      {"kv_update", "copy", "malformed manifest (kv_update must be one of slice, inplace, got 'copy')"},
      {"dims", Json::array(), "malformed manifest (dims must be an object, got [])"},
  };
  for (const auto& c : cases) {
    Json m = fixture::manifest();
    m[c.key] = c.value;
    EXPECT_EQ(tail(load_error(m)), c.want) << c.key;
  }
  Json m = fixture::manifest();
  m["model"]["num_kv_heads"] = 3;
  EXPECT_EQ(tail(load_error(m)), "malformed manifest (model.num_kv_heads must be a divisor of num_heads 2, got 3)");
  m = fixture::manifest();
  m["model"].erase("vocab_size");
  EXPECT_EQ(tail(load_error(m)), "malformed manifest (model.vocab_size must be an integer in 1..16777216, got None)");
}

TEST(Manifest, BindingsAndShapes) {
  Json m = fixture::manifest();
  m["graphs"]["step"]["inputs"].erase(0);
  EXPECT_EQ(tail(load_error(m)), "malformed manifest (graphs.step.inputs lacks the binding 'draft_ids')");
  m = fixture::manifest();
  m["graphs"]["step"]["outputs"].push_back(fixture::tensor("present.1.key", "float32", {1}));
  EXPECT_EQ(tail(load_error(m)),
            "malformed manifest (graphs.step.outputs has 'present.1.key', which a 1-layer model does not have)");
  m = fixture::manifest();
  m["graphs"]["step"]["inputs"][0]["shape"] = {"batch", "nope"};
  EXPECT_EQ(tail(load_error(m)), "malformed manifest (graphs.step.inputs[0].shape must be ints or names of dims, got 'nope')");
  m = fixture::manifest();
  m["graphs"]["step"]["inputs"][0]["dtype"] = "float64";
  EXPECT_NE(tail(load_error(m)).find("graphs.step.inputs[0].dtype must be one of int64"), std::string::npos);
  m = fixture::manifest();
  m["dims"]["max_seq_len"] = 15;
  EXPECT_EQ(tail(load_error(m)),
            "malformed manifest (graphs.step.inputs past_key_values.0.key shape must be [2, 1, 16, 4] (batch, kv heads, "
            "max_seq_len, head_dim), got [2, 1, 15, 4])");
  m = fixture::manifest();
  m["graphs"]["prefill"]["kv_update"] = "slice";
  EXPECT_EQ(tail(load_error(m)),
            "malformed manifest (graphs.prefill.kv_update must be absent (the prefill graph has no cache input), got 'slice')");
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
