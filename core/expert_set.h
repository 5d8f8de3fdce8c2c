// Sets of (layer, expert) pairs and their text form, as given to `moemesh-expert --experts`.
//
//   all              every routed expert of every MoE layer
//   0:3              expert 3 of layer 0
//   0:0-3            experts 0..3 of layer 0 (inclusive)
//   1:*              every expert of layer 1
//   *:2, 0-1:4-7     a layer part and an expert part may each be N, N-M or *
//
// Items are comma-separated and may repeat or overlap. Parsing checks every item against the
// model (layer ranges, MoE layers, expert ranges) so a typo fails at startup, not at dispatch.
#pragma once
#include <set>
#include <string>
#include <string_view>

#include "core/model_config.h"
#include "core/placement.h"

namespace moemesh {

using ExpertSet = std::set<ExpertKey>;

// Throws moemesh::Error naming the bad item. Wildcards skip dense (non-MoE) layers; naming a
// dense layer explicitly is an error.
ExpertSet parse_expert_spec(std::string_view spec, const ModelConfig& cfg);

// Every routed expert of the model.
ExpertSet all_experts(const ModelConfig& cfg);

// The compact text form ("0:0-3,1:5"), which parse_expert_spec reads back. Empty set -> "".
std::string format_expert_set(const ExpertSet& set);

}  // namespace moemesh
