#include "tidar/contract.h"

#include "tidar/error.h"
#include "tidar/layout.h"

namespace tidar {
namespace {

Error disagree(const std::string& what) {
  return Error("the manifest disagrees with itself (" + what + "): re-export the artifact");
}

/// The static size of dimension `axis` of a binding, or Error when the manifest leaves it open.
int static_dim(const Manifest& m, const TensorSpec& t, std::size_t axis, const std::string& kind) {
  auto shape = m.resolve(t.shape);
  if (axis >= shape.size() || !shape[axis])
    throw disagree("graphs." + kind + " " + t.name + " has no static dimension " + std::to_string(axis));
  return static_cast<int>(*shape[axis]);
}

CachedGraph cached(const Manifest& m, const std::string& kind, const std::string& ids_input, int width, int rows) {
  const GraphSpec& g = m.graphs.at(kind);
  CachedGraph c;
  c.kind = kind;
  c.file = g.file;
  c.ids_input = ids_input;
  c.width = static_dim(m, *g.input(ids_input), 1, kind);
  c.rows = static_dim(m, *g.output("token_ids"), 1, kind);
  if (c.width != width) throw disagree("graphs." + kind + " " + ids_input + " has width " + std::to_string(c.width) +
                                       ", the layout " + std::to_string(width));
  if (c.rows != rows) throw disagree("graphs." + kind + " token_ids has " + std::to_string(c.rows) +
                                     " rows, the layout " + std::to_string(rows));
  c.inplace = m.kv_update_of(kind) == "inplace";
  const TensorSpec& present = *g.output(std::string(kPresentPrefix) + ".0.key");
  c.new_len = static_dim(m, present, 2, kind);
  if (c.inplace && c.new_len != m.max_seq_len)
    throw disagree("graphs." + kind + " is inplace but its present.* hold " + std::to_string(c.new_len) + " slots");
  for (const auto& name : past_names(static_cast<int>(m.model.num_layers)))
    if (static_dim(m, *g.input(name), 0, kind) != m.max_batch)
      throw disagree("graphs." + kind + " " + name + " is not of max_batch rows");
  return c;
}

}  // namespace

Contract contract_of(const Manifest& m) {
  Contract c;
  c.block_size = m.block_size;
  c.proposals = m.proposals;
  c.step_len = step_len(m.block_size, m.proposals);
  c.max_len = m.max_seq_len;
  c.max_batch = m.max_batch;
  c.kv_heads = static_cast<int>(m.model.num_kv_heads);
  c.head_dim = static_cast<int>(m.model.head_dim);
  c.num_layers = static_cast<int>(m.model.num_layers);
  c.vocab_size = m.model.vocab_size;
  c.mask_token_id = m.mask_token_id;
  c.past_names = past_names(c.num_layers);
  c.present_names = present_names(c.num_layers);
  c.prefill_file = m.graphs.at("prefill").file;
  c.kv_dtype = m.graphs.at("step").input(c.past_names[0])->dtype;
  c.logits_dtype = m.graphs.at("step").output("logits")->dtype;
  for (const auto& kind : kGraphKinds) {
    const GraphSpec& g = m.graphs.at(kind);
    for (const auto& name : c.present_names)
      if (g.output(name)->dtype != c.kv_dtype) throw disagree("graphs." + kind + " " + name + " is not " + c.kv_dtype);
    if (g.output("logits")->dtype != c.logits_dtype)
      throw disagree("graphs." + kind + " logits is not " + c.logits_dtype);
  }
  c.step = cached(m, "step", "draft_ids", m.block_size, n_out(m.block_size, m.proposals));
  c.ar_step = cached(m, "ar_step", "input_ids", 1, 1);
  if (!c.step.inplace && c.step.new_len != c.step_len)
    throw disagree("graphs.step present.* hold " + std::to_string(c.step.new_len) + " slots, a step writes " +
                   std::to_string(c.step_len));
  return c;
}

}  // namespace tidar
