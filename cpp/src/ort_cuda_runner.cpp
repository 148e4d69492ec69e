// The ONNX Runtime CUDA-provider runner of DeviceBackend (runtime/backends/ort_cuda.py): the ONNX
// graphs on the CUDA execution provider, on the runner's own stream (user_compute_stream), without
// a synchronization at the end of each run (disable_synchronize_execution_providers): the backend
// synchronizes once per pass. Buffers are cudaMalloc'ed and bound by address (I/O binding); a
// graph's binding is rebuilt only when a shape or an address changed (the prefill's prompt length).
// "inplace" graphs: ONNX Runtime writes the new slots into a present.* buffer bound to its
// past_key_values.* buffer (GroupQueryAttention finds the shared buffer by address).
#include <cuda_runtime_api.h>
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_run_options_config_keys.h>

#include <filesystem>
#include <map>

#include "tidar/device_backend.h"
#include "tidar/error.h"

namespace tidar {
namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw Error(std::string("CUDA: ") + what + " failed (" + cudaGetErrorString(status) + ")");
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

ONNXTensorElementDataType onnx_type(const std::string& dtype) {
  if (dtype == "float32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (dtype == "float16") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (dtype == "bfloat16") return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  if (dtype == "int64") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  if (dtype == "int32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
  throw Error("the ONNX Runtime CUDA runner cannot bind " + dtype + " tensors");
}

std::size_t dtype_size(const std::string& dtype) {
  return dtype == "int64" ? 8 : dtype == "float32" || dtype == "int32" ? 4 : 2;
}

struct Bound {
  std::unique_ptr<Ort::IoBinding> binding;
  std::vector<Ort::Value> values;
  bool dirty = true;
};

class OrtCudaRunner : public Runner {
 public:
  OrtCudaRunner(const std::string& dir, const Manifest& m, int device)
      : dir_(dir), manifest_(m), memory_("Cuda", OrtDeviceAllocator, device, OrtMemTypeDefault) {
    check(cudaSetDevice(device), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    const OrtApi& api = Ort::GetApi();
    OrtCUDAProviderOptionsV2* cuda = nullptr;
    try {
      Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
      const std::string id = std::to_string(device);
      const char* keys[] = {"device_id"};
      const char* values[] = {id.c_str()};
      Ort::ThrowOnError(api.UpdateCUDAProviderOptions(cuda, keys, values, 1));
      Ort::ThrowOnError(api.UpdateCUDAProviderOptionsWithValue(cuda, "user_compute_stream", stream_));
      options_.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
      options_.AppendExecutionProvider_CUDA_V2(*cuda);
      api.ReleaseCUDAProviderOptions(cuda);
    } catch (const Ort::Exception& e) {
      if (cuda) api.ReleaseCUDAProviderOptions(cuda);
      throw Error("ONNX Runtime's CUDA provider is not available (" + first_line(e.what()) +
                  "): install onnxruntime-gpu's library, or use the CPU backend");
    }
    run_options_.AddConfigEntry(kOrtRunOptionsConfigDisableSynchronizeExecutionProviders, "1");
  }

  ~OrtCudaRunner() override {
    cudaStreamSynchronize(stream_);
    bound_.clear();
    sessions_.clear();
    for (void* p : allocations_) cudaFree(p);
    cudaStreamDestroy(stream_);
  }

  void* alloc(std::size_t bytes) override {
    void* p = nullptr;
    check(cudaMalloc(&p, bytes), "cudaMalloc");
    allocations_.push_back(p);
    check(cudaMemset(p, 0, bytes), "cudaMemset");
    return p;
  }
  void upload(void* device, const void* host, std::size_t bytes) override {
    check(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (to device)");
  }
  void download(void* host, const void* device, std::size_t bytes) override {
    check(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync (to host)");
  }
  void copy_2d(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width,
               std::size_t height) override {
    check(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, cudaMemcpyDeviceToDevice, stream_),
          "cudaMemcpy2DAsync");
  }
  void set_shape(const std::string& graph, const std::string& input, const std::vector<std::int64_t>& dims) override {
    auto& shape = shapes_[graph][input];
    if (shape != dims) shape = dims, bound_[graph].dirty = true;
  }
  void set_address(const std::string& graph, const std::string& tensor, void* device) override {
    addresses_[graph][tensor] = device;
    bound_[graph].dirty = true;
  }
  bool aliases(const std::string&, const std::string&) override { return true; }

  void run(const std::string& graph, bool) override {
    Ort::Session& s = session(graph);
    Bound& b = bound_[graph];
    if (b.dirty) bind(graph, s, b);
    try {
      s.Run(run_options_, *b.binding);
    } catch (const Ort::Exception& e) {
      throw Error(dir_ + ": ONNX Runtime failed to run " + graph + " (" + first_line(e.what()) + ")");
    }
  }

  void sync() override { check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

 private:
  Ort::Session& session(const std::string& graph) {
    auto it = sessions_.find(graph);
    if (it != sessions_.end()) return *it->second;
    const std::string path = (std::filesystem::path(dir_) / manifest_.graphs.at(graph).file).string();
    try {
      return *(sessions_[graph] = std::make_unique<Ort::Session>(env_, path.c_str(), options_));
    } catch (const Ort::Exception& e) {
      throw Error(path + ": ONNX Runtime cannot load it (" + first_line(e.what()) + ")");
    }
  }

  /// The named dims of this run: the manifest's fixed ones, the set input shapes' dynamic ones, and
  /// the prefill's K/V length, which covers the prompt and the b mask slots (tidar/layout.h).
  std::map<std::string, std::int64_t> dims_of(const GraphSpec& g) {
    std::map<std::string, std::int64_t> dims;
    for (const auto& [name, value] : manifest_.dims)
      if (value) dims[name] = *value;
    for (const auto& t : g.inputs) {
      auto set = shapes_[g.kind].find(t.name);
      if (set == shapes_[g.kind].end()) continue;
      for (std::size_t i = 0; i < t.shape.size() && i < set->second.size(); ++i)
        if (std::holds_alternative<std::string>(t.shape[i])) dims[std::get<std::string>(t.shape[i])] = set->second[i];
    }
    if (dims.count("prompt_len") && !dims.count("prefill_len"))
      dims["prefill_len"] = dims["prompt_len"] + manifest_.block_size;
    return dims;
  }

  void bind(const std::string& graph, Ort::Session& s, Bound& b) {
    const GraphSpec& g = manifest_.graphs.at(graph);
    auto dims = dims_of(g);
    b.binding = std::make_unique<Ort::IoBinding>(s);
    b.values.clear();
    for (const auto* side : {&g.inputs, &g.outputs}) {
      for (const auto& t : *side) {
        auto address = addresses_[graph].find(t.name);
        if (address == addresses_[graph].end()) continue;  // not a binding the backend feeds or reads
        std::vector<std::int64_t> shape;
        std::size_t count = 1;
        for (const auto& d : t.shape) {
          const std::int64_t v = std::holds_alternative<std::int64_t>(d) ? std::get<std::int64_t>(d)
                                                                          : dims.at(std::get<std::string>(d));
          shape.push_back(v);
          count *= static_cast<std::size_t>(v);
        }
        b.values.push_back(Ort::Value::CreateTensor(memory_, address->second, count * dtype_size(t.dtype), shape.data(),
                                                    shape.size(), onnx_type(t.dtype)));
        if (side == &g.inputs) b.binding->BindInput(t.name.c_str(), b.values.back());
        else b.binding->BindOutput(t.name.c_str(), b.values.back());
      }
    }
    b.dirty = false;
  }

  std::string dir_;
  const Manifest manifest_;  // a copy: the caller moves its own into the backend
  Ort::Env env_{ORT_LOGGING_LEVEL_ERROR, "tidar-cuda"};
  Ort::SessionOptions options_;
  Ort::RunOptions run_options_;
  Ort::MemoryInfo memory_;
  cudaStream_t stream_ = nullptr;
  std::map<std::string, std::unique_ptr<Ort::Session>> sessions_;
  std::map<std::string, std::map<std::string, std::vector<std::int64_t>>> shapes_;
  std::map<std::string, std::map<std::string, void*>> addresses_;
  std::map<std::string, Bound> bound_;
  std::vector<void*> allocations_;
};

}  // namespace

std::unique_ptr<Runner> make_ort_cuda_runner(const std::string& artifact_dir, const Manifest& manifest, int device) {
  return std::make_unique<OrtCudaRunner>(artifact_dir, manifest, device);
}

}  // namespace tidar
