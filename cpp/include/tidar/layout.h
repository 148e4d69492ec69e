// Row layout of the graphs' outputs and the KV binding names (runtime/layout.py).
//
// A step's outputs, per batch row: n_out = b + R * (b - 1) rows,
//   [AR at draft 0 .. AR at draft b-1 | block r_1 slots 1..b-1 | block r_2 slots 1..b-1 | ...].
// The prefill's: b rows, [AR at the last prompt token | mask slots 1..b-1].
#pragma once

#include <string>
#include <vector>

namespace tidar {

inline constexpr const char* kPastPrefix = "past_key_values";
inline constexpr const char* kPresentPrefix = "present";

/// q_len of one decode step: b drafts plus b mask slots per proposal block.
inline int step_len(int block_size, const std::vector<int>& proposals) {
  return block_size * (1 + static_cast<int>(proposals.size()));
}

/// Output rows of the step graph.
inline int n_out(int block_size, const std::vector<int>& proposals) {
  return block_size + static_cast<int>(proposals.size()) * (block_size - 1);
}

/// Output row of slot 1 of proposal block r (slot t is at this row + t - 1); -1 if r is not a level.
inline int block_out_row(int block_size, const std::vector<int>& proposals, int r) {
  for (std::size_t i = 0; i < proposals.size(); ++i)
    if (proposals[i] == r) return block_size + static_cast<int>(i) * (block_size - 1);
  return -1;
}

/// KV binding names of every layer, key before value: "{prefix}.{i}.key", "{prefix}.{i}.value".
inline std::vector<std::string> kv_names(int num_layers, const std::string& prefix) {
  std::vector<std::string> names;
  for (int i = 0; i < num_layers; ++i)
    for (const char* kv : {"key", "value"}) names.push_back(prefix + "." + std::to_string(i) + "." + kv);
  return names;
}

inline std::vector<std::string> past_names(int num_layers) { return kv_names(num_layers, kPastPrefix); }
inline std::vector<std::string> present_names(int num_layers) { return kv_names(num_layers, kPresentPrefix); }

}  // namespace tidar
