// The --experts spec: items, ranges, wildcards, dense layers, errors, and the compact form.
#include <gtest/gtest.h>

#include "core/error.h"
#include "core/expert_set.h"
#include "core/model_presets.h"

using namespace moemesh;

namespace {

ModelConfig mixtral() {  // 2 layers x 8 experts
  ModelConfig c = model_preset(Arch::Mixtral, "tiny");
  c.num_hidden_layers = 2;
  c.num_experts = 8;
  return c;
}

ModelConfig deepseek() {  // layer 0 dense, layers 1..2 MoE with 4 experts
  ModelConfig c = model_preset(Arch::DeepSeek, "tiny");
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.num_experts = 4;
  return c;
}

std::string error_of(std::string_view spec, const ModelConfig& c) {
  try {
    parse_expert_spec(spec, c);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(ExpertSet, ItemsRangesAndWildcards) {
  const auto c = mixtral();
  EXPECT_EQ(parse_expert_spec("0:3", c), (ExpertSet{{0, 3}}));
  EXPECT_EQ(parse_expert_spec("0:0-2, 1:7", c), (ExpertSet{{0, 0}, {0, 1}, {0, 2}, {1, 7}}));
  EXPECT_EQ(parse_expert_spec("1:*", c).size(), 8u);
  EXPECT_EQ(parse_expert_spec("*:2", c), (ExpertSet{{0, 2}, {1, 2}}));
  EXPECT_EQ(parse_expert_spec("0-1:6-7", c), (ExpertSet{{0, 6}, {0, 7}, {1, 6}, {1, 7}}));
  EXPECT_EQ(parse_expert_spec("all", c), all_experts(c));
  EXPECT_EQ(parse_expert_spec("all", c).size(), 16u);
  // Overlaps and repeats are fine.
  EXPECT_EQ(parse_expert_spec("0:0-3,0:2-5,0:5", c).size(), 6u);
  EXPECT_EQ(parse_expert_spec("0:0-3,1:*", c).size(), 12u);
}

TEST(ExpertSet, DenseLayersAreSkippedByWildcardsAndRejectedByName) {
  const auto c = deepseek();
  EXPECT_EQ(parse_expert_spec("all", c).size(), 8u);  // layers 1 and 2
  EXPECT_EQ(parse_expert_spec("*:0", c), (ExpertSet{{1, 0}, {2, 0}}));
  EXPECT_NE(error_of("0:1", c).find("layer 0 is a dense layer"), std::string::npos) << error_of("0:1", c);
  EXPECT_NE(error_of("0-1:1", c).find("dense"), std::string::npos);
}

TEST(ExpertSet, BadSpecsSayWhatIsWrong) {
  const auto c = mixtral();
  EXPECT_NE(error_of("2:0", c).find("layer 2 is out of range"), std::string::npos) << error_of("2:0", c);
  EXPECT_NE(error_of("0:8", c).find("expert 8 is out of range"), std::string::npos);
  EXPECT_NE(error_of("0:0-8", c).find("out of range"), std::string::npos);
  EXPECT_NE(error_of("0:3-1", c).find("is empty"), std::string::npos);
  EXPECT_NE(error_of("0", c).find("expected LAYER:EXPERT"), std::string::npos);
  EXPECT_NE(error_of("0:x", c).find("not a number"), std::string::npos);
  EXPECT_NE(error_of("0:-1", c).find("\"0:-1\""), std::string::npos);
  EXPECT_NE(error_of("0:1,,1:2", c).find("empty item"), std::string::npos);
  EXPECT_NE(error_of("", c).find("empty"), std::string::npos);
  EXPECT_NE(error_of("0:1,", c).find("empty item"), std::string::npos);
  EXPECT_NE(error_of("a:1", c).find("layer"), std::string::npos);
}

TEST(ExpertSet, CompactFormRoundTrips) {
  const auto c = mixtral();
  EXPECT_EQ(format_expert_set({}), "");
  EXPECT_EQ(format_expert_set(parse_expert_spec("0:0-3,0:5,1:*", c)), "0:0-3,0:5,1:0-7");
  for (const char* spec : {"all", "0:1,0:3,1:2-4", "*:7", "1:0"}) {
    const ExpertSet s = parse_expert_spec(spec, c);
    EXPECT_EQ(parse_expert_spec(format_expert_set(s), c), s) << spec;
  }
}
