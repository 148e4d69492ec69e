// numpy's default generator, bit for bit: np.random.default_rng(entropy) is SeedSequence(entropy)
// feeding PCG64 (XSL-RR 128/64), and Generator.random() is (next64 >> 11) * 2**-53. The Python
// loop seeds row i with default_rng([seed, i]) (runtime/loop.py); Rng::seeded(seed, row) is that.
#pragma once

#include <cstdint>
#include <vector>

namespace tidar {

/// numpy.random.SeedSequence (pool of 4 words, no spawn key): entropy -> generate_state.
class SeedSequence {
 public:
  /// `entropy`: the integers given to numpy, each split into 32-bit words (low first; 0 is one word).
  explicit SeedSequence(const std::vector<std::uint64_t>& entropy);
  /// generate_state(n_words, np.uint64).
  std::vector<std::uint64_t> generate_state64(std::size_t n_words) const;

 private:
  std::uint32_t pool_[4];
};

/// numpy.random.PCG64 seeded from a SeedSequence, with Generator.random().
class Rng {
 public:
  explicit Rng(const SeedSequence& seq);
  /// default_rng([seed, row]): the stream of batch row `row` under --seed `seed`.
  static Rng seeded(std::uint64_t seed, std::uint64_t row);
  /// default_rng(None): fresh entropy from the OS.
  static Rng fresh();
  std::uint64_t next64();
  /// A double in [0, 1): Generator.random().
  double random();

 private:
  unsigned __int128 state_ = 0, inc_ = 0;
};

}  // namespace tidar
