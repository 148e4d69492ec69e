// The contract: binding names, row counts and cache-update modes taken from the manifest alone.
#include <gtest/gtest.h>

#include "fixture.h"
#include "tidar/contract.h"
#include "tidar/layout.h"
#include "tidar/manifest.h"

namespace {

using tidar::Json;

tidar::Contract contract(const Json& m) { return tidar::contract_of(tidar::load_manifest(fixture::write(m))); }

TEST(Contract, FromTheManifest) {
  const tidar::Contract c = contract(fixture::manifest());
  EXPECT_EQ(c.past_names, (std::vector<std::string>{"past_key_values.0.key", "past_key_values.0.value"}));
  EXPECT_EQ(c.present_names, (std::vector<std::string>{"present.0.key", "present.0.value"}));
  EXPECT_EQ(c.step_len, 6);
  EXPECT_EQ(c.step.ids_input, "draft_ids");
  EXPECT_EQ(c.step.width, 2);
  EXPECT_EQ(c.step.rows, 4);  // b + R (b - 1) = 2 + 2
  EXPECT_EQ(c.step.new_len, 6);
  EXPECT_FALSE(c.step.inplace);
  EXPECT_EQ(c.ar_step.ids_input, "input_ids");
  EXPECT_EQ(c.ar_step.width, 1);
  EXPECT_EQ(c.ar_step.rows, 1);
  EXPECT_EQ(c.ar_step.new_len, 16);  // inplace: the whole cache
  EXPECT_TRUE(c.ar_step.inplace);
  EXPECT_EQ(c.kv_dtype, "float32");
  EXPECT_EQ(c.cache_elems(), 2u * 1 * 16 * 4);
}

TEST(Contract, EachGraphsOwnKvUpdate) {
  Json m = fixture::manifest();
  m["graphs"]["step"]["kv_update"] = "inplace";
  m["graphs"]["ar_step"]["kv_update"] = "slice";
  for (const char* kind : {"step", "ar_step"})
    for (auto& t : m["graphs"][kind]["outputs"])
      if (t["name"].get<std::string>().rfind("present.", 0) == 0)
        t["shape"][2] = std::string(kind) == "step" ? Json("max_seq_len") : Json(1);
  const tidar::Contract c = contract(m);
  EXPECT_TRUE(c.step.inplace);
  EXPECT_EQ(c.step.new_len, 16);
  EXPECT_FALSE(c.ar_step.inplace);
  EXPECT_EQ(c.ar_step.new_len, 1);
}

TEST(Layout, TheContractsRowsAndBindings) {
  const auto rows = tidar::graph_rows("step", 3, {1, 3});
  ASSERT_EQ(rows.size(), static_cast<std::size_t>(tidar::n_out(3, {1, 3})));
  EXPECT_EQ(rows[2].ar, 2);
  EXPECT_EQ(rows[tidar::block_out_row(3, {1, 3}, 3)].block, 3);
  EXPECT_EQ(rows[tidar::block_out_row(3, {1, 3}, 3)].slot, 1);
  const auto [inputs, outputs] = tidar::graph_io("ar_step", 2, "float16", "slice");
  EXPECT_EQ(inputs.size(), 2u + 4);
  EXPECT_EQ(outputs.back().name, "present.1.value");
  EXPECT_EQ(outputs.back().dtype, "float16");
  EXPECT_EQ(std::get<std::int64_t>(outputs.back().shape[2]), 1);
}

TEST(Layout, RowsOfTheProposalBlocks) {
  EXPECT_EQ(tidar::n_out(4, {1, 2, 3, 4}), 16);
  EXPECT_EQ(tidar::block_out_row(4, {1, 2, 3, 4}, 3), 4 + 2 * 3);
  EXPECT_EQ(tidar::block_out_row(3, {1, 3}, 3), 3 + 2);
  EXPECT_EQ(tidar::step_len(4, {1, 4}), 12);
}

}  // namespace
