#include "tidar/loop.h"

#include <algorithm>
#include <chrono>

#include "tidar/error.h"
#include "tidar/layout.h"

namespace tidar {
namespace {

constexpr std::size_t kMaxPromptTokens = std::size_t{1} << 24;

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// The token of one output row: the graph's argmax when greedy, else a sample of softmax(logits/T).
std::int64_t choose(std::int64_t token_id, const float* logits, std::int64_t vocab, SeqState& seq) {
  if (seq.params.greedy()) return token_id;
  std::vector<double> p;
  probs(logits, static_cast<std::size_t>(vocab), seq.params, p);
  return sample(p, seq.rng);
}

/// Drafts from diffusion rows [n]; when sampling also keep q (one distribution per draft).
void set_drafts(SeqState& seq, const std::int64_t* ids, const float* logits, int n, std::int64_t vocab) {
  seq.drafts.assign(ids, ids + n);
  seq.q.clear();
  if (seq.params.greedy()) return;
  seq.q.resize(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) probs(logits + static_cast<std::size_t>(i) * vocab, static_cast<std::size_t>(vocab), seq.params, seq.q[i]);
  for (int i = 0; i < n; ++i) seq.drafts[i] = sample(seq.q[i], seq.rng);
}

/// Accepted count k and the next anchor, from the AR rows [b] of this row's step (loop.py verify).
std::pair<int, std::int64_t> verify(SeqState& seq, const std::int64_t* ids, const float* logits, std::int64_t vocab) {
  std::vector<std::int64_t> d = {seq.anchor};
  d.insert(d.end(), seq.drafts.begin(), seq.drafts.end());
  int k = 1;
  std::vector<double> p;
  for (std::size_t i = 1; i < d.size(); ++i) {
    if (seq.params.greedy()) {
      if (d[i] != ids[i - 1]) return {k, ids[i - 1]};  // the first mismatch is the anchor
    } else {
      probs(logits + (i - 1) * vocab, static_cast<std::size_t>(vocab), seq.params, p);  // AR[i-1] predicts d_i
      if (!accept_draft(p, seq.q[i - 1], d[i], seq.rng)) return {k, sample(residual(p, seq.q[i - 1]), seq.rng)};
    }
    ++k;
  }
  // All accepted: the next anchor is AR's own token after d_{k-1} (the bonus token).
  return {k, choose(ids[k - 1], logits ? logits + static_cast<std::size_t>(k - 1) * vocab : nullptr, vocab, seq)};
}

class TidarMode : public Mode {
 public:
  explicit TidarMode(const Backend& backend)
      : b_(backend.block_size()),
        proposals_(backend.proposals()),
        mask_(backend.mask_token_id()),
        inputs_(static_cast<std::size_t>(backend.max_batch()) * b_, mask_) {}
  const char* name() const override { return "tidar"; }
  int pass_len() const override { return b_ * (1 + static_cast<int>(proposals_.size())); }
  int prompt_extra() const override { return b_; }

  std::vector<std::int64_t> prefill(Backend& backend, int row, SeqState& seq) override {
    Outputs out = backend.prefill(row, seq.prompt, !seq.params.greedy());  // AR at p_{P-1}, mask slots 1..b-1
    const float* lg = out.logits_of(0);
    seq.anchor = choose(out.token_ids[0], lg, out.vocab, seq);
    set_drafts(seq, out.token_ids + 1, lg ? lg + out.vocab : nullptr, b_ - 1, out.vocab);
    return {seq.anchor};
  }

  Outputs run(Backend& backend, const std::map<int, SeqState*>& seqs, const std::vector<std::int64_t>& cache_len,
              bool want) override {
    std::fill(inputs_.begin(), inputs_.end(), mask_);
    for (const auto& [i, seq] : seqs) {  // n <= b valid drafts (sparse proposals)
      auto* row = inputs_.data() + static_cast<std::size_t>(i) * b_;
      row[0] = seq->anchor;
      std::copy(seq->drafts.begin(), seq->drafts.end(), row + 1);
    }
    return backend.step(inputs_, cache_len, want);
  }

  std::vector<std::int64_t> advance(SeqState& seq, const std::int64_t* ids, const float* logits,
                                    std::int64_t vocab) override {
    auto [k, anchor] = verify(seq, ids, logits, vocab);
    std::vector<std::int64_t> tokens(seq.drafts.begin(), seq.drafts.begin() + (k - 1));
    seq.L += k;  // commit d_0..d_{k-1}: their K/V already sit at L..L+k-1
    seq.anchor = anchor;
    auto [lo, hi] = proposal_rows(b_, proposals_, k);
    set_drafts(seq, ids + lo, logits ? logits + static_cast<std::size_t>(lo) * vocab : nullptr, hi - lo, vocab);
    tokens.push_back(anchor);
    return tokens;
  }

