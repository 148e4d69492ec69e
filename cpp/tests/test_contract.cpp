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
  EXPECT_EQ(c.step.ids_input, "draft_ids");
  EXPECT_EQ(c.step.rows, 4);  // b + R (b - 1) = 2 + 2
  EXPECT_EQ(c.step.new_len, 6);
  EXPECT_FALSE(c.step.inplace);
  EXPECT_EQ(c.ar_step.ids_input, "input_ids");
  EXPECT_EQ(c.ar_step.rows, 1);
  EXPECT_TRUE(c.ar_step.inplace);  // the graph's own kv_update wins over the manifest's
  EXPECT_EQ(c.kv_dtype, "float32");
  EXPECT_EQ(c.cache_elems(), 2u * 1 * 16 * 4);
}

TEST(Contract, ManifestKvUpdateAppliesWhereAGraphHasNone) {
  Json m = fixture::manifest();
  m["kv_update"] = "inplace";
  m["dims"]["q_len"] = 16;  // inplace graphs return the whole cache
  const tidar::Contract c = contract(m);
  EXPECT_TRUE(c.step.inplace);
}

TEST(Contract, ARowCountThatDisagreesWithTheLayoutSaysReExport) {
  Json m = fixture::manifest();
  m["dims"]["n_out"] = 5;
  EXPECT_EQ(fixture::error_of([&] { contract(m); }),
            "the manifest disagrees with itself (graphs.step token_ids has 5 rows, the layout 4): re-export the artifact");
}

TEST(Layout, RowsOfTheProposalBlocks) {
  EXPECT_EQ(tidar::n_out(4, {1, 2, 3, 4}), 16);
  EXPECT_EQ(tidar::block_out_row(4, {1, 2, 3, 4}, 3), 4 + 2 * 3);
  EXPECT_EQ(tidar::block_out_row(3, {1, 3}, 3), 3 + 2);
  EXPECT_EQ(tidar::step_len(4, {1, 4}), 12);
}

}  // namespace
