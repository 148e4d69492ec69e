// JSON figures of one decoded row, the keys and definitions of runtime/stats.py summarize().
#pragma once

#include <vector>

#include "tidar/loop.h"
#include "tidar/pyfmt.h"

namespace tidar {

/// numpy.percentile (linear) of `seconds`, in ms rounded to 3 places: {"p50", "p90", "p99"} (null when empty).
Json percentiles_ms(const std::vector<double>& seconds);

/// Decode tokens/s: the tokens after each row's first over the decode forwards' time; null when zero.
Json tokens_per_s(const std::vector<DecodeResult>& results);

/// new_tokens, finish_reason, forwards, tokens_per_forward, accepted_histogram, prefill_ms, step_ms, tokens_per_s.
Json summarize(const DecodeResult& result);

}  // namespace tidar
