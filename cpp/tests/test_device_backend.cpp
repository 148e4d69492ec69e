// DeviceBackend's buffers, bindings, K/V writes and synchronizations, over a stand-in runner whose
// "device memory" is host memory and whose "engines" compute the token chain of chain.h from the
// bound buffers: the cache holds each slot's token in its K/V, so a K/V written at the wrong slot
// (or a wrong committed length) changes the output.
#include <gtest/gtest.h>

#include <cstring>
#include <map>

#include "chain.h"
#include "fixture.h"
#include "tidar/loop.h"
#include "tidar/device_backend.h"

namespace {

constexpr std::int64_t kMask = 31, kVocab = 32;
constexpr int kB = 2, kSlots = 16, kBatch = 2, kHd = 4, kRows = 4;  // the fixture's manifest

class StandInRunner : public tidar::Runner {
 public:
  bool alias = true;
  int allocations = 0, syncs = 0, copies = 0;
  std::map<std::string, int> runs, replays;

  void* alloc(std::size_t bytes) override {
    ++allocations;
    memory_.emplace_back(bytes, 0);
    return memory_.back().data();
  }
  void upload(void* device, const void* host, std::size_t bytes) override { std::memcpy(device, host, bytes); }
  void download(void* host, const void* device, std::size_t bytes) override { std::memcpy(host, device, bytes); }
  void copy_2d(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width,
               std::size_t height) override {
    ++copies;
    for (std::size_t r = 0; r < height; ++r)
      std::memcpy(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
  }
  void set_shape(const std::string& graph, const std::string& input, const std::vector<std::int64_t>& dims) override {
    shapes_[graph + "/" + input] = dims;
  }
  void set_address(const std::string& graph, const std::string& tensor, void* device) override {
    addresses_[graph + "/" + tensor] = device;
  }
  bool aliases(const std::string&, const std::string&) override { return alias; }
  void sync() override { ++syncs; }

  void run(const std::string& graph, bool replayable) override {
    ++runs[graph];
    replays[graph] += replayable && runs[graph] > 1;
    if (graph == "prefill") prefill();
    else if (graph == "step") step();
    else ar_step();
  }

 private:
  template <typename T>
  T* at(const std::string& graph, const std::string& tensor) {
    return static_cast<T*>(addresses_.at(graph + "/" + tensor));
  }
  void put_kv(float* k, float* v, std::int64_t token) {  // a slot's K/V: [token, 0, 0, 0]
    k[0] = v[0] = static_cast<float>(token);
  }
  void out_row(const std::string& graph, std::size_t row, std::int64_t token) {
    at<std::int64_t>(graph, "token_ids")[row] = token;
    float* logits = at<float>(graph, "logits") + row * kVocab;
    std::fill(logits, logits + kVocab, 0.0f);
    logits[token] = 8.0f;
  }

  void prefill() {
    const auto P = static_cast<int>(shapes_.at("prefill/input_ids")[1]);
    const std::int64_t* ids = at<std::int64_t>("prefill", "input_ids");
    const int T = P + kB;
    for (int s = 0; s < T; ++s)
      put_kv(at<float>("prefill", "present.0.key") + s * kHd, at<float>("prefill", "present.0.value") + s * kHd,
             s < P ? ids[s] : kMask);
    const std::int64_t prev = P > 1 ? ids[P - 2] : 0;
    out_row("prefill", 0, chain::next(ids[P - 1], prev));
    auto roll = chain::drafted(ids[P - 1], prev, kB - 1, P);
    for (int t = 1; t < kB; ++t) out_row("prefill", static_cast<std::size_t>(t), roll[static_cast<std::size_t>(t - 1)]);
  }

  std::int64_t cached(const std::string& graph, int row, int slot) {
    return static_cast<std::int64_t>(at<float>(graph, "past_key_values.0.key")[(row * kSlots + slot) * kHd]);
  }

  void step() {
    const std::int64_t* d_all = at<std::int64_t>("step", "draft_ids");
    const std::int64_t* lens = at<std::int64_t>("step", "cache_len");
    const int q = kB * 3;
    for (int i = 0; i < kBatch; ++i) {
      const int L = static_cast<int>(lens[i]);
      const std::int64_t* d = d_all + i * kB;
      for (int s = 0; s < q; ++s)  // slice: the new K/V, drafts first, then the mask slots
        put_kv(at<float>("step", "present.0.key") + (i * q + s) * kHd,
               at<float>("step", "present.0.value") + (i * q + s) * kHd, s < kB ? d[s] : kMask);
      for (int j = 0; j < kB; ++j)
        out_row("step", static_cast<std::size_t>(i * kRows + j),
                chain::next(d[j], j > 0 ? d[j - 1] : (L > 0 ? cached("step", i, L - 1) : 0)));
      for (int r : {1, 2}) {
        const std::int64_t prev = r >= 2 ? d[r - 2] : (L > 0 ? cached("step", i, L - 1) : 0);
        auto roll = chain::drafted(d[r - 1], prev, kB - 1, L + r);
        for (int t = 1; t < kB; ++t)
          out_row("step", static_cast<std::size_t>(i * kRows + kB + (r - 1) * (kB - 1) + t - 1),
                  roll[static_cast<std::size_t>(t - 1)]);
      }
    }
  }

  void ar_step() {  // inplace: present.* are the cache; the new slot is written at L
    const std::int64_t* ids = at<std::int64_t>("ar_step", "input_ids");
    const std::int64_t* lens = at<std::int64_t>("ar_step", "cache_len");
    EXPECT_EQ(at<float>("ar_step", "present.0.key"), at<float>("ar_step", "past_key_values.0.key"));
    for (int i = 0; i < kBatch; ++i) {
      const int L = static_cast<int>(lens[i]);
      const std::int64_t prev = L > 0 ? cached("ar_step", i, L - 1) : 0;
      put_kv(at<float>("ar_step", "present.0.key") + (i * kSlots + L) * kHd,
             at<float>("ar_step", "present.0.value") + (i * kSlots + L) * kHd, ids[i]);
      out_row("ar_step", static_cast<std::size_t>(i), chain::next(ids[i], prev));
    }
  }

  std::vector<std::vector<unsigned char>> memory_;
  std::map<std::string, void*> addresses_;
  std::map<std::string, std::vector<std::int64_t>> shapes_;
};

tidar::Manifest manifest() { return tidar::load_manifest(fixture::write(fixture::manifest())); }

TEST(DeviceBackend, DecodesTheChainWithOneSyncPerPassAndNoAllocationAfterSetup) {
  auto owned = std::make_unique<StandInRunner>();
  StandInRunner& runner = *owned;
  tidar::DeviceBackend backend(manifest(), std::move(owned));
  const int allocations = runner.allocations;
  const std::vector<std::vector<std::int64_t>> prompts = {{4, 7, 1}, {2, 9}};
  for (const char* mode : {"tidar", "ar"}) {
    const int syncs = runner.syncs, copies = runner.copies;
    auto res = tidar::generate_batch(backend, mode, prompts, 6);
    int steps = 0;
    for (std::size_t i = 0; i < prompts.size(); ++i) {
      EXPECT_EQ(res[i].tokens, chain::continuation(prompts[i], 6)) << mode << " row " << i;
      steps = std::max(steps, res[i].stats.forwards());
    }
    EXPECT_EQ(runner.syncs - syncs, 2 + steps) << mode;  // one per prefill and per step
    // the prefill's K/V: one copy per binding; a slice step's: one per row and binding; inplace: none
    EXPECT_EQ(runner.copies - copies, 2 * 2 + (std::string(mode) == "tidar" ? steps * kBatch * 2 : 0)) << mode;
    if (std::string(mode) == "tidar") {
      auto hist = res[0].stats.histogram();
      EXPECT_TRUE(hist.count(2)) << "no step accepted a draft";
    }
  }
  EXPECT_EQ(runner.allocations, allocations);
  EXPECT_GT(runner.replays["step"], 0);  // the static passes are offered for CUDA-graph replay
  EXPECT_EQ(runner.replays["prefill"], 0);
}

TEST(DeviceBackend, SampledDecodingAtALowTemperatureIsGreedy) {
  tidar::DeviceBackend backend(manifest(), std::make_unique<StandInRunner>());
  auto res = tidar::generate_batch(backend, "tidar", {{4, 7, 1}, {2, 9}}, 6, tidar::SamplingParams{0.01, 0, 1.0, 3});
  EXPECT_EQ(res[0].tokens, chain::continuation({4, 7, 1}, 6));
  EXPECT_EQ(res[1].tokens, chain::continuation({2, 9}, 6));
}

TEST(DeviceBackend, AnArPromptThatFillsTheCache) {
  // AR admits a prompt of max_len - 1 tokens; the prefill graph still writes b mask slots past it
  tidar::DeviceBackend backend(manifest(), std::make_unique<StandInRunner>());
  const std::vector<std::int64_t> prompt(kSlots - 1, 3);
  auto res = tidar::generate_batch(backend, "ar", {prompt}, 4)[0];
  EXPECT_EQ(res.tokens, chain::continuation(prompt, 2));  // the prefill's token and one step's
  EXPECT_EQ(res.finish_reason, "cache_full");
}

TEST(DeviceBackend, InplaceNeedsAnEngineThatAliasesTheCache) {
  auto runner = std::make_unique<StandInRunner>();
  runner->alias = false;
  EXPECT_EQ(fixture::error_of([&] { tidar::DeviceBackend(manifest(), std::move(runner)); }),
            "the ar_step engine does not alias present.0.key to past_key_values.0.key as its \"inplace\" kv_update "
            "needs: rebuild the engines (tidar-export build)");
}

TEST(DeviceBackend, WithoutTensorRtTheRealRunnerSaysSo) {
#ifndef TIDAR_WITH_TENSORRT
  EXPECT_NE(fixture::error_of([] { tidar::make_tensorrt_runner("x", manifest()); }).find("has no TensorRT"),
            std::string::npos);
#endif
}

}  // namespace
