#include "tidar/device_backend.h"

#include <algorithm>
#include <cstring>

#include "tidar/error.h"

namespace tidar {
namespace {

std::size_t element_size(const std::string& dtype) {
  if (dtype == "float32") return 4;
  if (dtype == "float16" || dtype == "bfloat16") return 2;
  if (dtype == "float8e4m3fn" || dtype == "float8_e4m3fn" || dtype == "int8" || dtype == "uint8") return 1;
  throw Error("the device backend cannot hold a " + dtype + " cache");
}

/// The device buffers of one graph and the host copies of what a pass reads back.
struct Io {
  std::string kind;
  int width = 0, rows = 0, new_len = 0;
  bool inplace = false;
  void *ids = nullptr, *lens = nullptr, *token_ids = nullptr, *logits = nullptr;
  std::vector<void*> present;  // "slice" and the prefill: the new K/V
  std::vector<std::int64_t> host_ids;
  std::vector<float> host_logits;
};

}  // namespace

struct DeviceBackend::Impl {
  Manifest manifest;
  Contract c;
  std::unique_ptr<Runner> runner;
  std::size_t kv_size = 0;
  std::vector<void*> cache;
  Io prefill, step, ar;

  std::size_t slot_bytes() const { return static_cast<std::size_t>(c.head_dim) * kv_size; }

  void alloc_outputs(Io& io, int batch, int rows) {
    const auto n = static_cast<std::size_t>(batch) * rows;
    io.token_ids = runner->alloc(n * 8);
    io.logits = runner->alloc(n * static_cast<std::size_t>(c.vocab_size) * 4);
    io.host_ids.assign(n, 0);
    io.host_logits.assign(n * static_cast<std::size_t>(c.vocab_size), 0.0f);
  }

  void setup_cached(Io& io, const CachedGraph& g) {
    const auto B = static_cast<std::size_t>(c.max_batch);
    io.kind = g.kind, io.width = g.width, io.rows = g.rows, io.new_len = g.new_len, io.inplace = g.inplace;
    io.ids = runner->alloc(B * g.width * 8);
    io.lens = runner->alloc(B * 8);
    alloc_outputs(io, c.max_batch, g.rows);
    runner->set_address(g.kind, g.ids_input, io.ids);
    runner->set_address(g.kind, g.len_input, io.lens);
    runner->set_address(g.kind, "token_ids", io.token_ids);
    runner->set_address(g.kind, "logits", io.logits);
    for (std::size_t i = 0; i < cache.size(); ++i) {
      runner->set_address(g.kind, c.past_names[i], cache[i]);
      if (g.inplace) {  // the engine writes its new slots into the cache it reads
        if (!runner->aliases(g.kind, c.present_names[i]))
          throw Error("the " + g.kind + " engine does not alias " + c.present_names[i] + " to " + c.past_names[i] +
                      " as its \"inplace\" kv_update needs: rebuild the engines (tidar-export build)");
        runner->set_address(g.kind, c.present_names[i], cache[i]);
      } else {
        io.present.push_back(runner->alloc(B * c.kv_heads * g.new_len * slot_bytes()));
        runner->set_address(g.kind, c.present_names[i], io.present.back());
      }
    }
  }

  void setup_prefill() {  // sized for the longest prompt a row admits (max_len, in AR mode) plus b mask slots
    prefill.kind = "prefill";
    prefill.rows = c.block_size;
    prefill.ids = runner->alloc(static_cast<std::size_t>(c.max_len) * 8);
    alloc_outputs(prefill, 1, c.block_size);
    runner->set_address("prefill", "input_ids", prefill.ids);
    runner->set_address("prefill", "token_ids", prefill.token_ids);
    runner->set_address("prefill", "logits", prefill.logits);
    const auto slots = static_cast<std::size_t>(c.max_len + c.block_size);
    for (const auto& name : c.present_names) {
      prefill.present.push_back(runner->alloc(static_cast<std::size_t>(c.kv_heads) * slots * slot_bytes()));
      runner->set_address("prefill", name, prefill.present.back());
    }
  }

  Impl(Manifest m, std::unique_ptr<Runner> r) : manifest(std::move(m)), c(contract_of(manifest)), runner(std::move(r)) {
    if (c.logits_dtype != "float32") throw Error("the device backend reads float32 logits, the artifact's are " + c.logits_dtype);
    kv_size = element_size(c.kv_dtype);
    for (std::size_t i = 0; i < c.past_names.size(); ++i) cache.push_back(runner->alloc(c.cache_elems() * kv_size));
    setup_prefill();
    setup_cached(step, c.step);
    setup_cached(ar, c.ar_step);
  }

