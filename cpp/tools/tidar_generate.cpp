// tidar-generate: the decode loop over an exported artifact, as `tidar-export generate --json`.
//
//   tidar-generate ARTIFACT --prompt-ids IDS [--prompt-ids IDS ...] [--mode tidar|ar]
//                  [--backend ort|ort-cuda|trt] [--max-new-tokens N] [--temperature T] [--top-k K]
//                  [--top-p P] [--seed S] [--stop-ids IDS] [--threads N] [--json]
//
// Each --prompt-ids adds a row of one batch (rows finish independently). With --json, one JSON
// object per row (one line each) with the keys of `tidar-export generate --json`; "text" is null
// (this tool has no tokenizer). --backend: ort (ONNX Runtime CPU, the default), ort-cuda (ONNX
// Runtime's CUDA provider) and trt (the built TensorRT engines) where this build has them.
// Errors: one line "error: ...", exit status 1.
#include <cerrno>
#include <cstdlib>
#include <iostream>
#include <sstream>

#include "tidar/tidar.h"

namespace {

const char* kUsage =
    "usage: tidar-generate ARTIFACT --prompt-ids IDS [--prompt-ids IDS ...] [--mode tidar|ar] [--backend ort|ort-cuda|trt]\n"
    "                      [--max-new-tokens N]"
    "                      [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop-ids IDS] [--threads N] "
    "[--json]\n";

struct Args {
  std::string artifact;
  std::vector<std::vector<std::int64_t>> prompts;
  std::string mode = "tidar";
  std::string backend = "ort";
  long max_new_tokens = 64;
  tidar::SamplingParams params;
  std::optional<std::vector<std::int64_t>> stop_ids;
  int threads = 0;
  bool json = false;
};

tidar::Error arg_error(const std::string& flag, const std::string& message) {
  return tidar::Error("tidar-generate: argument " + flag + ": " + message);
}

/// Python's int(): optional sign, digits (spaces around allowed).
bool parse_int(const std::string& text, long long& out) {
  const char* s = text.c_str();
  char* end = nullptr;
  errno = 0;
  out = std::strtoll(s, &end, 10);
  while (*end == ' ') ++end;
  return !text.empty() && end != s && *end == '\0' && errno == 0;
}

std::vector<std::int64_t> int_list(const std::string& flag, const std::string& text) {
  std::vector<std::int64_t> out;
  std::string cleaned;
  for (char ch : text)
    if (ch != ' ') cleaned += ch;
  std::stringstream ss(cleaned);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    long long v;
    if (!parse_int(item, v))
      throw arg_error(flag, "expected comma-separated integers, got " + tidar::py_str(text));
    out.push_back(v);
  }
  return out;
}

long long int_arg(const std::string& flag, const std::string& text) {
  long long v;
  if (!parse_int(text, v)) throw arg_error(flag, "invalid int value: " + tidar::py_str(text));
  return v;
}

double float_arg(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0') throw arg_error(flag, "invalid float value: " + tidar::py_str(text));
  return v;
}

std::uint64_t seed_arg(const std::string& text) {
  const char* s = text.c_str();
  char* end = nullptr;
  errno = 0;
  if (!text.empty() && text[0] != '-') {
    const unsigned long long v = std::strtoull(s, &end, 10);
    if (end != s && *end == '\0' && errno == 0) return v;
  }
  long long ignored;
  if (!parse_int(text, ignored) && text.find_first_not_of("-0123456789") != std::string::npos)
    throw arg_error("--seed", "invalid int value: " + tidar::py_str(text));
  throw tidar::Error("--seed must be an integer in 0..2**64-1, got " + text);
}

