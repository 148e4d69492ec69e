// A minimal service loop over the TiDAR C++ runtime: open an artifact once, then answer requests
// (here: prompts of token ids read from stdin, one comma-separated line each) with TiDAR decoding.
//
//   echo 5,17,42 | ./tidar-service-example ARTIFACT
#include <iostream>
#include <sstream>

#include "tidar/tidar.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: tidar-service-example ARTIFACT < prompts\n";
    return 1;
  }
  try {
    tidar::OrtBackend backend(argv[1], tidar::OrtOptions{1});  // load and check once, one thread
    std::string line;
    while (std::getline(std::cin, line)) {
      std::vector<std::int64_t> prompt;
      std::stringstream ss(line);
      for (std::string id; std::getline(ss, id, ',');)
        if (!id.empty()) prompt.push_back(std::stoll(id));
      const auto result = tidar::generate_batch(backend, "tidar", {prompt}, 32)[0];
      for (auto t : result.tokens) std::cout << t << " ";
      std::cout << "(" << result.finish_reason << ", " << result.stats.tokens_per_forward() << " tokens/forward)\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
