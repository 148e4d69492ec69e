// ONNX Runtime backend, CPU provider (runtime/backends/ort.py): runs an artifact's prefill, step and
// ar_step graphs. The KV cache is one preallocated buffer [max_batch, kv, max_len, hd] per layer and
// K/V, bound to the cached graphs by address (I/O binding, made once per graph). Per graph, as the
// manifest says: "slice" graphs return the pass's new K/V [B, kv, q, hd], which this backend copies
// to each row's L; "inplace" graphs get present.* bound to the cache buffers themselves and write
// their new slots in place. A pass allocates nothing cache-sized.
#pragma once

#include <memory>
#include <string>

#include "tidar/backend.h"
#include "tidar/contract.h"
#include "tidar/manifest.h"

namespace tidar {

struct OrtOptions {
  int intra_op_threads = 0;  // 0: ONNX Runtime's default (one per core)
};

class OrtBackend : public Backend {
 public:
  /// Load and check the artifact's manifest (quick digests); graphs load on first use.
  explicit OrtBackend(const std::string& artifact_dir, OrtOptions options = {});
  /// Over a manifest already loaded from `artifact_dir`.
  OrtBackend(const std::string& artifact_dir, Manifest manifest, OrtOptions options = {});
  ~OrtBackend() override;

  const Manifest& manifest() const;
  const Contract& contract() const;
  int block_size() const override;
  const std::vector<int>& proposals() const override;
  int max_len() const override;
  int max_batch() const override;
  std::int64_t mask_token_id() const override;
  std::int64_t vocab_size() const override;

  Outputs prefill(int row, const std::vector<std::int64_t>& prompt, bool want_logits) override;
  Outputs step(const std::vector<std::int64_t>& drafts, const std::vector<std::int64_t>& cache_len,
               bool want_logits) override;
  Outputs ar_prefill(int row, const std::vector<std::int64_t>& prompt, bool want_logits) override;
  Outputs ar_step(const std::vector<std::int64_t>& tokens, const std::vector<std::int64_t>& cache_len,
                  bool want_logits) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tidar
