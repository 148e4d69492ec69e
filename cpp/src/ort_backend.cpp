#include "tidar/ort_backend.h"

#include <onnxruntime_cxx_api.h>

#include <cstring>
#include <filesystem>
#include <map>

#include "tidar/error.h"

namespace tidar {
namespace {

std::size_t element_size(const std::string& dtype) {
  if (dtype == "float32") return 4;
  if (dtype == "float16") return 2;
  throw Error("the ONNX Runtime backend cannot hold " + dtype + " tensors on the host");
}

ONNXTensorElementDataType ort_type(const std::string& dtype) {
  return dtype == "float16" ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  std::uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      std::uint32_t m = mant;
      do ++e, m <<= 1; while (!(m & 0x400));
      bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

/// The preallocated inputs and outputs of one static-shape cached graph, bound once.
struct StaticIo {
  const CachedGraph* graph = nullptr;
  std::vector<std::int64_t> ids, lens, token_ids;
  std::vector<unsigned char> logits;                // [B, rows, V] in the graph's logits dtype
  std::vector<std::vector<unsigned char>> present;  // "slice": [B, kv, new_len, hd] per binding
  std::unique_ptr<Ort::IoBinding> binding;
  std::vector<Ort::Value> values;  // the bound tensors (views of the buffers above)
};

}  // namespace

struct OrtBackend::Impl {
  std::string dir;
  Manifest manifest;
  Contract c;
  OrtOptions options;
  Ort::Env env{ORT_LOGGING_LEVEL_ERROR, "tidar"};
  Ort::SessionOptions session_options;
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::map<std::string, std::unique_ptr<Ort::Session>> sessions;
  std::size_t kv_size = 4, logits_size = 4;
  std::vector<std::vector<unsigned char>> cache;  // one per past_key_values.* binding
  StaticIo step_io, ar_io;
  std::vector<std::int64_t> prefill_ids, prefill_out;
  std::vector<unsigned char> prefill_logits;
  std::vector<float> logits_f32;  // logits handed to the loop (converted when the graph's are float16)

  Ort::Session& session(const std::string& file) {
    auto it = sessions.find(file);
    if (it != sessions.end()) return *it->second;
    const std::string path = (std::filesystem::path(dir) / file).string();
    try {
      auto s = std::make_unique<Ort::Session>(env, path.c_str(), session_options);
      return *(sessions[file] = std::move(s));
    } catch (const Ort::Exception& e) {
      throw Error(path + ": ONNX Runtime cannot load it (" + first_line(e.what()) + ")");
    }
  }

  Ort::Value tensor(void* data, std::size_t bytes, const std::vector<std::int64_t>& shape,
                    ONNXTensorElementDataType type) {
    return Ort::Value::CreateTensor(cpu, data, bytes, shape.data(), shape.size(), type);
  }

  void alloc(StaticIo& io, const CachedGraph& g) {
    const auto B = static_cast<std::size_t>(c.max_batch);
    io.graph = &g;
    io.ids.assign(B * g.width, 0);
    io.lens.assign(B, 0);
    io.token_ids.assign(B * g.rows, 0);
    io.logits.assign(B * g.rows * static_cast<std::size_t>(c.vocab_size) * logits_size, 0);
    if (!g.inplace)
      io.present.assign(c.present_names.size(),
                        std::vector<unsigned char>(B * c.kv_heads * g.new_len * c.head_dim * kv_size, 0));
  }

