// The contract a backend runs an artifact by, taken from its manifest alone: binding names, dtypes,
// buffer shapes, output rows, and how each cached graph writes the cache (its own kv_update).
// Nothing here is re-derived from a model; load_manifest has already checked that each graph's
// bindings and rows are the contract's (layout.h), so this only reads them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tidar/manifest.h"

namespace tidar {

/// One cached graph (step or ar_step) as a backend binds it.
struct CachedGraph {
  std::string kind;       // "step" | "ar_step"
  std::string file;       // ONNX file, relative to the artifact
  std::string ids_input;  // "draft_ids" (step) or "input_ids" (ar_step): [batch, width] int64
  std::string len_input = "cache_len";  // [batch] int64
  int width = 0;          // ids per row: b for the step, 1 for the AR step
  int rows = 0;           // output rows per batch row: the manifest's rows (token_ids [batch, rows])
  int new_len = 0;        // "slice": K/V slots the graph returns per row ([batch, kv, new_len, hd])
  bool inplace = false;   // "inplace": present.* alias past_key_values.* (the whole cache)
};

struct Contract {
  int block_size = 0;
  std::vector<int> proposals;
  int step_len = 0;        // slots one TiDAR step writes from L (dims.q_len)
  int max_len = 0;         // cache slots per row
  int max_batch = 0;       // rows of the cached graphs
  int kv_heads = 0, head_dim = 0, num_layers = 0;
  std::int64_t vocab_size = 0, mask_token_id = 0;
  std::string kv_dtype;      // of every past_key_values.* / present.* binding
  std::string logits_dtype;  // of every graph's logits output
  std::vector<std::string> past_names, present_names;  // one per layer and K/V, key first
  std::string prefill_file;  // the prefill graph: input_ids [1, P] -> token_ids [1, b], present.* [1, kv, P + b, hd]
  CachedGraph step, ar_step;

  /// Elements of one cache binding: max_batch * kv_heads * max_len * head_dim.
  std::size_t cache_elems() const {
    return static_cast<std::size_t>(max_batch) * kv_heads * max_len * head_dim;
  }
};

/// The contract of a loaded (checked) manifest.
Contract contract_of(const Manifest& m);

}  // namespace tidar