 private:
  int b_;
  std::vector<int> proposals_;
  std::int64_t mask_;
  std::vector<std::int64_t> inputs_;
};

class ArMode : public Mode {
 public:
  explicit ArMode(const Backend& backend)
      : mask_(backend.mask_token_id()), inputs_(static_cast<std::size_t>(backend.max_batch()), mask_) {}
  const char* name() const override { return "ar"; }
  int pass_len() const override { return 1; }
  int prompt_extra() const override { return 0; }

  std::vector<std::int64_t> prefill(Backend& backend, int row, SeqState& seq) override {
    Outputs out = backend.ar_prefill(row, seq.prompt, !seq.params.greedy());
    seq.anchor = choose(out.token_ids[0], out.logits_of(0), out.vocab, seq);
    return {seq.anchor};
  }

  Outputs run(Backend& backend, const std::map<int, SeqState*>& seqs, const std::vector<std::int64_t>& cache_len,
              bool want) override {
    std::fill(inputs_.begin(), inputs_.end(), mask_);
    for (const auto& [i, seq] : seqs) inputs_[static_cast<std::size_t>(i)] = seq->anchor;
    return backend.ar_step(inputs_, cache_len, want);
  }

  std::vector<std::int64_t> advance(SeqState& seq, const std::int64_t* ids, const float* logits,
                                    std::int64_t vocab) override {
    seq.L += 1;
    seq.anchor = choose(ids[0], logits, vocab, seq);
    return {seq.anchor};
  }

