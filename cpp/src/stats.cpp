#include "tidar/stats.h"

#include <algorithm>
#include <cmath>

namespace tidar {
namespace {

double round_to(double x, int places) {
  const double scale = std::pow(10.0, places);
  return std::nearbyint(x * scale) / scale;
}

}  // namespace

Json percentiles_ms(const std::vector<double>& seconds) {
  Json out = Json::object();
  std::vector<double> ms;
  for (double s : seconds) ms.push_back(s * 1e3);
  std::sort(ms.begin(), ms.end());
  for (int q : {50, 90, 99}) {
    const std::string key = "p" + std::to_string(q);
    if (ms.empty()) {
      out[key] = nullptr;
      continue;
    }
    const double pos = q / 100.0 * static_cast<double>(ms.size() - 1);
    const auto lo = static_cast<std::size_t>(std::floor(pos));
    const std::size_t hi = std::min(lo + 1, ms.size() - 1);
    out[key] = round_to(ms[lo] + (ms[hi] - ms[lo]) * (pos - static_cast<double>(lo)), 3);
  }
  return out;
}

Json tokens_per_s(const std::vector<DecodeResult>& results) {
  double tokens = 0, seconds = 0;
  for (const auto& r : results) {
    tokens += std::max<double>(0, static_cast<double>(r.tokens.size()) - 1);
    for (double s : r.stats.step_s) seconds += s;
  }
  if (seconds > 0 && tokens > 0) return tokens / seconds;
  return nullptr;
}

Json summarize(const DecodeResult& result) {
  const auto& st = result.stats;
  Json hist = Json::object();
  for (const auto& [k, n] : st.histogram()) hist[std::to_string(k)] = n;
  Json tps = tokens_per_s({result});
  Json out = Json::object();
  out["new_tokens"] = result.tokens.size();
  out["finish_reason"] = result.finish_reason.empty() ? Json(nullptr) : Json(result.finish_reason);
  out["forwards"] = st.forwards();
  out["tokens_per_forward"] = round_to(st.tokens_per_forward(), 3);
  out["accepted_histogram"] = hist;
  out["prefill_ms"] = round_to(st.prefill_s * 1e3, 3);
  out["step_ms"] = percentiles_ms(st.step_s);
  out["tokens_per_s"] = tps.is_null() ? tps : Json(round_to(tps.get<double>(), 2));
  return out;
}

}  // namespace tidar
