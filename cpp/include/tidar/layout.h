// The contract's tables (runtime/contract.py): row layout of the graphs' outputs, binding names,
// dtypes and named shapes of each graph (graph_io) and what each output row predicts (graph_rows).
// A manifest records these; manifest.cpp checks that it records exactly these.
//
// A step's outputs, per batch row: n_out = b + R * (b - 1) rows,
//   [AR at draft 0 .. AR at draft b-1 | block r_1 slots 1..b-1 | block r_2 slots 1..b-1 | ...].
// The prefill's: b rows, [AR at the last prompt token | mask slots 1..b-1].
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <utility>
#include <vector>

namespace tidar {

inline constexpr const char* kPastPrefix = "past_key_values";
inline constexpr const char* kPresentPrefix = "present";

/// q_len of one decode step: b drafts plus b mask slots per proposal block.
inline int step_len(int block_size, const std::vector<int>& proposals) {
  return block_size * (1 + static_cast<int>(proposals.size()));
}

/// Output rows of the step graph.
inline int n_out(int block_size, const std::vector<int>& proposals) {
  return block_size + static_cast<int>(proposals.size()) * (block_size - 1);
}

/// Output row of slot 1 of proposal block r (slot t is at this row + t - 1); -1 if r is not a level.
inline int block_out_row(int block_size, const std::vector<int>& proposals, int r) {
  for (std::size_t i = 0; i < proposals.size(); ++i)
    if (proposals[i] == r) return block_size + static_cast<int>(i) * (block_size - 1);
  return -1;
}

/// KV binding names of every layer, key before value: "{prefix}.{i}.key", "{prefix}.{i}.value".
inline std::vector<std::string> kv_names(int num_layers, const std::string& prefix) {
  std::vector<std::string> names;
  for (int i = 0; i < num_layers; ++i)
    for (const char* kv : {"key", "value"}) names.push_back(prefix + "." + std::to_string(i) + "." + kv);
  return names;
}

inline std::vector<std::string> past_names(int num_layers) { return kv_names(num_layers, kPastPrefix); }
inline std::vector<std::string> present_names(int num_layers) { return kv_names(num_layers, kPresentPrefix); }

using Dim = std::variant<std::int64_t, std::string>;  // a static size, or the name of an entry of dims

struct TensorSpec {
  std::string name;   // binding name, e.g. "past_key_values.0.key"
  std::string dtype;  // numpy-style: "int64", "float32", "float16", "bfloat16", ...
  std::vector<Dim> shape;
};

/// What one output row predicts: {"ar": i} (AR after draft i) or {"block": r, "slot": t}.
struct Row {
  int ar = -1;  // >= 0: an AR row
  int block = -1, slot = -1;
};

/// The token-id input of graph `kind`: the step reads drafts, the others tokens.
inline std::string ids_input(const std::string& kind) { return kind == "step" ? "draft_ids" : "input_ids"; }

/// Bindings of graph `kind` (contract.py graph_io): inputs then outputs, with dtypes and named shapes.
/// kv_update: "slice" or "inplace" for the cached graphs, "" for the prefill.
inline std::pair<std::vector<TensorSpec>, std::vector<TensorSpec>> graph_io(const std::string& kind, int num_layers,
                                                                            const std::string& kv_dtype,
                                                                            const std::string& kv_update) {
  std::vector<TensorSpec> inputs, outputs;
  Dim rows, batch, present_len;
  if (kind == "prefill") {
    inputs.push_back({"input_ids", "int64", {Dim("prefill_batch"), Dim("prompt_len")}});
    rows = Dim("block_size"), batch = Dim("prefill_batch"), present_len = Dim("prefill_len");
  } else {
    const bool step = kind == "step";
    inputs.push_back({ids_input(kind), "int64", {Dim("batch"), step ? Dim("block_size") : Dim(std::int64_t{1})}});
    inputs.push_back({"cache_len", "int64", {Dim("batch")}});
    for (const auto& name : past_names(num_layers))
      inputs.push_back({name, kv_dtype, {Dim("batch"), Dim("kv_heads"), Dim("max_seq_len"), Dim("head_dim")}});
    rows = step ? Dim("n_out") : Dim(std::int64_t{1}), batch = Dim("batch");
    const Dim new_len = step ? Dim("q_len") : Dim(std::int64_t{1});
    present_len = kv_update == "slice" ? new_len : Dim("max_seq_len");
  }
  outputs.push_back({"token_ids", "int64", {batch, rows}});
  outputs.push_back({"logits", "float32", {batch, rows, Dim("vocab")}});
  for (const auto& name : present_names(num_layers))
    outputs.push_back({name, kv_dtype, {batch, Dim("kv_heads"), present_len, Dim("head_dim")}});
  return {inputs, outputs};
}

/// What each output row of graph `kind` predicts (contract.py graph_rows): the step's AR rows then
/// slots 1..b-1 of each proposal block; the prefill's AR row then mask slots 1..b-1 as block 0;
/// the AR step's one AR row.
inline std::vector<Row> graph_rows(const std::string& kind, int block_size, const std::vector<int>& proposals) {
  std::vector<Row> rows;
  if (kind == "step") {
    for (int i = 0; i < block_size; ++i) rows.push_back({i, -1, -1});
    for (int r : proposals)
      for (int t = 1; t < block_size; ++t) rows.push_back({-1, r, t});
  } else {
    rows.push_back({0, -1, -1});
    if (kind == "prefill")
      for (int t = 1; t < block_size; ++t) rows.push_back({-1, 0, t});
  }
  return rows;
}

}  // namespace tidar
