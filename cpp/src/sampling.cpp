#include "tidar/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "tidar/error.h"
#include "tidar/pyfmt.h"

namespace tidar {

void check_sampling(const SamplingParams& p) {
  const double t = p.temperature;
  if (!std::isfinite(t) || !(t == 0 || (kMinTemperature <= t && t <= kMaxTemperature)))
    throw Error(("--temperature must be 0 (greedy) or in [0.0001, 10000], got " + py_float(t)).substr(0, 200));
  if (p.top_k < 0)
    throw Error(("--top-k must be an integer >= 0 (0 disables it), got " + std::to_string(p.top_k)).substr(0, 200));
  if (!std::isfinite(p.top_p) || !(0.0 < p.top_p && p.top_p <= 1.0))
    throw Error(("--top-p must be in (0, 1], got " + py_float(p.top_p)).substr(0, 200));
}

double pairwise_sum(const double* a, std::size_t n) {
  if (n < 8) {
    double res = 0.0;
    for (std::size_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    std::size_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  std::size_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

void probs(const float* logits, std::size_t vocab, const SamplingParams& params, std::vector<double>& p) {
  p.resize(vocab);
  for (std::size_t i = 0; i < vocab; ++i) p[i] = static_cast<double>(logits[i]) / params.temperature;
  if (params.top_k > 0 && static_cast<std::size_t>(params.top_k) < vocab) {
    std::vector<double> sorted(p);  // the k-th largest value; ties with it stay
    std::nth_element(sorted.begin(), sorted.begin() + (params.top_k - 1), sorted.end(), std::greater<double>());
    const double kth = sorted[static_cast<std::size_t>(params.top_k - 1)];
    for (double& z : p)
      if (z < kth) z = -std::numeric_limits<double>::infinity();
  }
  const double top = *std::max_element(p.begin(), p.end());
  for (double& z : p) z = std::exp(z - top);
  double total = pairwise_sum(p.data(), vocab);
  for (double& x : p) x /= total;
  if (params.top_p < 1.0) {
    std::vector<std::size_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return -p[a] < -p[b]; });
    // keep a token while the mass strictly before it is below top_p (the first always stays)
    std::vector<char> keep(vocab, 0);
    double cum = 0.0;
    for (std::size_t j = 0; j < vocab; ++j) {
      const double x = p[order[j]];
      cum += x;
      keep[order[j]] = (cum - x) < params.top_p;
    }
    for (std::size_t i = 0; i < vocab; ++i)
      if (!keep[i]) p[i] = 0.0;
    total = pairwise_sum(p.data(), vocab);
    for (double& x : p) x /= total;
  }
}

std::int64_t sample(const std::vector<double>& p, Rng& rng) {
  std::vector<double> c(p.size());
  std::partial_sum(p.begin(), p.end(), c.begin());
  const double u = rng.random() * c.back();
  auto i = static_cast<std::size_t>(std::upper_bound(c.begin(), c.end(), u) - c.begin());
  return static_cast<std::int64_t>(std::min(i, p.size() - 1));
}

bool accept_draft(const std::vector<double>& p, const std::vector<double>& q, std::int64_t token, Rng& rng) {
  return rng.random() * q[static_cast<std::size_t>(token)] < p[static_cast<std::size_t>(token)];
}

std::vector<double> residual(const std::vector<double>& p, const std::vector<double>& q) {
  std::vector<double> r(p.size());
  for (std::size_t i = 0; i < p.size(); ++i) r[i] = std::max(p[i] - q[i], 0.0);
  const double total = pairwise_sum(r.data(), r.size());
  if (!(total > 0)) return p;  // only when p == q, where nothing is rejected
  for (double& x : r) x /= total;
  return r;
}

}  // namespace tidar
