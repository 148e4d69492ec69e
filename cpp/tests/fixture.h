// A synthetic artifact for the unit tests: a manifest like the exporter writes (1 layer, b = 2,
// proposals [1, 2], batch 2, 16 slots; tests/data/manifest.json) over placeholder graph files, in
// a fresh temp folder.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "tidar/error.h"
#include "tidar/pyfmt.h"

namespace fixture {

using tidar::Json;

inline Json tensor(const std::string& name, const std::string& dtype, Json shape) {
  Json t = Json::object();
  t["name"] = name;
  t["dtype"] = dtype;
  t["shape"] = std::move(shape);
  return t;
}

/// tests/data/manifest.json: a format-2 manifest as the exporter writes it (runtime/manifest.py
/// new_manifest; tests/test_cpp.py checks it against runtime/manifest.schema.json and the Python
/// reader): 1 layer, b = 2, proposals [1, 2], batch 2, 16 slots, vocab 32, eos 30, the step
/// updating the cache by slices and the AR step in place, 1-byte graphs and 3-byte weights.
inline Json manifest() {
  std::ifstream in(std::string(TIDAR_TEST_DATA) + "/manifest.json");
  return Json::parse(in);
}

/// A fresh folder holding `m` as manifest.json and placeholder files (1-byte graphs, 3-byte weights).
inline std::string write(const Json& m) {
  char tmpl[] = "/tmp/tidar-cpp-test-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  for (const char* kind : {"prefill", "step", "ar_step"}) std::ofstream(dir + "/" + kind + ".onnx") << "x";
  std::ofstream(dir + "/weights.bin") << "abc";
  std::ofstream(dir + "/manifest.json") << m.dump(2);
  return dir;
}

/// The message of the Error `fn` throws ("" when it throws none).
template <typename F>
std::string error_of(F fn) {
  try {
    fn();
  } catch (const tidar::Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace fixture
