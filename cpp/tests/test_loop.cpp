// The decode loop over a scripted backend: a second-order token chain x[n+1] = f(x[n], x[n-1])
// that the backend computes from its own cache of tokens (so a wrong committed length L shows),
// with drafts that are wrong at known positions (so steps accept some drafts and reject others).
#include <gtest/gtest.h>

#include "chain.h"
#include "fixture.h"
#include "tidar/layout.h"
#include "tidar/loop.h"

namespace {

constexpr std::int64_t kVocab = 16, kMask = 15;

using chain::next;

std::vector<std::int64_t> chain_of(const std::vector<std::int64_t>& x, int n) { return chain::continuation(x, n); }

class ScriptedBackend : public tidar::Backend {
 public:
  ScriptedBackend(int b, std::vector<int> proposals, int max_len, int max_batch)
      : b_(b), proposals_(std::move(proposals)), max_len_(max_len), max_batch_(max_batch),
        cache_(static_cast<std::size_t>(max_batch), std::vector<std::int64_t>(static_cast<std::size_t>(max_len), kMask)) {}

  int block_size() const override { return b_; }
  const std::vector<int>& proposals() const override { return proposals_; }
  int max_len() const override { return max_len_; }
  int max_batch() const override { return max_batch_; }
  std::int64_t mask_token_id() const override { return kMask; }
  std::int64_t vocab_size() const override { return kVocab; }
  int passes = 0;

  tidar::Outputs prefill(int row, const std::vector<std::int64_t>& prompt, bool want) override {
    auto& c = cache_[static_cast<std::size_t>(row)];
    std::copy(prompt.begin(), prompt.end(), c.begin());
    const auto P = static_cast<int>(prompt.size());
    start(1, b_);
    ids_[0] = next(c[P - 1], P > 1 ? c[P - 2] : 0);
    auto roll = chain::drafted(c[P - 1], P > 1 ? c[P - 2] : 0, b_ - 1, P);  // mask slot t predicts position P + t
    std::copy(roll.begin(), roll.end(), ids_.begin() + 1);
    return finish(want);
  }

  tidar::Outputs step(const std::vector<std::int64_t>& drafts, const std::vector<std::int64_t>& cache_len,
                      bool want) override {
    const int rows = tidar::n_out(b_, proposals_);
    start(max_batch_, rows);
    for (int i = 0; i < max_batch_; ++i) {
      auto& c = cache_[static_cast<std::size_t>(i)];
      const auto L = static_cast<int>(cache_len[static_cast<std::size_t>(i)]);
      const std::int64_t* d = drafts.data() + static_cast<std::size_t>(i) * b_;
      std::int64_t* out = ids_.data() + static_cast<std::size_t>(i) * rows;
      std::copy(d, d + b_, c.begin() + L);  // the drafts' "K/V" at L..L+b-1
      for (int j = 0; j < b_; ++j) out[j] = next(d[j], L + j > 0 ? c[L + j - 1] : 0);  // AR rows
      for (int r : proposals_) {  // block r assumes d_0..d_{r-1} accepted; slot t predicts L + r + t
        auto roll = chain::drafted(d[r - 1], L + r - 2 >= 0 ? c[L + r - 2] : 0, b_ - 1, L + r);
        std::copy(roll.begin(), roll.end(), out + tidar::block_out_row(b_, proposals_, r));
      }
    }
    return finish(want);
  }

  tidar::Outputs ar_prefill(int row, const std::vector<std::int64_t>& prompt, bool want) override {
    prefill(row, prompt, false);
    ids_.resize(1);
    start(1, 1);
    const auto& c = cache_[static_cast<std::size_t>(row)];
    const auto P = prompt.size();
    ids_[0] = next(c[P - 1], P > 1 ? c[P - 2] : 0);
    return finish(want);
  }

  tidar::Outputs ar_step(const std::vector<std::int64_t>& tokens, const std::vector<std::int64_t>& cache_len,
                         bool want) override {
    start(max_batch_, 1);
    for (int i = 0; i < max_batch_; ++i) {
      auto& c = cache_[static_cast<std::size_t>(i)];
      const auto L = static_cast<std::size_t>(cache_len[static_cast<std::size_t>(i)]);
      c[L] = tokens[static_cast<std::size_t>(i)];
      ids_[static_cast<std::size_t>(i)] = next(c[L], L > 0 ? c[L - 1] : 0);
    }
    return finish(want);
  }

 private:
  void start(int batch, int rows) {
    ++passes;
    rows_ = rows;
    ids_.assign(static_cast<std::size_t>(batch) * rows, 0);
  }

  tidar::Outputs finish(bool want) {
    tidar::Outputs out;
    out.token_ids = ids_.data();
    out.rows = rows_;
    out.vocab = kVocab;
    if (want) {  // peaked at the token: a sample at a low temperature is the argmax
      logits_.assign(ids_.size() * kVocab, 0.0f);
      for (std::size_t i = 0; i < ids_.size(); ++i) logits_[i * kVocab + static_cast<std::size_t>(ids_[i])] = 8.0f;
      out.logits = logits_.data();
    }
    return out;
  }