Args parse(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i], value;
    const bool takes_value = flag.rfind("--", 0) == 0 && flag != "--json" && flag != "--help";
    if (takes_value) {
      const auto eq = flag.find('=');
      if (eq != std::string::npos) {
        value = flag.substr(eq + 1);
        flag = flag.substr(0, eq);
      } else {
        if (i + 1 >= argc) throw arg_error(flag, "expected one argument");
        value = argv[++i];
      }
    }
    if (flag == "--help" || flag == "-h") {
      std::cout << kUsage;
      std::exit(0);
    } else if (flag == "--json") a.json = true;
    else if (flag == "--prompt-ids") a.prompts.push_back(int_list(flag, value));
    else if (flag == "--mode") {
      if (value != "tidar" && value != "ar")
        throw arg_error(flag, "invalid choice: " + tidar::py_str(value) + " (choose from 'tidar', 'ar')");
      a.mode = value;
    } else if (flag == "--backend") {
      if (value != "ort" && value != "ort-cuda" && value != "trt")
        throw arg_error(flag, "invalid choice: " + tidar::py_str(value) + " (choose from 'ort', 'ort-cuda', 'trt')");
      a.backend = value;
    } else if (flag == "--max-new-tokens") a.max_new_tokens = static_cast<long>(int_arg(flag, value));
    else if (flag == "--temperature") a.params.temperature = float_arg(flag, value);
    else if (flag == "--top-k") a.params.top_k = int_arg(flag, value);
    else if (flag == "--top-p") a.params.top_p = float_arg(flag, value);
    else if (flag == "--seed") a.params.seed = seed_arg(value);
    else if (flag == "--stop-ids") a.stop_ids = int_list(flag, value);
    else if (flag == "--threads") a.threads = static_cast<int>(int_arg(flag, value));
    else if (flag.rfind("-", 0) == 0 && flag.size() > 1) throw tidar::Error("tidar-generate: unrecognized arguments: " + flag);
    else positional.push_back(flag);
  }
  if (positional.size() != 1)
    throw tidar::Error(positional.empty() ? "tidar-generate: the following arguments are required: artifact"
                                          : "tidar-generate: unrecognized arguments: " + positional[1]);
  a.artifact = positional[0];
  return a;
}

int run(int argc, char** argv) {
  Args a = parse(argc, argv);
  if (a.prompts.empty()) throw tidar::Error("give --prompt-ids IDS");
  if (a.max_new_tokens < 1)
    throw tidar::Error("--max-new-tokens must be at least 1, got " + std::to_string(a.max_new_tokens));
  tidar::check_sampling(a.params);
  if (a.threads < 0) throw tidar::Error("--threads must be at least 0, got " + std::to_string(a.threads));
  const tidar::Manifest m = tidar::load_manifest(a.artifact);
  std::unique_ptr<tidar::Backend> backend;
  if (a.backend == "ort")
    backend = std::make_unique<tidar::OrtBackend>(a.artifact, m, tidar::OrtOptions{a.threads});
  else
    backend = std::make_unique<tidar::DeviceBackend>(
        m, a.backend == "trt" ? tidar::make_tensorrt_runner(a.artifact, m) : tidar::make_ort_cuda_runner(a.artifact, m));
  std::set<std::int64_t> stop;
  if (a.stop_ids) stop.insert(a.stop_ids->begin(), a.stop_ids->end());
  else stop.insert(m.eos_ids.begin(), m.eos_ids.end());  // the default: the tokenizer's eos ids (every one stops)
  const auto results = tidar::generate_batch(*backend, a.mode, a.prompts, static_cast<int>(a.max_new_tokens), a.params, stop);
  for (const auto& r : results) {
    tidar::Json report = tidar::Json::object();
    report["mode"] = a.mode;
    report["backend"] = a.backend;
    report["text"] = nullptr;
    report["token_ids"] = r.tokens;
    const tidar::Json summary = tidar::summarize(r);
    for (const auto& [k, v] : summary.items()) report[k] = v;
    if (a.json) {
      std::cout << report.dump() << "\n";
    } else {
      for (std::size_t i = 0; i < r.tokens.size(); ++i) std::cout << (i ? "," : "") << r.tokens[i];
      std::cout << "\n";
      std::cerr << "[" << a.mode << "/" << a.backend << "] " << report["new_tokens"] << " tokens, " << report["tokens_per_forward"]
                << " tokens/forward, " << report["tokens_per_s"] << " tokens/s, finish: "
                << report["finish_reason"].get<std::string>() << "\n";
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const tidar::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
  } catch (const std::exception& e) {  // I/O and library failures: still one line
    std::cerr << "error: " << e.what() << "\n";
  }
  return 1;
}
