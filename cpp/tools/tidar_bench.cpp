// tidar-bench: what benchmarks/cpp_speed.py times on the C++ side.
//
//   tidar-bench loop --block-size B --vocab V --accept K --mode tidar|ar [--sampling] [--batch N]
//                    --tokens N --repeats R
//       the loop alone over NullBackend: prints {"us_per_step": median wall time of a decode / forwards}
//   tidar-bench decode ARTIFACT --mode tidar|ar --max-new-tokens N [--threads T]
//       a persistent decoder: reads prompts (comma-separated ids, one per line) from stdin and prints one
//       JSON line per prompt: {"token_ids": [...], "prefill_s": s, "decode_s": sum of the step times,
//       "accepted": [...]} (greedy, no stop id), so that one process serves a whole benchmark.
#include <algorithm>
#include <chrono>
#include <iostream>
#include <map>
#include <sstream>

#include "tidar/null_backend.h"
#include "tidar/tidar.h"

namespace {

std::map<std::string, std::string> options(int argc, char** argv, int first) {
  std::map<std::string, std::string> o;
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--sampling") o[a] = "1";
    else if (a.rfind("--", 0) == 0 && i + 1 < argc) o[a] = argv[++i];
    else o["positional"] = a;
  }
  return o;
}

int loop(const std::map<std::string, std::string>& o) {
  const int b = std::stoi(o.at("--block-size")), batch = o.count("--batch") ? std::stoi(o.at("--batch")) : 1;
  std::vector<int> proposals;
  for (int r = 1; r <= b; ++r) proposals.push_back(r);
  tidar::NullBackend backend(b, proposals, batch, std::stoll(o.at("--vocab")), std::stoi(o.at("--accept")));
  tidar::SamplingParams params;
  if (o.count("--sampling")) params = {1.0, 0, 1.0, 0};
  const std::string mode = o.at("--mode");
  const int tokens = std::stoi(o.at("--tokens")), repeats = std::stoi(o.at("--repeats"));
  std::vector<std::vector<std::int64_t>> prompts(static_cast<std::size_t>(batch), {1, 2, 3});
  tidar::generate_batch(backend, mode, prompts, 8, params);  // warm-up
  std::vector<double> per_step;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    auto res = tidar::generate_batch(backend, mode, prompts, tokens, params);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    int forwards = 1;
    for (const auto& r : res) forwards = std::max(forwards, r.stats.forwards());
    per_step.push_back(dt / forwards);
  }
  std::sort(per_step.begin(), per_step.end());
  std::cout << tidar::Json({{"us_per_step", per_step[per_step.size() / 2] * 1e6}}).dump() << "\n";
  return 0;
}

int decode(const std::map<std::string, std::string>& o) {
  tidar::OrtBackend backend(o.at("positional"), tidar::OrtOptions{o.count("--threads") ? std::stoi(o.at("--threads")) : 0});
  const std::string mode = o.at("--mode");
  const int max_new = std::stoi(o.at("--max-new-tokens"));
  for (std::string line; std::getline(std::cin, line);) {
    std::vector<std::int64_t> prompt;
    std::stringstream ss(line);
    for (std::string id; std::getline(ss, id, ',');)
      if (!id.empty()) prompt.push_back(std::stoll(id));
    const auto r = tidar::generate_batch(backend, mode, {prompt}, max_new)[0];
    double decode_s = 0;
    for (double s : r.stats.step_s) decode_s += s;
    std::cout << tidar::Json({{"token_ids", r.tokens}, {"prefill_s", r.stats.prefill_s}, {"decode_s", decode_s},
                              {"accepted", r.stats.accepted}}).dump()
              << std::endl;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string what = argc > 1 ? argv[1] : "";
    if (what == "loop") return loop(options(argc, argv, 2));
    if (what == "decode") return decode(options(argc, argv, 2));
    std::cerr << "usage: tidar-bench loop|decode ... (see the source's header)\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
  }
  return 1;
}