  int b_;
  std::vector<int> proposals_;
  int max_len_, max_batch_, rows_ = 0;
  std::vector<std::vector<std::int64_t>> cache_;
  std::vector<std::int64_t> ids_;
  std::vector<float> logits_;
};

const std::vector<std::int64_t> kPrompt = {4, 7, 1};

TEST(Loop, GreedyTidarEqualsArAndTheChain) {
  for (auto proposals : {std::vector<int>{1, 2, 3}, std::vector<int>{1, 3}, std::vector<int>{1}}) {
    ScriptedBackend be(3, proposals, 64, 1);
    auto td = tidar::generate_batch(be, "tidar", {kPrompt}, 20)[0];
    auto ar = tidar::generate_batch(be, "ar", {kPrompt}, 20)[0];
    EXPECT_EQ(td.tokens, chain_of(kPrompt, 20));
    EXPECT_EQ(ar.tokens, td.tokens);
    EXPECT_EQ(td.finish_reason, "length");
    EXPECT_EQ(ar.stats.tokens_per_forward(), 1.0);
    const auto hist = td.stats.histogram();
    EXPECT_GT(hist.rbegin()->first, 1) << "no step accepted a draft";
    EXPECT_EQ(hist.begin()->first, 1) << "no step rejected a draft";
    int emitted = 1;  // the prefill's anchor
    for (int k : td.stats.accepted) emitted += k;
    EXPECT_EQ(emitted, 20);
  }
}

TEST(Loop, ProposalRowsOfSparseSets) {
  // b = 3, proposals {1, 3}: block 1 at rows 3..4, block 3 at rows 5..6.
  EXPECT_EQ(tidar::proposal_rows(3, {1, 3}, 1), std::make_pair(3, 5));
  EXPECT_EQ(tidar::proposal_rows(3, {1, 3}, 2), std::make_pair(4, 5));  // block 1, one slot further: one draft
  EXPECT_EQ(tidar::proposal_rows(3, {1, 3}, 3), std::make_pair(5, 7));
}

TEST(Loop, StopIdsMaxTokensAndAFullCacheFinishRowsIndependently) {
  const std::vector<std::vector<std::int64_t>> prompts = {{4, 7, 1}, {2, 9}, {5, 5, 5, 5, 5, 5, 5, 5, 5, 5}};
  const auto free_run = chain_of(prompts[0], 12);
  const std::int64_t stop = free_run[6];
  ScriptedBackend be(3, {1, 2, 3}, 24, 3);
  auto res = tidar::generate_batch(be, "tidar", prompts, 12, {}, {stop});
  // row 0: ends at the stop id, which is not emitted
  EXPECT_EQ(res[0].finish_reason, "stop");
  std::vector<std::int64_t> before(free_run.begin(), std::find(free_run.begin(), free_run.end(), stop));
  EXPECT_EQ(res[0].tokens, before);
  // row 2: a 10-token prompt in 24 slots; a step needs 12 free slots
  EXPECT_EQ(res[2].finish_reason, "cache_full");
  EXPECT_LT(res[2].tokens.size(), 12u);
  const auto full = chain_of(prompts[2], 12);
  EXPECT_EQ(res[2].tokens, std::vector<std::int64_t>(full.begin(), full.begin() + res[2].tokens.size()));
  // every row equals its own run alone
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    ScriptedBackend alone(3, {1, 2, 3}, 24, 3);
    auto one = tidar::generate_batch(alone, "tidar", {prompts[i]}, 12, {}, {stop})[0];
    EXPECT_EQ(one.tokens, res[i].tokens) << i;
    EXPECT_EQ(one.finish_reason, res[i].finish_reason) << i;
  }
  // AR over the same cache needs one slot per pass: it decodes row 2 to the end
  auto ar = tidar::generate_batch(be, "ar", prompts, 12);
  EXPECT_EQ(ar[2].finish_reason, "length");
  EXPECT_EQ(ar[2].tokens, chain_of(prompts[2], 12));
}

TEST(Loop, LowTemperatureSamplingIsGreedyAndASeedRepeats) {
  ScriptedBackend be(3, {1, 2, 3}, 64, 2);
  tidar::SamplingParams cold{0.01, 0, 1.0, 5};
  auto td = tidar::generate_batch(be, "tidar", {kPrompt, kPrompt}, 16, cold);
  EXPECT_EQ(td[0].tokens, chain_of(kPrompt, 16));
  EXPECT_EQ(td[1].tokens, td[0].tokens);
  tidar::SamplingParams warm{3.0, 8, 0.9, 5};
  auto a = tidar::generate_batch(be, "tidar", {kPrompt, kPrompt}, 16, warm);
  auto b = tidar::generate_batch(be, "tidar", {kPrompt, kPrompt}, 16, warm);
  EXPECT_EQ(a[0].tokens, b[0].tokens);
  EXPECT_EQ(a[1].tokens, b[1].tokens);
  EXPECT_NE(a[0].tokens, a[1].tokens);  // rows draw from their own streams [seed, row]
}

TEST(Loop, PromptChecks) {
  ScriptedBackend be(3, {1, 2, 3}, 16, 1);
  auto err = [&](std::vector<std::vector<std::int64_t>> prompts) {
    return fixture::error_of([&] { tidar::generate_batch(be, "tidar", prompts, 4); });
  };
  EXPECT_EQ(err({{}}), "empty prompt");
  EXPECT_EQ(err({{1, 16}}), "prompt token id 16 is outside the vocabulary (0..15)");
  EXPECT_EQ(err({{-1}}), "prompt token id -1 is outside the vocabulary (0..15)");
  EXPECT_EQ(err({std::vector<std::int64_t>(14, 1)}), "prompt of 14 tokens does not fit the KV cache of 16 slots (needs 17)");
  EXPECT_EQ(err({{1}, {2}}), "2 prompts exceed the artifact's batch of 1");
  EXPECT_EQ(fixture::error_of([&] { tidar::Decoder(be, "beam"); }), "unknown decode mode 'beam': choose tidar or ar");
}

}  // namespace
