// A backend that does no work, for measuring the loop's own host time (runtime/backends/null.py):
// constant outputs that make every TiDAR step accept exactly `accept` tokens.
#pragma once

#include <vector>

#include "tidar/backend.h"
#include "tidar/layout.h"

namespace tidar {

class NullBackend : public Backend {
 public:
  NullBackend(int block_size, std::vector<int> proposals, int max_batch, std::int64_t vocab, int accept)
      : b_(block_size), proposals_(std::move(proposals)), batch_(max_batch), vocab_(vocab), rows_(n_out(b_, proposals_)) {
    step_ids_.assign(static_cast<std::size_t>(batch_) * rows_, 1);  // drafts are always token 1
    for (int i = 0; i < batch_; ++i)  // AR says 1 for the first accept-1 rows, then 2 (a rejection)
      for (int j = accept - 1; j < b_; ++j) step_ids_[static_cast<std::size_t>(i) * rows_ + j] = 2;
    step_logits_.assign(step_ids_.size() * vocab_, 0.0f);
    ones_.assign(static_cast<std::size_t>(std::max(batch_, b_)), 1);
    small_logits_.assign(ones_.size() * vocab_, 0.0f);
  }
  int block_size() const override { return b_; }
  const std::vector<int>& proposals() const override { return proposals_; }
  int max_len() const override { return 1 << 30; }
  int max_batch() const override { return batch_; }
  std::int64_t mask_token_id() const override { return vocab_ - 1; }
  std::int64_t vocab_size() const override { return vocab_; }
  Outputs prefill(int, const std::vector<std::int64_t>&, bool want) override { return out(ones_, small_logits_, b_, want); }
  Outputs step(const std::vector<std::int64_t>&, const std::vector<std::int64_t>&, bool want) override {
    return out(step_ids_, step_logits_, rows_, want);
  }
  Outputs ar_prefill(int, const std::vector<std::int64_t>&, bool want) override { return out(ones_, small_logits_, 1, want); }
  Outputs ar_step(const std::vector<std::int64_t>&, const std::vector<std::int64_t>&, bool want) override {
    return out(ones_, small_logits_, 1, want);
  }

 private:
  Outputs out(const std::vector<std::int64_t>& ids, const std::vector<float>& logits, int rows, bool want) const {
    Outputs o;
    o.token_ids = ids.data();
    o.logits = want ? logits.data() : nullptr;
    o.rows = rows;
    o.vocab = vocab_;
    return o;
  }
  int b_;
  std::vector<int> proposals_;
  int batch_;
  std::int64_t vocab_;
  int rows_;
  std::vector<std::int64_t> step_ids_, ones_;
  std::vector<float> step_logits_, small_logits_;
};

}  // namespace tidar
