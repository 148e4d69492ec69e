// TiDAR's decode loop (runtime/loop.py), step for step: prefill, step, verify, commit, next drafts.
// The loop owns each row's committed length L and its drafts; the backend owns the KV cache. A
// step writes K/V at L..L+q-1 with the drafts first, so committing k accepted drafts is L += k.
// AR decoding is the same scaffolding with b = 1 and no drafts. Rows finish independently (a stop
// id, max_new_tokens, or a cache that cannot hold the next pass).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "tidar/backend.h"
#include "tidar/rng.h"
#include "tidar/sampling.h"

namespace tidar {

struct DecodeStats {
  std::vector<int> accepted;  // tokens emitted by every decode forward (k, or fewer on the last)
  double prefill_s = 0.0;     // wall time of this row's prefill
  std::vector<double> step_s;  // wall time of every decode forward

  int forwards() const { return static_cast<int>(accepted.size()); }
  double tokens_per_forward() const;      // T/NFE over decode forwards (prefill excluded)
  std::map<int, int> histogram() const;  // emitted length k -> steps
};

struct DecodeResult {
  std::vector<std::int64_t> tokens;  // generated ids (prompt and stop token excluded)
  std::string finish_reason;         // "stop", "length", "cache_full"; "" while unfinished
  DecodeStats stats;
};

/// One sequence being decoded: prompt, committed length L, anchor and drafts, sampling state, result.
struct SeqState {
  SeqState(std::vector<std::int64_t> prompt, int max_new, SamplingParams params, std::set<std::int64_t> stop, Rng rng);

  std::vector<std::int64_t> prompt;
  std::int64_t L;
  std::int64_t anchor = -1;
  std::vector<std::int64_t> drafts;
  std::vector<std::vector<double>> q;  // proposal distributions of the drafts (sampling)
  SamplingParams params;
  Rng rng;
  int max_new;
  std::set<std::int64_t> stop;
  DecodeResult result;

  bool done() const { return !result.finish_reason.empty(); }
  void finish(const std::string& reason);
  /// Append tokens up to a stop id or the length limit; returns those kept.
  std::vector<std::int64_t> emit(const std::vector<std::int64_t>& tokens);
};

/// One decode mode: its passes and its per-row commit (TiDAR or AR).
class Mode {
 public:
  virtual ~Mode() = default;
  virtual const char* name() const = 0;
  virtual int pass_len() const = 0;      // cache slots one pass writes from L
  virtual int prompt_extra() const = 0;  // slots the prefill needs beyond the prompt
  virtual std::vector<std::int64_t> prefill(Backend& backend, int row, SeqState& seq) = 0;
  virtual Outputs run(Backend& backend, const std::map<int, SeqState*>& seqs, const std::vector<std::int64_t>& cache_len,
                      bool want_logits) = 0;
  /// Verify and commit one row from its outputs; the tokens it decided.
  virtual std::vector<std::int64_t> advance(SeqState& seq, const std::int64_t* ids, const float* logits,
                                            std::int64_t vocab) = 0;
};

std::unique_ptr<Mode> make_mode(const std::string& name, const Backend& backend);  // "tidar" | "ar"

/// After k accepted tokens: the output rows [lo, hi) that hold the next drafts (loop.py proposal_block).
std::pair<int, int> proposal_rows(int block_size, const std::vector<int>& proposals, int k);

/// The rows of one backend's batch and the one decode loop over them (loop.py Decoder).
class Decoder {
 public:
  Decoder(Backend& backend, const std::string& mode);
  /// The prompt checked: ids in the vocabulary, not empty, fits the cache (one-line Error).
  std::vector<std::int64_t> check_prompt(const std::vector<std::int64_t>& prompt) const;
  /// Prefill `seq` into row `row` (the first free row when -1); (row, tokens emitted).
  std::pair<int, std::vector<std::int64_t>> admit(SeqState& seq, int row = -1);
  /// One batched pass over every active row: its (row, tokens emitted) pieces; empty when none is active.
  std::vector<std::pair<int, std::vector<std::int64_t>>> step();
  SeqState* release(int row);
  double last_step_s = 0.0;

 private:
  std::vector<int> active_rows();
  Backend& backend_;
  std::unique_ptr<Mode> mode_;
  std::vector<SeqState*> rows_;
  std::vector<std::int64_t> cache_len_;
};

/// Decode a batch of prompts (row i = prompt i, seeded [seed, i]) until every row is done.
std::vector<DecodeResult> generate_batch(Backend& backend, const std::string& mode,
                                         const std::vector<std::vector<std::int64_t>>& prompts, int max_new_tokens,
                                         const SamplingParams& params = {}, const std::set<std::int64_t>& stop = {});

}  // namespace tidar