 private:
  std::int64_t mask_;
  std::vector<std::int64_t> inputs_;
};

}  // namespace

double DecodeStats::tokens_per_forward() const {
  double total = 0;
  for (int k : accepted) total += k;
  return total / std::max<std::size_t>(1, accepted.size());
}

std::map<int, int> DecodeStats::histogram() const {
  std::map<int, int> h;
  for (int k : accepted) ++h[k];
  return h;
}

SeqState::SeqState(std::vector<std::int64_t> prompt_, int max_new_, SamplingParams params_,
                   std::set<std::int64_t> stop_, Rng rng_)
    : prompt(std::move(prompt_)),
      L(static_cast<std::int64_t>(prompt.size())),
      params(params_),
      rng(rng_),
      max_new(max_new_),
      stop(std::move(stop_)) {
  if (max_new <= 0) result.finish_reason = "length";
}

void SeqState::finish(const std::string& reason) {
  if (!done()) result.finish_reason = reason;
}

std::vector<std::int64_t> SeqState::emit(const std::vector<std::int64_t>& tokens) {
  std::vector<std::int64_t> kept;
  for (std::int64_t t : tokens) {
    if (done()) break;
    if (stop.count(t)) {
      result.finish_reason = "stop";
      break;
    }
    kept.push_back(t);
    result.tokens.push_back(t);
    if (static_cast<int>(result.tokens.size()) >= max_new) result.finish_reason = "length";
  }
  return kept;
}

std::unique_ptr<Mode> make_mode(const std::string& name, const Backend& backend) {
  if (name == "tidar") return std::make_unique<TidarMode>(backend);
  if (name == "ar") return std::make_unique<ArMode>(backend);
  throw Error("unknown decode mode '" + name + "': choose tidar or ar");
}

std::pair<int, int> proposal_rows(int block_size, const std::vector<int>& proposals, int k) {
  int r = 1;  // the block that assumed exactly this outcome: the largest level <= k (block 1 always exists)
  for (int x : proposals)
    if (x <= k) r = x;
  const int row1 = block_out_row(block_size, proposals, r);  // slot t of block r is output row row1 + t - 1
  return {row1 + (k - r + 1) - 1, row1 + (block_size - 1)};
}

Decoder::Decoder(Backend& backend, const std::string& mode)
    : backend_(backend),
      mode_(make_mode(mode, backend)),
      rows_(static_cast<std::size_t>(backend.max_batch()), nullptr),
      cache_len_(static_cast<std::size_t>(backend.max_batch()), 0) {}

std::vector<std::int64_t> Decoder::check_prompt(const std::vector<std::int64_t>& p) const {
  if (p.size() > kMaxPromptTokens)
    throw Error("prompt has " + std::to_string(p.size()) + " tokens, more than " + std::to_string(kMaxPromptTokens));
  const std::int64_t vocab = backend_.vocab_size();
  for (std::int64_t t : p)
    if (t < 0 || t >= vocab)
      throw Error("prompt token id " + std::to_string(t) + " is outside the vocabulary (0.." +
                  std::to_string(vocab - 1) + ")");
  if (p.empty()) throw Error("empty prompt");
  const std::size_t need = p.size() + static_cast<std::size_t>(mode_->prompt_extra());
  if (need > static_cast<std::size_t>(backend_.max_len()))
    throw Error("prompt of " + std::to_string(p.size()) + " tokens does not fit the KV cache of " +
                std::to_string(backend_.max_len()) + " slots (needs " + std::to_string(need) + ")");
  return p;
}

std::vector<int> Decoder::active_rows() {
  std::vector<int> active;
  for (std::size_t i = 0; i < rows_.size(); ++i) {
    SeqState* seq = rows_[i];
    if (!seq || seq->done()) continue;
    if (seq->L + mode_->pass_len() > backend_.max_len()) seq->finish("cache_full");
    else active.push_back(static_cast<int>(i));
  }
  return active;
}

std::pair<int, std::vector<std::int64_t>> Decoder::admit(SeqState& seq, int row) {
  if (row < 0) {
    auto free = std::find(rows_.begin(), rows_.end(), nullptr);
    if (free == rows_.end()) throw Error("no free row in the batch");
    row = static_cast<int>(free - rows_.begin());
  } else if (rows_[static_cast<std::size_t>(row)]) {
    throw Error("row " + std::to_string(row) + " is taken");
  }
  rows_[static_cast<std::size_t>(row)] = &seq;
  const double t0 = now_s();
  auto tokens = mode_->prefill(backend_, row, seq);
  seq.result.stats.prefill_s = now_s() - t0;
  return {row, seq.emit(tokens)};
}

std::vector<std::pair<int, std::vector<std::int64_t>>> Decoder::step() {
  std::vector<std::pair<int, std::vector<std::int64_t>>> pieces;
  auto active = active_rows();
  if (active.empty()) return pieces;
  std::map<int, SeqState*> seqs;
  std::fill(cache_len_.begin(), cache_len_.end(), 0);  // free and finished rows compute harmlessly at L = 0
  bool want = false;
  for (int i : active) {
    seqs[i] = rows_[static_cast<std::size_t>(i)];
    cache_len_[static_cast<std::size_t>(i)] = seqs[i]->L;
    want |= !seqs[i]->params.greedy();
  }
  const double t0 = now_s();
  Outputs out = mode_->run(backend_, seqs, cache_len_, want);
  const double dt = now_s() - t0;
  last_step_s = dt;
  for (const auto& [i, seq] : seqs) {
    auto kept = seq->emit(mode_->advance(*seq, out.ids_of(i), out.logits_of(i), out.vocab));
    seq->result.stats.accepted.push_back(static_cast<int>(kept.size()));
    seq->result.stats.step_s.push_back(dt);
    pieces.emplace_back(i, std::move(kept));
  }
  return pieces;
}

SeqState* Decoder::release(int row) {
  SeqState* seq = rows_[static_cast<std::size_t>(row)];
  rows_[static_cast<std::size_t>(row)] = nullptr;
  return seq;
}

std::vector<DecodeResult> generate_batch(Backend& backend, const std::string& mode,
                                         const std::vector<std::vector<std::int64_t>>& prompts, int max_new_tokens,
                                         const SamplingParams& params, const std::set<std::int64_t>& stop) {
  Decoder decoder(backend, mode);
  if (static_cast<int>(prompts.size()) > backend.max_batch())
    throw Error(std::to_string(prompts.size()) + " prompts exceed the artifact's batch of " +
                std::to_string(backend.max_batch()));
  std::vector<std::vector<std::int64_t>> checked;
  for (const auto& p : prompts) checked.push_back(decoder.check_prompt(p));
  std::vector<std::unique_ptr<SeqState>> seqs;
  for (std::size_t i = 0; i < checked.size(); ++i)  // one generator stream per row
    seqs.push_back(std::make_unique<SeqState>(checked[i], max_new_tokens, params, stop,
                                              params.seed ? Rng::seeded(*params.seed, i) : Rng::fresh()));
  for (std::size_t i = 0; i < seqs.size(); ++i) decoder.admit(*seqs[i], static_cast<int>(i));
  while (!decoder.step().empty()) {
  }
  std::vector<DecodeResult> results;
  for (auto& s : seqs) results.push_back(s->result);
  return results;
}

}  // namespace tidar
