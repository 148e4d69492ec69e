// The device backend (runtime/backends/device.py): the loop's passes over engines on a GPU, its logic
// written against a small runner interface. Two runners: TensorRT's engines (make_tensorrt_runner,
// runtime/backends/trt.py) and ONNX Runtime's CUDA provider (make_ort_cuda_runner,
// runtime/backends/ort_cuda.py); the unit tests run it over a stand-in runner whose device memory is
// host memory (tests/test_device_backend.cpp), as tests/fake_trt.py does for the Python backends.
//
// Buffer plan: every device buffer is allocated once, in the constructor: the KV cache (one
// [B, kv, max_len, hd] buffer per layer and K/V), the inputs and outputs of every graph, the
// prefill's at the longest prompt the cache admits. Tensor addresses are set once per graph, so
// the static step and ar_step passes may be replayed as CUDA graphs (the runner captures them).
// A pass uploads its inputs, runs, writes new K/V ("slice": one strided device copy per row and
// binding at the row's L; "inplace": none, present.* alias the cache), downloads token ids (and
// logits when sampling), then synchronizes once.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tidar/backend.h"
#include "tidar/contract.h"
#include "tidar/manifest.h"

namespace tidar {

/// What the backend asks of an engine and its GPU; all copies and runs are ordered on one stream.
class Runner {
 public:
  virtual ~Runner() = default;
  /// Device memory of `bytes`, zeroed, valid as long as the runner.
  virtual void* alloc(std::size_t bytes) = 0;
  virtual void upload(void* device, const void* host, std::size_t bytes) = 0;
  virtual void download(void* host, const void* device, std::size_t bytes) = 0;
  /// Device to device: `height` rows of `width` bytes, rows `dpitch` / `spitch` bytes apart.
  virtual void copy_2d(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width,
                       std::size_t height) = 0;
  virtual void set_shape(const std::string& graph, const std::string& input, const std::vector<std::int64_t>& dims) = 0;
  virtual void set_address(const std::string& graph, const std::string& tensor, void* device) = 0;
  /// Whether the engine writes `output` into the memory of an input (present.* over past_key_values.*).
  virtual bool aliases(const std::string& graph, const std::string& output) = 0;
  /// Enqueue one run of `graph`. `replayable`: shapes and addresses are those of the last run, so the
  /// runner may replay a captured CUDA graph.
  virtual void run(const std::string& graph, bool replayable) = 0;
  /// Wait for everything enqueued: the one host synchronization of a pass.
  virtual void sync() = 0;
};

class DeviceBackend : public Backend {
 public:
  /// The artifact's manifest (checked, quick digests) and a runner over its engines.
  DeviceBackend(const std::string& artifact_dir, std::unique_ptr<Runner> runner);
  DeviceBackend(Manifest manifest, std::unique_ptr<Runner> runner);
  ~DeviceBackend() override;

  const Contract& contract() const;
  Runner& runner();
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

/// The TensorRT + CUDA runner over the artifact's built engines (graphs.*.engine); only where the
/// library was built with TensorRT, else a one-line Error saying so.
std::unique_ptr<Runner> make_tensorrt_runner(const std::string& artifact_dir, const Manifest& manifest, int device = 0);

/// The ONNX Runtime CUDA-provider runner over the artifact's ONNX graphs; only where the library was
/// built with CUDA (the provider itself is looked up when the runner is made), else a one-line Error.
std::unique_ptr<Runner> make_ort_cuda_runner(const std::string& artifact_dir, const Manifest& manifest, int device = 0);

}  // namespace tidar