  /// Row `row`'s `n` new slots at slot L of every cache binding, from new K/V of `src_len` slots per row.
  void write_kv(const std::vector<void*>& src, std::size_t src_row, std::size_t src_len, std::size_t row,
                std::size_t L, std::size_t n) {
    const std::size_t slot = slot_bytes(), S = static_cast<std::size_t>(c.max_len), kv = static_cast<std::size_t>(c.kv_heads);
    for (std::size_t i = 0; i < cache.size(); ++i)
      runner->copy_2d(static_cast<char*>(cache[i]) + (row * kv * S + L) * slot, S * slot,
                      static_cast<const char*>(src[i]) + src_row * kv * src_len * slot, src_len * slot, n * slot, kv);
  }

  Outputs fetch(Io& io, int batch, int rows, int keep_rows, bool want_logits) {
    const auto n = static_cast<std::size_t>(batch) * rows;
    runner->download(io.host_ids.data(), io.token_ids, n * 8);
    if (want_logits) runner->download(io.host_logits.data(), io.logits, n * static_cast<std::size_t>(c.vocab_size) * 4);
    runner->sync();
    Outputs out;
    out.token_ids = io.host_ids.data();
    out.logits = want_logits ? io.host_logits.data() : nullptr;
    out.rows = keep_rows;
    out.vocab = c.vocab_size;
    if (keep_rows != rows) {  // the AR prefill keeps the first row only: compact the copies
      for (int b = 0; b < batch; ++b) {
        std::copy_n(io.host_ids.begin() + b * rows, keep_rows, io.host_ids.begin() + b * keep_rows);
        if (want_logits)
          std::copy_n(io.host_logits.begin() + static_cast<std::size_t>(b) * rows * c.vocab_size,
                      static_cast<std::size_t>(keep_rows) * c.vocab_size,
                      io.host_logits.begin() + static_cast<std::size_t>(b) * keep_rows * c.vocab_size);
      }
    }
    return out;
  }

  Outputs run_prefill(int row, const std::vector<std::int64_t>& prompt, bool want_logits, int keep_rows) {
    const auto P = static_cast<std::int64_t>(prompt.size());
    runner->upload(prefill.ids, prompt.data(), prompt.size() * 8);
    runner->set_shape("prefill", "input_ids", {1, P});
    runner->run("prefill", false);
    const auto T = static_cast<std::size_t>(P + c.block_size);  // present.* are [1, kv, P + b, hd]
    write_kv(prefill.present, 0, T, static_cast<std::size_t>(row), 0, std::min<std::size_t>(T, c.max_len));
    return fetch(prefill, 1, c.block_size, keep_rows, want_logits);
  }

  Outputs run_cached(Io& io, const std::vector<std::int64_t>& ids, const std::vector<std::int64_t>& lens, bool want_logits) {
    runner->upload(io.ids, ids.data(), ids.size() * 8);
    runner->upload(io.lens, lens.data(), lens.size() * 8);
    runner->run(io.kind, true);
    if (!io.inplace)
      for (std::size_t row = 0; row < lens.size(); ++row)
        write_kv(io.present, row, static_cast<std::size_t>(io.new_len), row, static_cast<std::size_t>(lens[row]),
                 static_cast<std::size_t>(io.new_len));
    return fetch(io, c.max_batch, io.rows, io.rows, want_logits);
  }
};

DeviceBackend::DeviceBackend(const std::string& artifact_dir, std::unique_ptr<Runner> runner)
    : DeviceBackend(load_manifest(artifact_dir), std::move(runner)) {}
DeviceBackend::DeviceBackend(Manifest manifest, std::unique_ptr<Runner> runner)
    : impl_(std::make_unique<Impl>(std::move(manifest), std::move(runner))) {}
DeviceBackend::~DeviceBackend() = default;

const Contract& DeviceBackend::contract() const { return impl_->c; }
Runner& DeviceBackend::runner() { return *impl_->runner; }
int DeviceBackend::block_size() const { return impl_->c.block_size; }
const std::vector<int>& DeviceBackend::proposals() const { return impl_->c.proposals; }
int DeviceBackend::max_len() const { return impl_->c.max_len; }
int DeviceBackend::max_batch() const { return impl_->c.max_batch; }
std::int64_t DeviceBackend::mask_token_id() const { return impl_->c.mask_token_id; }
std::int64_t DeviceBackend::vocab_size() const { return impl_->c.vocab_size; }

Outputs DeviceBackend::prefill(int row, const std::vector<std::int64_t>& prompt, bool want_logits) {
  return impl_->run_prefill(row, prompt, want_logits, impl_->c.block_size);
}
Outputs DeviceBackend::ar_prefill(int row, const std::vector<std::int64_t>& prompt, bool want_logits) {
  return impl_->run_prefill(row, prompt, want_logits, 1);
}
Outputs DeviceBackend::step(const std::vector<std::int64_t>& drafts, const std::vector<std::int64_t>& cache_len,
                         bool want_logits) {
  return impl_->run_cached(impl_->step, drafts, cache_len, want_logits);
}
Outputs DeviceBackend::ar_step(const std::vector<std::int64_t>& tokens, const std::vector<std::int64_t>& cache_len,
                            bool want_logits) {
  return impl_->run_cached(impl_->ar, tokens, cache_len, want_logits);
}

}  // namespace tidar