  /// The I/O binding of a cached graph, made on first use: every buffer it names never moves.
  void bind(StaticIo& io) {
    const CachedGraph& g = *io.graph;
    Ort::Session& s = session(g.file);
    io.binding = std::make_unique<Ort::IoBinding>(s);
    const std::int64_t B = c.max_batch, V = c.vocab_size;
    auto in = [&](const std::string& name, Ort::Value v) {
      io.binding->BindInput(name.c_str(), v);
      io.values.push_back(std::move(v));
    };
    auto out = [&](const std::string& name, Ort::Value v) {
      io.binding->BindOutput(name.c_str(), v);
      io.values.push_back(std::move(v));
    };
    in(g.ids_input, tensor(io.ids.data(), io.ids.size() * 8, {B, g.width}, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
    in(g.len_input, tensor(io.lens.data(), io.lens.size() * 8, {B}, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
    const std::vector<std::int64_t> cache_shape = {B, c.kv_heads, c.max_len, c.head_dim};
    for (std::size_t i = 0; i < c.past_names.size(); ++i)
      in(c.past_names[i], tensor(cache[i].data(), cache[i].size(), cache_shape, ort_type(c.kv_dtype)));
    out("token_ids", tensor(io.token_ids.data(), io.token_ids.size() * 8, {B, g.rows},
                            ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64));
    out("logits", tensor(io.logits.data(), io.logits.size(), {B, g.rows, V}, ort_type(c.logits_dtype)));
    for (std::size_t i = 0; i < c.present_names.size(); ++i) {
      if (g.inplace)  // the past buffers themselves: the graph writes its new slots in place
        out(c.present_names[i], tensor(cache[i].data(), cache[i].size(), cache_shape, ort_type(c.kv_dtype)));
      else
        out(c.present_names[i], tensor(io.present[i].data(), io.present[i].size(),
                                       {B, c.kv_heads, g.new_len, c.head_dim}, ort_type(c.kv_dtype)));
    }
  }

  /// Copy rows of new K/V [rows_in, kv, n, hd] into the cache at (row, slot L) for each batch row.
  void write_kv(const std::vector<unsigned char>& src, std::size_t n, std::size_t batch_row, std::size_t src_row,
                std::size_t L, std::vector<unsigned char>& dst) {
    const std::size_t slot = c.head_dim * kv_size, S = c.max_len;
    for (std::size_t h = 0; h < static_cast<std::size_t>(c.kv_heads); ++h)
      std::memcpy(dst.data() + ((batch_row * c.kv_heads + h) * S + L) * slot,
                  src.data() + ((src_row * c.kv_heads + h) * n) * slot, n * slot);
  }

  const float* logits_of(const void* data, std::size_t count) {
    if (logits_size == 4) return static_cast<const float*>(data);
    logits_f32.resize(count);
    const auto* h = static_cast<const std::uint16_t*>(data);
    for (std::size_t i = 0; i < count; ++i) logits_f32[i] = half_to_float(h[i]);
    return logits_f32.data();
  }

  Outputs run_static(StaticIo& io, const std::vector<std::int64_t>& ids, const std::vector<std::int64_t>& lens,
                     bool want_logits) {
    if (!io.binding) bind(io);
    std::copy(ids.begin(), ids.end(), io.ids.begin());
    std::copy(lens.begin(), lens.end(), io.lens.begin());
    try {
      session(io.graph->file).Run(Ort::RunOptions{nullptr}, *io.binding);
    } catch (const Ort::Exception& e) {
      throw Error(dir + ": ONNX Runtime failed to run " + io.graph->kind + " (" + first_line(e.what()) + ")");
    }
    if (!io.graph->inplace) {
      const auto n = static_cast<std::size_t>(io.graph->new_len);
      for (std::size_t i = 0; i < cache.size(); ++i)
        for (std::size_t row = 0; row < lens.size(); ++row)
          write_kv(io.present[i], n, row, row, static_cast<std::size_t>(lens[row]), cache[i]);
    }
    Outputs out;
    out.token_ids = io.token_ids.data();
    out.rows = io.graph->rows;
    out.vocab = c.vocab_size;
    if (want_logits) out.logits = logits_of(io.logits.data(), io.logits.size() / logits_size);
    return out;
  }

  Outputs prefill(int row, const std::vector<std::int64_t>& prompt, bool want_logits, int keep_rows) {
    Ort::Session& s = session(c.prefill_file);
    prefill_ids = prompt;
    const std::vector<std::int64_t> shape = {1, static_cast<std::int64_t>(prompt.size())};
    Ort::Value input = tensor(prefill_ids.data(), prefill_ids.size() * 8, shape, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
    std::vector<const char*> names = {"token_ids"};
    if (want_logits) names.push_back("logits");
    for (const auto& n : c.present_names) names.push_back(n.c_str());
    const char* in_name = "input_ids";
    std::vector<Ort::Value> res;
    try {
      res = s.Run(Ort::RunOptions{nullptr}, &in_name, &input, 1, names.data(), names.size());
    } catch (const Ort::Exception& e) {
      throw Error(dir + ": ONNX Runtime failed to run prefill (" + first_line(e.what()) + ")");
    }
    const std::size_t first_kv = want_logits ? 2 : 1;
    for (std::size_t i = 0; i < c.present_names.size(); ++i) {
      Ort::Value& v = res[first_kv + i];
      const auto dims = v.GetTensorTypeAndShapeInfo().GetShape();  // [1, kv, P + b, hd]
      const auto T = static_cast<std::size_t>(std::min<std::int64_t>(dims[2], c.max_len));
      const auto* src = static_cast<const unsigned char*>(v.GetTensorRawData());
      const std::size_t slot = c.head_dim * kv_size;
      for (std::size_t h = 0; h < static_cast<std::size_t>(c.kv_heads); ++h)
        std::memcpy(cache[i].data() + ((static_cast<std::size_t>(row) * c.kv_heads + h) * c.max_len) * slot,
                    src + h * static_cast<std::size_t>(dims[2]) * slot, T * slot);
    }
    const std::int64_t* ids = res[0].GetTensorData<std::int64_t>();
    prefill_out.assign(ids, ids + keep_rows);
    Outputs out;
    out.token_ids = prefill_out.data();
    out.rows = keep_rows;
    out.vocab = c.vocab_size;
    if (want_logits) {  // a copy: ONNX Runtime's outputs are freed with `res`
      const std::size_t count = static_cast<std::size_t>(keep_rows) * c.vocab_size;
      const auto* raw = static_cast<const unsigned char*>(res[1].GetTensorRawData());
      prefill_logits.assign(raw, raw + count * logits_size);
      out.logits = logits_of(prefill_logits.data(), count);
    }
    return out;
  }

};

OrtBackend::OrtBackend(const std::string& artifact_dir, OrtOptions options)
    : OrtBackend(artifact_dir, load_manifest(artifact_dir), options) {}

OrtBackend::OrtBackend(const std::string& artifact_dir, Manifest manifest, OrtOptions options)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.dir = py_path(artifact_dir);
  m.manifest = std::move(manifest);
  m.c = contract_of(m.manifest);
  m.options = options;
  m.kv_size = element_size(m.c.kv_dtype);
  m.logits_size = element_size(m.c.logits_dtype);
  m.session_options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
  if (options.intra_op_threads > 0) m.session_options.SetIntraOpNumThreads(options.intra_op_threads);
  m.cache.assign(m.c.past_names.size(), std::vector<unsigned char>(m.c.cache_elems() * m.kv_size, 0));
  m.alloc(m.step_io, m.c.step);
  m.alloc(m.ar_io, m.c.ar_step);
}

OrtBackend::~OrtBackend() = default;

const Manifest& OrtBackend::manifest() const { return impl_->manifest; }
const Contract& OrtBackend::contract() const { return impl_->c; }
int OrtBackend::block_size() const { return impl_->c.block_size; }
const std::vector<int>& OrtBackend::proposals() const { return impl_->c.proposals; }
int OrtBackend::max_len() const { return impl_->c.max_len; }
int OrtBackend::max_batch() const { return impl_->c.max_batch; }
std::int64_t OrtBackend::mask_token_id() const { return impl_->c.mask_token_id; }
std::int64_t OrtBackend::vocab_size() const { return impl_->c.vocab_size; }

Outputs OrtBackend::prefill(int row, const std::vector<std::int64_t>& prompt, bool want_logits) {
  return impl_->prefill(row, prompt, want_logits, impl_->c.block_size);
}

Outputs OrtBackend::step(const std::vector<std::int64_t>& drafts, const std::vector<std::int64_t>& cache_len,
                         bool want_logits) {
  return impl_->run_static(impl_->step_io, drafts, cache_len, want_logits);
}

Outputs OrtBackend::ar_prefill(int row, const std::vector<std::int64_t>& prompt, bool want_logits) {
  return impl_->prefill(row, prompt, want_logits, 1);  // the prefill's first row: AR at the last prompt token
}

Outputs OrtBackend::ar_step(const std::vector<std::int64_t>& tokens, const std::vector<std::int64_t>& cache_len,
                            bool want_logits) {
  return impl_->run_static(impl_->ar_io, tokens, cache_len, want_logits);
}

}  // namespace tidar
