// A synthetic artifact for the unit tests: a manifest like the exporter writes (1 layer, b = 2,
// proposals [1, 2], batch 2, 16 slots) over placeholder graph files, in a fresh temp folder.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "tidar/error.h"
#include "tidar/pyfmt.h"

namespace fixture {

using tidar::Json;

inline Json tensor(const std::string& name, const std::string& dtype, Json shape) {
  Json t = Json::object();
  t["name"] = name;
  t["dtype"] = dtype;
  t["shape"] = std::move(shape);
  return t;
}

inline Json kv(const std::string& prefix, const std::string& batch, Json len) {
  Json out = Json::array();
  for (const char* which : {"key", "value"})
    out.push_back(tensor(prefix + ".0." + which, "float32", Json::array({batch, "kv_heads", len, "head_dim"})));
  return out;
}

inline Json graph(const std::string& kind, Json inputs, Json outputs, const char* kv_update = nullptr) {
  Json g = Json::object();
  g["kind"] = kind;
  g["file"] = kind + ".onnx";
  g["inputs"] = std::move(inputs);
  g["outputs"] = std::move(outputs);
  g["engine"] = nullptr;
  g["engine_info"] = Json::object();
  g["bytes"] = 1;
  g["digest"] = nullptr;
  g["kv_update"] = kv_update ? Json(kv_update) : Json(nullptr);
  return g;
}

inline Json manifest() {
  Json m = Json::object();
  m["model"] = {{"arch", "qwen2"}, {"vocab_size", 32}, {"num_layers", 1}, {"num_heads", 2}, {"num_kv_heads", 1},
                {"head_dim", 4}, {"max_position_embeddings", 64}};
  m["block_size"] = 2;
  m["proposals"] = {1, 2};
  m["mask_token_id"] = 31;
  m["max_seq_len"] = 16;
  m["max_batch"] = 2;
  m["precision"] = "fp32";
  m["target"] = "ort";
  m["kv_update"] = "slice";
  Json prefill_out = Json::array({tensor("token_ids", "int64", {"prefill_batch", "block_size"}),
                                  tensor("logits", "float32", {"prefill_batch", "block_size", "vocab"})});
  Json step_out = Json::array({tensor("token_ids", "int64", {"batch", "n_out"}),
                               tensor("logits", "float32", {"batch", "n_out", "vocab"})});
  Json ar_out = Json::array({tensor("token_ids", "int64", {"batch", 1}), tensor("logits", "float32", {"batch", 1, "vocab"})});
  for (auto& t : kv("present", "prefill_batch", "prefill_len")) prefill_out.push_back(t);
  for (auto& t : kv("present", "batch", "q_len")) step_out.push_back(t);
  for (auto& t : kv("present", "batch", "max_seq_len")) ar_out.push_back(t);
  Json step_in = Json::array({tensor("draft_ids", "int64", {"batch", "block_size"}), tensor("cache_len", "int64", {"batch"})});
  Json ar_in = Json::array({tensor("input_ids", "int64", {"batch", 1}), tensor("cache_len", "int64", {"batch"})});
  for (auto& t : kv("past_key_values", "batch", "max_seq_len")) step_in.push_back(t), ar_in.push_back(t);
  m["graphs"] = Json::object();
  m["graphs"]["prefill"] = graph("prefill", Json::array({tensor("input_ids", "int64", {"prefill_batch", "prompt_len"})}),
                                 prefill_out);
  m["graphs"]["step"] = graph("step", step_in, step_out);
  m["graphs"]["ar_step"] = graph("ar_step", ar_in, ar_out, "inplace");
  m["dims"] = {{"batch", 2},    {"prefill_batch", nullptr}, {"prompt_len", nullptr}, {"prefill_len", nullptr},
               {"block_size", 2}, {"q_len", 6},           {"n_out", 4},            {"max_seq_len", 16},
               {"kv_heads", 1}, {"head_dim", 4},          {"vocab", 32},           {"num_layers", 1}};
  m["tokenizer"] = {{"file", nullptr}, {"bos_token_id", nullptr}, {"eos_token_id", 30}};
  m["versions"] = Json::object();
  m["weights"] = {{"file", "weights.bin"}, {"bytes", 3}, {"blake2b", nullptr}, {"sample_blake2b", nullptr}};
  m["tuning"] = Json::object();
  m["format"] = "tidar-manifest";
  m["version"] = 1;
  return m;
}

/// A fresh folder holding `m` as manifest.json and placeholder files (1-byte graphs, 3-byte weights).
inline std::string write(const Json& m) {
  char tmpl[] = "/tmp/tidar-cpp-test-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  for (const char* kind : {"prefill", "step", "ar_step"}) std::ofstream(dir + "/" + kind + ".onnx") << "x";
  std::ofstream(dir + "/weights.bin") << "abc";
  std::ofstream(dir + "/manifest.json") << m.dump(2);
  return dir;
}

/// The message of the Error `fn` throws ("" when it throws none).
template <typename F>
std::string error_of(F fn) {
  try {
    fn();
  } catch (const tidar::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace fixture
