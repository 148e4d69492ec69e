#include "tidar/rng.h"

#include <random>

namespace tidar {
namespace {

constexpr std::uint32_t kInitA = 0x43b0d7e5, kMultA = 0x931e8875, kInitB = 0x8b51f9dd, kMultB = 0x58f38ded;
constexpr std::uint32_t kMixMultL = 0xca01f9dd, kMixMultR = 0x4973f715;
constexpr int kXShift = 16;
constexpr unsigned __int128 kPcgMult =
    (static_cast<unsigned __int128>(0x2360ED051FC65DA4ULL) << 64) | 0x4385DF649FCCF645ULL;

std::uint32_t hashmix(std::uint32_t value, std::uint32_t& hash_const) {
  value ^= hash_const;
  hash_const *= kMultA;
  value *= hash_const;
  value ^= value >> kXShift;
  return value;
}

std::uint32_t mix(std::uint32_t x, std::uint32_t y) {
  std::uint32_t result = kMixMultL * x - kMixMultR * y;
  result ^= result >> kXShift;
  return result;
}

}  // namespace

SeedSequence::SeedSequence(const std::vector<std::uint64_t>& entropy) {
  std::vector<std::uint32_t> words;  // numpy's _coerce_to_uint32_array of a list of ints
  for (std::uint64_t n : entropy) {
    if (n == 0) words.push_back(0);
    for (; n > 0; n >>= 32) words.push_back(static_cast<std::uint32_t>(n));
  }
  std::uint32_t hash_const = kInitA;
  for (std::size_t i = 0; i < 4; ++i) pool_[i] = hashmix(i < words.size() ? words[i] : 0, hash_const);
  for (std::size_t src = 0; src < 4; ++src)
    for (std::size_t dst = 0; dst < 4; ++dst)
      if (src != dst) pool_[dst] = mix(pool_[dst], hashmix(pool_[src], hash_const));
  for (std::size_t src = 4; src < words.size(); ++src)
    for (std::size_t dst = 0; dst < 4; ++dst) pool_[dst] = mix(pool_[dst], hashmix(words[src], hash_const));
}

std::vector<std::uint64_t> SeedSequence::generate_state64(std::size_t n_words) const {
  std::uint32_t hash_const = kInitB;
  std::vector<std::uint32_t> state(2 * n_words);
  for (std::size_t i = 0; i < state.size(); ++i) {
    std::uint32_t v = pool_[i % 4];
    v ^= hash_const;
    hash_const *= kMultB;
    v *= hash_const;
    v ^= v >> kXShift;
    state[i] = v;
  }
  std::vector<std::uint64_t> out(n_words);
  for (std::size_t i = 0; i < n_words; ++i)
    out[i] = static_cast<std::uint64_t>(state[2 * i]) | (static_cast<std::uint64_t>(state[2 * i + 1]) << 32);
  return out;
}

Rng::Rng(const SeedSequence& seq) {
  auto s = seq.generate_state64(4);  // pcg64_set_seed: state (s[0] high, s[1] low), increment (s[2], s[3])
  unsigned __int128 init_state = (static_cast<unsigned __int128>(s[0]) << 64) | s[1];
  unsigned __int128 init_seq = (static_cast<unsigned __int128>(s[2]) << 64) | s[3];
  inc_ = (init_seq << 1) | 1;
  state_ = 0;
  state_ = state_ * kPcgMult + inc_;
  state_ += init_state;
  state_ = state_ * kPcgMult + inc_;
}

Rng Rng::seeded(std::uint64_t seed, std::uint64_t row) { return Rng(SeedSequence({seed, row})); }

Rng Rng::fresh() {
  std::random_device dev;
  std::vector<std::uint64_t> entropy;
  for (int i = 0; i < 4; ++i) entropy.push_back((static_cast<std::uint64_t>(dev()) << 32) | dev());
  return Rng(SeedSequence(entropy));
}

std::uint64_t Rng::next64() {
  state_ = state_ * kPcgMult + inc_;
  auto hi = static_cast<std::uint64_t>(state_ >> 64), lo = static_cast<std::uint64_t>(state_);
  unsigned rot = static_cast<unsigned>(state_ >> 122);
  std::uint64_t x = hi ^ lo;
  return (x >> rot) | (x << ((64 - rot) & 63));
}

double Rng::random() { return static_cast<double>(next64() >> 11) * (1.0 / 9007199254740992.0); }

}  // namespace tidar
