// The TensorRT + CUDA runner of DeviceBackend: one execution context per engine, one stream, device
// memory from cudaMalloc, and CUDA-graph replay of the static passes. Written against TensorRT's
// public C++ API (NvInferRuntime.h) of 10.3 to 11.x and the CUDA runtime API.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <fstream>
#include <iterator>
#include <map>
#include <sstream>

#include "tidar/error.h"
#include "tidar/device_backend.h"

// ICudaEngine::getAliasedInputTensor (an output written into an input's memory, e.g. KVCacheUpdate)
#if NV_TENSORRT_MAJOR > 10 || (NV_TENSORRT_MAJOR == 10 && NV_TENSORRT_MINOR >= 15)
#define TIDAR_TRT_HAS_ALIASING 1
#else
#define TIDAR_TRT_HAS_ALIASING 0
#endif

namespace tidar {
namespace {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw Error(std::string("CUDA: ") + what + " failed (" + cudaGetErrorString(status) + ")");
}

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) last_error = msg;
  }
  std::string last_error;
};

/// One engine and its context; its CUDA graph once captured.
struct Graph {
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
  int eager_runs = 0;
  cudaGraphExec_t exec = nullptr;
  bool capture_failed = false;
};

class TensorRtRunner : public Runner {
 public:
  TensorRtRunner(const std::string& dir, const Manifest& m, int device) {
    check(cudaSetDevice(device), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw Error("TensorRT: cannot create a runtime (" + logger_.last_error + ")");
    for (const auto& kind : m.graph_order) {
      const GraphSpec& g = m.graphs.at(kind);
      if (!g.engine) throw Error(dir + ": no " + kind + " engine in the manifest: run `tidar-export build` first");
      std::ifstream in(dir + "/" + *g.engine, std::ios::binary);
      const std::string blob((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      Graph graph;
      graph.engine.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
      if (!graph.engine)
        throw Error(dir + "/" + *g.engine + ": TensorRT cannot deserialize it (" + logger_.last_error + ")");
      graph.context.reset(graph.engine->createExecutionContext());
      if (!graph.context) throw Error("TensorRT: no execution context for " + kind + " (" + logger_.last_error + ")");
      graphs_[kind] = std::move(graph);
    }
  }

  ~TensorRtRunner() override {
    cudaStreamSynchronize(stream_);
    for (auto& [kind, g] : graphs_)
      if (g.exec) cudaGraphExecDestroy(g.exec);
    graphs_.clear();
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
    nvinfer1::Dims d{};
    d.nbDims = static_cast<std::int32_t>(dims.size());
    for (std::size_t i = 0; i < dims.size(); ++i) d.d[i] = dims[i];
    if (!at(graph).context->setInputShape(input.c_str(), d))
      throw Error("TensorRT: " + graph + " refuses the shape of " + input + " (" + logger_.last_error + ")");
  }
  void set_address(const std::string& graph, const std::string& tensor, void* device) override {
    if (!at(graph).context->setTensorAddress(tensor.c_str(), device))
      throw Error("TensorRT: " + graph + " has no tensor " + tensor + " (" + logger_.last_error + ")");
  }
  bool aliases(const std::string& graph, const std::string& output) override {
#if TIDAR_TRT_HAS_ALIASING
    return at(graph).engine->getAliasedInputTensor(output.c_str()) != nullptr;
#else
    (void)graph, (void)output;
    return false;
#endif
  }

  /// Eager the first time (TensorRT's warm-up before a capture), then captured once and replayed.
  void run(const std::string& graph, bool replayable) override {
    Graph& g = at(graph);
    if (g.exec && replayable) {
      check(cudaGraphLaunch(g.exec, stream_), "cudaGraphLaunch");
      return;
    }
    if (replayable && g.eager_runs > 0 && !g.capture_failed && capture(g)) {
      check(cudaGraphLaunch(g.exec, stream_), "cudaGraphLaunch");
      return;
    }
    if (!g.context->enqueueV3(stream_)) throw Error("TensorRT: " + graph + " failed to run (" + logger_.last_error + ")");
    ++g.eager_runs;
  }

  void sync() override { check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

 private:
  Graph& at(const std::string& graph) {
    auto it = graphs_.find(graph);
    if (it == graphs_.end()) throw Error("TensorRT: no " + graph + " engine");
    return it->second;
  }

  bool capture(Graph& g) {
    cudaGraph_t graph = nullptr;
    if (cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) != cudaSuccess) return g.capture_failed = true, false;
    const bool queued = g.context->enqueueV3(stream_);
    const cudaError_t end = cudaStreamEndCapture(stream_, &graph);
    if (!queued || end != cudaSuccess || cudaGraphInstantiate(&g.exec, graph, 0) != cudaSuccess) {
      if (graph) cudaGraphDestroy(graph);
      cudaGetLastError();  // clear the capture's error: the pass runs eagerly from now on
      g.exec = nullptr;
      g.capture_failed = true;
      return false;
    }
    cudaGraphDestroy(graph);
    return true;
  }

  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::map<std::string, Graph> graphs_;
  std::vector<void*> allocations_;
  cudaStream_t stream_ = nullptr;
};

}  // namespace

std::unique_ptr<Runner> make_tensorrt_runner(const std::string& artifact_dir, const Manifest& manifest, int device) {
  return std::make_unique<TensorRtRunner>(artifact_dir, manifest, device);
}

}  // namespace tidar
