// BLAKE2b (RFC 7693) with a 16-byte digest: the digests the manifest records (runtime/manifest.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace tidar {

/// Incremental BLAKE2b, unkeyed, digest_size bytes (1..64); hexdigest() as Python's hashlib.
class Blake2b {
 public:
  explicit Blake2b(std::size_t digest_size = 16);
  void update(const void* data, std::size_t size);
  std::string hexdigest();  // finalizes: call once

 private:
  void compress(bool last);
  std::uint64_t h_[8];
  std::uint64_t t_[2] = {0, 0};
  unsigned char buf_[128];
  std::size_t fill_ = 0;
  std::size_t digest_size_;
};

/// BLAKE2b-128 of a whole file (manifest.py file_digest). Throws Error when it cannot be read.
std::string file_digest(const std::string& path);

/// BLAKE2b-128 of the file's size and of 64 evenly spaced 64 KiB blocks (manifest.py sample_digest).
std::string sample_digest(const std::string& path);

}  // namespace tidar
