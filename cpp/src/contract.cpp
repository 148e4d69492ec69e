#include "tidar/contract.h"

#include "tidar/error.h"
#include "tidar/layout.h"

namespace tidar {
namespace {

/// The static size of dimension `axis` of a binding (load_manifest has checked that it is one).
int static_dim(const Manifest& m, const TensorSpec& t, std::size_t axis, const std::string& kind) {
  auto shape = m.resolve(t.shape);
  if (axis >= shape.size() || !shape[axis])
    throw Error("graphs." + kind + " " + t.name + " has no static dimension " + std::to_string(axis) +
                ": re-export the artifact");
  return static_cast<int>(*shape[axis]);
}

/// The names of a graph's cache bindings with `prefix`, in the manifest's order.
std::vector<std::string> cache_names(const std::vector<TensorSpec>& specs, const std::string& prefix) {
  std::vector<std::string> names;
  for (const auto& t : specs)
    if (t.name.rfind(prefix + ".", 0) == 0) names.push_back(t.name);
  return names;
}

CachedGraph cached(const Manifest& m, const std::string& kind) {
  const GraphSpec& g = m.graphs.at(kind);
  CachedGraph c;
  c.kind = kind;
  c.file = g.file;
  c.ids_input = ids_input(kind);
  c.width = static_dim(m, *g.input(c.ids_input), 1, kind);
  c.rows = static_cast<int>(g.rows.size());
  c.inplace = m.kv_update_of(kind) == "inplace";
  c.new_len = static_dim(m, *g.output(cache_names(g.outputs, kPresentPrefix).at(0)), 2, kind);
  return c;
}

}  // namespace

Contract contract_of(const Manifest& m) {
  Contract c;
  c.block_size = m.block_size;
  c.proposals = m.proposals;
  c.step_len = m.step_len;
  c.max_len = m.max_seq_len;
  c.max_batch = m.max_batch;
  c.kv_heads = static_cast<int>(m.num_kv_heads);
  c.head_dim = static_cast<int>(m.head_dim);
  c.num_layers = static_cast<int>(m.num_layers);
  c.vocab_size = m.vocab_size;
  c.mask_token_id = m.mask_token_id;
  const GraphSpec& step = m.graphs.at("step");
  c.past_names = cache_names(step.inputs, kPastPrefix);
  c.present_names = cache_names(step.outputs, kPresentPrefix);
  c.prefill_file = m.graphs.at("prefill").file;
  c.kv_dtype = step.input(c.past_names.at(0))->dtype;
  c.logits_dtype = step.output("logits")->dtype;
  c.step = cached(m, "step");
  c.ar_step = cached(m, "ar_step");
  return c;
}

}  // namespace tidar
