// What the loop needs from an engine (runtime/loop.py Backend): four passes over a KV cache the
// backend owns. Output rows follow tidar/layout.h. Returned Outputs point into the backend's
// buffers and stay valid until its next call.
#pragma once

#include <cstdint>
#include <vector>

namespace tidar {

struct Outputs {
  const std::int64_t* token_ids = nullptr;  // [batch, rows]: the argmax of every output row
  const float* logits = nullptr;            // [batch, rows, vocab], only when asked for (sampling)
  int rows = 0;
  std::int64_t vocab = 0;

  const std::int64_t* ids_of(int row) const { return token_ids + static_cast<std::size_t>(row) * rows; }
  const float* logits_of(int row) const {
    return logits ? logits + static_cast<std::size_t>(row) * rows * vocab : nullptr;
  }
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual int block_size() const = 0;                   // b: draft rows per step
  virtual const std::vector<int>& proposals() const = 0;  // levels with a pre-drafted block, ascending, 1 first
  virtual int max_len() const = 0;                      // cache slots per row
  virtual int max_batch() const = 0;                    // rows of the step graphs
  virtual std::int64_t mask_token_id() const = 0;
  virtual std::int64_t vocab_size() const = 0;

  /// [prompt | M x b] into cache row `row` from slot 0. Outputs [1, b].
  virtual Outputs prefill(int row, const std::vector<std::int64_t>& prompt, bool want_logits) = 0;
  /// drafts [max_batch, b] at L = cache_len [max_batch]; writes K/V at each row's L. Outputs [B, n_out].
  virtual Outputs step(const std::vector<std::int64_t>& drafts, const std::vector<std::int64_t>& cache_len,
                       bool want_logits) = 0;
  /// Causal pass over the prompt into cache row `row`. Outputs [1, 1] at the last prompt token.
  virtual Outputs ar_prefill(int row, const std::vector<std::int64_t>& prompt, bool want_logits) = 0;
  /// tokens [max_batch, 1] at position cache_len [max_batch]. Outputs [B, 1].
  virtual Outputs ar_step(const std::vector<std::int64_t>& tokens, const std::vector<std::int64_t>& cache_len,
                          bool want_logits) = 0;
};

}  // namespace tidar
