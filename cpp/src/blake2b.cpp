#include "tidar/blake2b.h"

#include <cstring>
#include <fstream>
#include <vector>

#include "tidar/error.h"

namespace tidar {
namespace {

constexpr std::uint64_t kIv[8] = {0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
                                  0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
                                  0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};
constexpr unsigned char kSigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

std::uint64_t rotr(std::uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

std::uint64_t load64(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

constexpr std::size_t kSampleBlocks = 64, kSampleBlockBytes = 64 << 10;

}  // namespace

Blake2b::Blake2b(std::size_t digest_size) : digest_size_(digest_size) {
  std::memcpy(h_, kIv, sizeof h_);
  h_[0] ^= 0x01010000ULL ^ digest_size;  // fanout 1, depth 1, no key
}

void Blake2b::compress(bool last) {
  std::uint64_t v[16], m[16];
  for (int i = 0; i < 16; ++i) m[i] = load64(buf_ + 8 * i);
  for (int i = 0; i < 8; ++i) v[i] = h_[i], v[i + 8] = kIv[i];
  v[12] ^= t_[0];
  v[13] ^= t_[1];
  if (last) v[14] = ~v[14];
  auto g = [&](int a, int b, int c, int d, std::uint64_t x, std::uint64_t y) {
    v[a] = v[a] + v[b] + x, v[d] = rotr(v[d] ^ v[a], 32);
    v[c] = v[c] + v[d], v[b] = rotr(v[b] ^ v[c], 24);
    v[a] = v[a] + v[b] + y, v[d] = rotr(v[d] ^ v[a], 16);
    v[c] = v[c] + v[d], v[b] = rotr(v[b] ^ v[c], 63);
  };
  for (const auto& s : kSigma) {
    g(0, 4, 8, 12, m[s[0]], m[s[1]]), g(1, 5, 9, 13, m[s[2]], m[s[3]]);
    g(2, 6, 10, 14, m[s[4]], m[s[5]]), g(3, 7, 11, 15, m[s[6]], m[s[7]]);
    g(0, 5, 10, 15, m[s[8]], m[s[9]]), g(1, 6, 11, 12, m[s[10]], m[s[11]]);
    g(2, 7, 8, 13, m[s[12]], m[s[13]]), g(3, 4, 9, 14, m[s[14]], m[s[15]]);
  }
  for (int i = 0; i < 8; ++i) h_[i] ^= v[i] ^ v[i + 8];
}

void Blake2b::update(const void* data, std::size_t size) {
  const auto* p = static_cast<const unsigned char*>(data);
  while (size > 0) {
    if (fill_ == sizeof buf_) {  // a full buffer is compressed only once more data follows
      t_[0] += sizeof buf_;
      if (t_[0] < sizeof buf_) ++t_[1];
      compress(false);
      fill_ = 0;
    }
    std::size_t n = std::min(size, sizeof buf_ - fill_);
    std::memcpy(buf_ + fill_, p, n);
    fill_ += n, p += n, size -= n;
  }
}

std::string Blake2b::hexdigest() {
  t_[0] += fill_;
  if (t_[0] < fill_) ++t_[1];
  std::memset(buf_ + fill_, 0, sizeof buf_ - fill_);
  compress(true);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < digest_size_; ++i) {
    unsigned byte = (h_[i / 8] >> (8 * (i % 8))) & 0xff;
    out += hex[byte >> 4];
    out += hex[byte & 15];
  }
  return out;
}

namespace {

std::ifstream open_or_fail(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read " + path);
  return f;
}

void hash_stream(std::ifstream& f, Blake2b& h) {
  std::vector<char> chunk(4 << 20);
  while (f) {
    f.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    h.update(chunk.data(), static_cast<std::size_t>(f.gcount()));
  }
}

}  // namespace

std::string file_digest(const std::string& path) {
  auto f = open_or_fail(path);
  Blake2b h(16);
  hash_stream(f, h);
  return h.hexdigest();
}

std::string sample_digest(const std::string& path) {
  auto f = open_or_fail(path);
  f.seekg(0, std::ios::end);
  const std::uint64_t size = static_cast<std::uint64_t>(f.tellg());
  f.seekg(0);
  Blake2b h(16);
  unsigned char le[8];
  for (int i = 0; i < 8; ++i) le[i] = static_cast<unsigned char>(size >> (8 * i));
  h.update(le, 8);
  if (size <= kSampleBlocks * kSampleBlockBytes) {
    hash_stream(f, h);
  } else {
    std::vector<char> block(kSampleBlockBytes);
    for (std::size_t i = 0; i < kSampleBlocks; ++i) {
      f.seekg(static_cast<std::streamoff>((size - kSampleBlockBytes) * i / (kSampleBlocks - 1)));
      f.read(block.data(), static_cast<std::streamsize>(block.size()));
      h.update(block.data(), static_cast<std::size_t>(f.gcount()));
    }
  }
  return h.hexdigest();
}

}  // namespace tidar
