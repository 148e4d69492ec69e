// The generator, the sums and the sampling steps against the values numpy and
// tidar_runtime.sampling computed (tests/data/numpy_vectors.json, written by make_vectors.py).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>

#include "tidar/blake2b.h"
#include "tidar/error.h"
#include "tidar/pyfmt.h"
#include "tidar/rng.h"
#include "tidar/sampling.h"

namespace {

const tidar::Json& vectors() {
  static const tidar::Json v = [] {
    std::ifstream in(std::string(TIDAR_TEST_DATA) + "/numpy_vectors.json");
    return tidar::Json::parse(in);
  }();
  return v;
}

double hex_double(const tidar::Json& v) { return std::strtod(v.get<std::string>().c_str(), nullptr); }

TEST(Rng, ReproducesNumpyDefaultRngBitForBit) {
  for (const auto& s : vectors()["streams"]) {
    tidar::Rng rng = tidar::Rng::seeded(std::stoull(s["seed"].get<std::string>()), s["row"].get<std::uint64_t>());
    for (const auto& want : s["random"]) EXPECT_EQ(rng.random(), hex_double(want)) << s["seed"] << "," << s["row"];
  }
}

TEST(Rng, RowsAreDistinctStreams) {
  EXPECT_NE(tidar::Rng::seeded(5, 0).random(), tidar::Rng::seeded(5, 1).random());
}

TEST(Sampling, PairwiseSumEqualsNumpySum) {
  for (const auto& c : vectors()["sums"]) {
    std::vector<double> a;
    for (const auto& x : c["values"]) a.push_back(hex_double(x));
    EXPECT_EQ(tidar::pairwise_sum(a.data(), a.size()), hex_double(c["sum"])) << a.size();
  }
}

TEST(Sampling, ProbsAndSamplesEqualTheRuntimes) {
  for (const auto& c : vectors()["probs"]) {
    std::vector<float> logits;
    for (const auto& x : c["logits"]) logits.push_back(static_cast<float>(hex_double(x)));
    tidar::SamplingParams params{c["temperature"].get<double>(), c["top_k"].get<std::int64_t>(), c["top_p"].get<double>(), 11};
    std::vector<double> p;
    tidar::probs(logits.data(), logits.size(), params, p);
    std::vector<std::size_t> nonzero;
    for (std::size_t i = 0; i < p.size(); ++i)
      if (p[i] != 0.0) nonzero.push_back(i);
    ASSERT_EQ(nonzero, c["nonzero"].get<std::vector<std::size_t>>()) << "top-k / top-p kept other tokens";
    for (std::size_t j = 0; j < nonzero.size(); ++j)  // exp may differ by an ulp between libm and numpy's SIMD
      EXPECT_NEAR(p[nonzero[j]], hex_double(c["probs"][j]), 1e-15);
    tidar::Rng rng = tidar::Rng::seeded(11, 0);
    for (const auto& want : c["samples"]) EXPECT_EQ(tidar::sample(p, rng), want.get<std::int64_t>());
  }
}

TEST(Sampling, ResidualAndAcceptance) {
  std::vector<double> p = {0.5, 0.3, 0.2}, q = {0.2, 0.3, 0.5};
  auto r = tidar::residual(p, q);
  EXPECT_DOUBLE_EQ(r[0], 1.0);
  EXPECT_EQ(r[1], 0.0);
  EXPECT_EQ(tidar::residual(p, p), p);  // nothing to reject: p itself
  tidar::Rng rng = tidar::Rng::seeded(1, 0);
  for (int i = 0; i < 100; ++i) EXPECT_TRUE(tidar::accept_draft(p, q, 0, rng));  // p >= q: always accepted
  int accepted = 0;
  for (int i = 0; i < 4000; ++i) accepted += tidar::accept_draft(p, q, 2, rng);  // p/q = 0.4
  EXPECT_GT(accepted, 1400);
  EXPECT_LT(accepted, 1800);
}

TEST(Sampling, ChecksTheOptionsWithThePythonMessages) {
  auto message = [](tidar::SamplingParams p) {
    try {
      tidar::check_sampling(p);
    } catch (const tidar::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_EQ(message({0.0, 0, 1.0, {}}), "");
  EXPECT_EQ(message({-1.0, 0, 1.0, {}}), "--temperature must be 0 (greedy) or in [0.0001, 10000], got -1.0");
  EXPECT_EQ(message({1e-5, 0, 1.0, {}}), "--temperature must be 0 (greedy) or in [0.0001, 10000], got 1e-05");
  EXPECT_EQ(message({1.0, -2, 1.0, {}}), "--top-k must be an integer >= 0 (0 disables it), got -2");
  EXPECT_EQ(message({1.0, 0, 0.0, {}}), "--top-p must be in (0, 1], got 0.0");
  EXPECT_EQ(message({1.0, 0, NAN, {}}), "--top-p must be in (0, 1], got nan");
}

TEST(PyFmt, FloatsAsPythonReprShowsThem) {
  EXPECT_EQ(tidar::py_float(1.0), "1.0");
  EXPECT_EQ(tidar::py_float(0.1), "0.1");
  EXPECT_EQ(tidar::py_float(1e16), "1e+16");
  EXPECT_EQ(tidar::py_float(123456.5), "123456.5");
  EXPECT_EQ(tidar::py_float(-2.5e-7), "-2.5e-07");
  EXPECT_EQ(tidar::py_float(0.0001), "0.0001");
}

TEST(Blake2b, EqualsHashlib) {
  for (const auto& c : vectors()["blake2b"]) {
    tidar::Blake2b h(16);
    const std::string data = c["data"];
    h.update(data.data(), data.size() / 2);  // in two pieces: the buffering is part of the test
    h.update(data.data() + data.size() / 2, data.size() - data.size() / 2);
    EXPECT_EQ(h.hexdigest(), c["hex"].get<std::string>()) << data.size();
  }
}

}  // namespace
