// The token chain the scripted engines of the tests compute: x[n+1] = next(x[n], x[n-1]), and
// drafts that are wrong at known positions (so TiDAR steps accept some drafts and reject others).
#pragma once

#include <cstdint>
#include <vector>

namespace chain {

inline std::int64_t next(std::int64_t a, std::int64_t prev) { return (3 * a + prev + 1) % 13; }

/// The true continuation of a prompt: n tokens.
inline std::vector<std::int64_t> continuation(std::vector<std::int64_t> x, int n) {
  std::vector<std::int64_t> out;
  for (int i = 0; i < n; ++i) {
    const std::int64_t prev = x.size() > 1 ? x[x.size() - 2] : 0;
    x.push_back(next(x.back(), prev));
    out.push_back(x.back());
  }
  return out;
}

/// Drafts for the n positions after the anchor that follows (a, prev), the anchor at position `pos`:
/// the chain, except where (value + pos + t) % 4 == 0.
inline std::vector<std::int64_t> drafted(std::int64_t a, std::int64_t prev, int n, int pos) {
  std::vector<std::int64_t> out;
  std::int64_t x = next(a, prev);  // the anchor (decided by AR), not returned
  prev = a;
  for (int t = 1; t <= n; ++t) {
    const std::int64_t y = next(x, prev);
    prev = x, x = y;
    out.push_back((y + pos + t) % 4 == 0 ? (y + 1) % 13 : y);
  }
  return out;
}

}  // namespace chain
