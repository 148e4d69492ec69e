// Token choice: temperature / top-k / top-p sampling in float64, in the order of
// runtime/sampling.py, so a seeded run picks the tokens the Python runtime picks.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "tidar/rng.h"

namespace tidar {

struct SamplingParams {
  double temperature = 0.0;  // 0: greedy (the graph's argmax); > 0 samples softmax(logits / T)
  std::int64_t top_k = 0;    // keep the k most likely tokens; 0 disables
  double top_p = 1.0;        // keep the smallest set whose mass reaches top_p; 1 disables
  std::optional<std::uint64_t> seed;  // none: fresh entropy

  bool greedy() const { return temperature <= 0.0; }
};

constexpr double kMinTemperature = 1e-4, kMaxTemperature = 1e4;

/// The checks of sampling.py check_sampling, with its one-line messages (Error).
void check_sampling(const SamplingParams& p);

/// numpy's sum of a contiguous float64 array (pairwise, 8 accumulators, blocks of 128).
double pairwise_sum(const double* a, std::size_t n);

/// The filtered, normalised distribution of one row of logits (sampling.py probs), into `out`.
void probs(const float* logits, std::size_t vocab, const SamplingParams& params, std::vector<double>& out);

/// One token from a distribution by inverse CDF (sampling.py sample): one rng.random() draw.
std::int64_t sample(const std::vector<double>& p, Rng& rng);

/// Speculative sampling's test: accept a draft drawn from q with probability min(1, p/q).
bool accept_draft(const std::vector<double>& p, const std::vector<double>& q, std::int64_t token, Rng& rng);

/// normalize(max(0, p - q)), or p when that is all zero (loop.py residual).
std::vector<double> residual(const std::vector<double>& p, const std::vector<double>& q);

}  // namespace tidar
