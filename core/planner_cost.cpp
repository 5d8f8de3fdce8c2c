#include "core/planner_cost.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moemesh::planner {
namespace {

nlohmann::json link_json(const LinkCost& l) {
  return {{"latency_s", l.latency_s}, {"bandwidth_Bps", l.bandwidth_Bps}, {"per_message_s", l.per_message_s}};
}

LinkCost link_from(const nlohmann::json& j, const char* name) {
  if (!j.contains(name)) throw Error(std::string("profile: missing link \"") + name + "\"");
  const auto& l = j.at(name);
  LinkCost c{l.value("latency_s", 0.0), l.value("bandwidth_Bps", 1e9), l.value("per_message_s", 0.0)};
  if (c.bandwidth_Bps <= 0) throw Error(std::string("profile: link \"") + name + "\" needs bandwidth_Bps > 0");
  return c;
}

// Solves the small symmetric system a·x = b by Gaussian elimination with partial pivoting.
std::vector<double> solve(std::vector<std::vector<double>> a, std::vector<double> b) {
  const size_t n = b.size();
  for (size_t c = 0; c < n; ++c) {
    size_t p = c;
    for (size_t r = c + 1; r < n; ++r)
      if (std::abs(a[r][c]) > std::abs(a[p][c])) p = r;
    std::swap(a[c], a[p]);
    std::swap(b[c], b[p]);
    if (std::abs(a[c][c]) < 1e-300) continue;  // a feature without signal: its coefficient stays 0
    for (size_t r = 0; r < n; ++r) {
      if (r == c) continue;
      const double f = a[r][c] / a[c][c];
      for (size_t k = c; k < n; ++k) a[r][k] -= f * a[c][k];
      b[r] -= f * b[c];
    }
  }
  std::vector<double> x(n, 0.0);
  for (size_t i = 0; i < n; ++i)
    if (std::abs(a[i][i]) >= 1e-300) x[i] = b[i] / a[i][i];
  return x;
}

}  // namespace

std::vector<double> fit_linear(const std::vector<std::vector<double>>& x, const std::vector<double>& y) {
  if (x.empty() || x.size() != y.size()) throw Error("fit_linear: need as many samples as targets, at least one");
  const size_t k = x[0].size();
  // Costs are never negative: a feature whose coefficient comes out negative is dropped and the
  // rest refitted (a minimal active-set non-negative least squares).
  std::vector<bool> active(k, true);
  for (size_t round = 0; round <= k; ++round) {
    std::vector<std::vector<double>> ata(k, std::vector<double>(k, 0.0));
    std::vector<double> aty(k, 0.0);
    // Features are scaled to unit RMS so that seconds and token counts do not make the system singular.
    std::vector<double> scale(k, 0.0);
    for (const auto& row : x)
      for (size_t i = 0; i < k; ++i) scale[i] += row[i] * row[i];
    for (auto& s : scale) s = s > 0 ? std::sqrt(s / double(x.size())) : 1.0;
    for (size_t n = 0; n < x.size(); ++n)
      for (size_t i = 0; i < k; ++i) {
        if (!active[i]) continue;
        aty[i] += x[n][i] / scale[i] * y[n];
        for (size_t j = 0; j < k; ++j)
          if (active[j]) ata[i][j] += x[n][i] / scale[i] * x[n][j] / scale[j];
      }
    std::vector<double> b = solve(ata, aty);
    bool negative = false;
    for (size_t i = 0; i < k; ++i) {
      b[i] = active[i] ? b[i] / scale[i] : 0.0;
      if (b[i] < 0) {
        active[i] = false;
        negative = true;
      }
    }
    if (!negative) return b;
  }
  return std::vector<double>(k, 0.0);
}

nlohmann::json CostProfile::to_json() const {
  nlohmann::json j = {
      {"name", name},
      {"kind", kind},
      {"note", note},
      {"model", model.to_json()},
      {"attention",
       {{"fixed_s", attn_fixed_s},
        {"per_row_s", attn_per_row_s},
        {"per_ctx_token_s", attn_per_ctx_s},
        {"per_prefill_row_s", attn_per_prefill_row_s},
        {"per_prefill_ctx_token_s", attn_per_prefill_ctx_s}}},
      {"step", {{"fixed_s", step_fixed_s}, {"per_row_s", step_per_row_s}, {"start_s", step_start_s}}},
      {"expert", {{"fixed_s", expert_fixed_s}, {"per_expert_s", expert_per_expert_s}, {"per_row_s", expert_per_row_s}}},
      {"dispatch_overhead_s", dispatch_overhead_s},
      {"router",
       {{"per_token_s", router_per_token_s},
        {"per_request_s", router_per_request_s},
        {"request_cpu_share", router_request_cpu_share}}},
      {"idle_wake", {{"seconds", idle_wake_s}, {"after_s", idle_after_s}, {"decay", idle_wake_decay}}},
      {"kv_store", {{"lookup_s", prefix_lookup_s}, {"put_s", kv_put_s}, {"put_per_block_s", kv_put_per_block_s}}},
      {"step_jitter", step_jitter},
      {"links",
       {{"zmq_local", link_json(zmq_local)},
        {"zmq_remote", link_json(zmq_remote)},
        {"nccl_local", link_json(nccl_local)},
        {"nccl_remote", link_json(nccl_remote)}}},
      {"shared_node_compute", shared_node_compute},
      {"node_cores", node_cores},
      {"activation_bytes", activation_bytes},
      {"kv_bytes_per_token", kv_bytes_per_token},
      {"kv_tokens_per_worker", kv_tokens_per_worker},
      {"node_cost_per_hour", node_cost_per_hour},
      {"gpus_per_node", gpus_per_node},
  };
  if (!calibration.is_null()) j["calibration"] = calibration;
  return j;
}

CostProfile CostProfile::from_json(const nlohmann::json& j) {
  try {
    CostProfile p;
    p.name = j.value("name", "");
    p.kind = j.value("kind", "");
    if (p.kind != "measured" && p.kind != "roofline" && p.kind != "benchmarked")
      throw Error("profile: \"kind\" must be \"measured\", \"benchmarked\" or \"roofline\", got \"" + p.kind + "\"");
    p.note = j.value("note", "");
    p.model = ModelConfig::from_json(j.at("model"), "profile model");
    const auto& a = j.at("attention");
    p.attn_fixed_s = a.at("fixed_s");
    p.attn_per_row_s = a.at("per_row_s");
    p.attn_per_ctx_s = a.at("per_ctx_token_s");
    p.attn_per_prefill_row_s = a.value("per_prefill_row_s", p.attn_per_row_s);
    p.attn_per_prefill_ctx_s = a.value("per_prefill_ctx_token_s", p.attn_per_ctx_s);
    p.step_fixed_s = j.at("step").at("fixed_s");
    p.step_per_row_s = j.at("step").at("per_row_s");
    p.step_start_s = j.at("step").value("start_s", 0.0);
    const auto& e = j.at("expert");
    p.expert_fixed_s = e.at("fixed_s");
    p.expert_per_expert_s = e.at("per_expert_s");
    p.expert_per_row_s = e.at("per_row_s");
    p.dispatch_overhead_s = j.value("dispatch_overhead_s", 0.0);
    if (j.contains("router")) {
      p.router_per_token_s = j["router"].value("per_token_s", 0.0);
      p.router_per_request_s = j["router"].value("per_request_s", 0.0);
      p.router_request_cpu_share = std::max(0.0, j["router"].value("request_cpu_share", 0.0));
    }
    if (j.contains("idle_wake")) {
      p.idle_wake_s = j["idle_wake"].value("seconds", 0.0);
      p.idle_after_s = j["idle_wake"].value("after_s", p.idle_after_s);
      p.idle_wake_decay = j["idle_wake"].value("decay", p.idle_wake_decay);
      if (p.idle_wake_s < 0 || p.idle_after_s < 0) throw Error("profile: idle_wake values must not be negative");
      if (!(p.idle_wake_decay >= 0 && p.idle_wake_decay < 1))
        throw Error("profile: idle_wake.decay must be in [0, 1), not " + std::to_string(p.idle_wake_decay));
    }
    if (j.contains("kv_store")) {
      p.prefix_lookup_s = j["kv_store"].value("lookup_s", 0.0);
      p.kv_put_s = j["kv_store"].value("put_s", 0.0);
      p.kv_put_per_block_s = j["kv_store"].value("put_per_block_s", 0.0);
      if (p.prefix_lookup_s < 0 || p.kv_put_s < 0 || p.kv_put_per_block_s < 0)
        throw Error("profile: kv_store values must not be negative");
    }
    p.step_jitter = j.value("step_jitter", 0.0);
    if (p.step_jitter < 0) throw Error("profile: step_jitter must not be negative");
    const auto& l = j.at("links");
    p.zmq_local = link_from(l, "zmq_local");
    p.zmq_remote = link_from(l, "zmq_remote");
    p.nccl_local = link_from(l, "nccl_local");
    p.nccl_remote = link_from(l, "nccl_remote");
    p.shared_node_compute = j.value("shared_node_compute", false);
    p.node_cores = j.value("node_cores", 1);
    if (p.node_cores < 1) throw Error("profile: node_cores must be at least 1");
    p.router_request_cpu_share = std::min(p.router_request_cpu_share, double(p.node_cores));
    p.activation_bytes = j.value("activation_bytes", int64_t(4));
    p.kv_bytes_per_token = j.value("kv_bytes_per_token", int64_t(0));
    p.kv_tokens_per_worker = j.value("kv_tokens_per_worker", int64_t(16384));
    p.node_cost_per_hour = j.value("node_cost_per_hour", 1.0);
    p.gpus_per_node = j.value("gpus_per_node", 1);
    if (j.contains("calibration")) p.calibration = j["calibration"];
    if (p.gpus_per_node < 1) throw Error("profile: gpus_per_node must be at least 1");
    if (p.kv_tokens_per_worker < 1) throw Error("profile: kv_tokens_per_worker must be at least 1");
    return p;
  } catch (const nlohmann::json::exception& e) {
    throw Error(std::string("profile: ") + e.what());
  }
}

CostProfile CostProfile::load(const std::filesystem::path& file) {
  std::ifstream in(file);
  if (!in) throw Error(file.string() + ": cannot read the profile");
  nlohmann::json j;
  try {
    in >> j;
  } catch (const nlohmann::json::exception& e) {
    throw Error(file.string() + ": not JSON: " + e.what());
  }
  return from_json(j);
}

void CostProfile::save(const std::filesystem::path& file) const {
  std::ofstream out(file);
  if (!out) throw Error(file.string() + ": cannot write the profile");
  out << to_json().dump(2) << "\n";
}

const std::vector<Hardware>& known_hardware() {
  // Vendor datasheets (SXM parts): dense BF16 tensor FLOP/s, HBM bandwidth and size, NVLink per
  // direction, one 400 (A100: 200) Gb/s NIC per GPU. Prices are placeholders of the right order
  // (on-demand cloud, per node of 8): edit node_cost_per_hour in the profile for yours.
  static const std::vector<Hardware> hw = {
      {"h100", 989e12, 3.35e12, 80e9, 450e9, 50e9, 8 * 2.5, 8},
      {"h200", 989e12, 4.8e12, 141e9, 450e9, 50e9, 8 * 3.5, 8},
      {"a100", 312e12, 2.039e12, 80e9, 300e9, 25e9, 8 * 1.5, 8},
  };
  return hw;
}

const Hardware& hardware(const std::string& name) {
  for (const auto& h : known_hardware())
    if (h.name == name) return h;
  throw Error("unknown hardware \"" + name + "\" (known: h100, h200, a100)");
}

namespace {

// The roofline costs at `bw` bytes/s and `flops` FLOP/s achieved, `launch` s per kernel.
CostProfile roofline_at(const ModelConfig& m, const Hardware& hw, double bw, double flops, double launch) {
  const double bf16 = 2;
  const double h = double(m.hidden_size), hd = double(m.head_dim);
  const double attn_params = h * (double(m.num_attention_heads) + 2.0 * double(m.num_key_value_heads)) * hd +
                             double(m.num_attention_heads) * hd * h + h * double(m.num_experts) +
                             3.0 * h * double(m.shared_intermediate_size());
  const double expert_params = 3.0 * h * double(m.moe_intermediate_size);
  const double kv_per_token_layer = 2.0 * double(m.num_key_value_heads) * hd * bf16;
  const double head_params = double(m.vocab_size) * h;

  CostProfile p;
  p.name = hw.name + "-roofline";
  p.kind = "roofline";
  p.note = "roofline, not measured: " + hw.name + " datasheet figures (" + std::to_string(int(hw.mem_bw_Bps / 1e9)) +
           " GB/s HBM, " + std::to_string(int(hw.flops / 1e12)) +
           " TFLOP/s bf16) at 75% of bandwidth and 60% of FLOP/s; memory and compute times added";
  p.model = m;
  p.attn_fixed_s = 6 * launch + attn_params * bf16 / bw;
  p.attn_per_row_s = p.attn_per_prefill_row_s = 2 * attn_params / flops;
  p.attn_per_ctx_s = p.attn_per_prefill_ctx_s =
      kv_per_token_layer / bw + 4 * double(m.num_attention_heads) * hd / flops;
  // lm_head + embedding read, sampling kernels, and the router's step round trip over the network.
  p.step_fixed_s = 10 * launch + head_params * bf16 / bw + 150e-6;
  p.step_per_row_s = 2 * head_params / flops + 2e-6;
  p.expert_fixed_s = 4 * launch;
  p.expert_per_expert_s = expert_params * bf16 / bw;
  p.expert_per_row_s = 2 * expert_params / flops;
  p.dispatch_overhead_s = 20e-6;  // host-side bookkeeping, NCCL/ZeroMQ call overheads
  p.router_per_token_s = 0;       // the router runs on its own CPUs
  p.zmq_local = {30e-6, 5e9, 15e-6};
  p.zmq_remote = {40e-6, std::min(hw.network_Bps, 10e9), 15e-6};
  p.nccl_local = {6e-6, hw.nvlink_Bps, 4e-6};
  p.nccl_remote = {12e-6, hw.network_Bps, 4e-6};
  p.prefix_lookup_s = 2 * p.zmq_remote.seconds(256) + 20e-6;  // a KV store on another node, a miss
  p.shared_node_compute = false;
  p.activation_bytes = 2;
  p.kv_bytes_per_token = int64_t(kv_per_token_layer * double(m.num_hidden_layers));
  // An attention worker's GPU holds the attention side (attention, shared experts, dense layers,
  // embeddings, lm_head) and 90% of the rest for KV.
  const double dense_layers = double(std::min(m.first_k_dense_replace, m.num_hidden_layers));
  const double side_bytes = bf16 * (double(m.num_hidden_layers) * attn_params + 2 * head_params +
                                    dense_layers * 3 * h * double(m.intermediate_size));
  p.kv_tokens_per_worker =
      std::max<int64_t>(1, int64_t((0.9 * hw.mem_bytes - side_bytes) / double(p.kv_bytes_per_token)));
  p.node_cost_per_hour = hw.node_cost_per_hour;
  p.gpus_per_node = hw.gpus_per_node;
  return p;
}

}  // namespace

CostProfile roofline_profile(const ModelConfig& m, const Hardware& hw) {
  // What a well-tuned stack reaches of the peaks (typical of vLLM/SGLang decode kernels).
  return roofline_at(m, hw, 0.75 * hw.mem_bw_Bps, 0.6 * hw.flops, 8e-6);
}

CostProfile gpu_results_profile(const ModelConfig& m, const std::string& text) {
  std::istringstream in(text);
  std::string device, line;
  double bw = 0, flops = 0, fastest_us = 0;
  while (std::getline(in, line)) {
    // "device: NVIDIA H100 80GB HBM3, 132 SMs; measured copy bandwidth (read + write): 2950 GB/s"
    const auto at = line.find("measured copy bandwidth");
    if (line.rfind("device: ", 0) == 0 && at != std::string::npos) {
      device = line.substr(8, line.find(',') - 8);
      bw = std::atof(line.substr(line.find(':', at) + 1).c_str()) * 1e9;
      continue;
    }
    // "| matmul | 4096x4096x4096 w:bf16 | 1234.5 | ... | ... | 650.12 |"
    std::vector<std::string> cells;
    std::istringstream row(line);
    for (std::string c; std::getline(row, c, '|');) {
      const auto b = c.find_first_not_of(' '), e = c.find_last_not_of(' ');
      if (b != std::string::npos) cells.push_back(c.substr(b, e - b + 1));
    }
    if (line.rfind("|", 0) != 0 || cells.size() != 6 || cells[0] == "kernel" || cells[0][0] == '-') continue;
    const double us = std::atof(cells[2].c_str());
    if (us > 0 && (fastest_us == 0 || us < fastest_us)) fastest_us = us;
    if (cells[0] == "matmul" && cells[1].find("w:bf16") != std::string::npos)
      flops = std::max(flops, std::atof(cells[5].c_str()) * 1e12);
  }
  if (device.empty() || bw <= 0) throw Error("GPU results: no \"device: ..., measured copy bandwidth ...\" line");
  if (flops <= 0) throw Error("GPU results: no bf16 matmul row in the kernel table");
  Hardware hw = hardware("h100");
  std::string base = "h100 (no known name in the device's)";
  std::string lower = device;
  for (auto& ch : lower) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  for (const auto& h : known_hardware())
    if (lower.find(h.name) != std::string::npos) hw = h, base = h.name;
  CostProfile p = roofline_at(m, hw, bw, flops, fastest_us > 0 ? fastest_us * 1e-6 : 8e-6);
  p.name = device + "-benchmarked";
  p.kind = "benchmarked";
  char b[400];
  std::snprintf(b, sizeof b,
                "roofline on measured figures from tests/gpu/run.sh: %s, copy bandwidth %.0f GB/s, bf16 matmul "
                "%.1f TFLOP/s, fastest kernel %.1f us; links, memory and price of %s",
                device.c_str(), bw / 1e9, flops / 1e12, fastest_us, base.c_str());
  p.note = b;
  return p;
}

ModelConfig deepseek_moe_16b_config() {
  ModelConfig c;
  c.arch = Arch::DeepSeek;
  c.model_type = "deepseek";
  c.vocab_size = 102400;
  c.hidden_size = 2048;
  c.intermediate_size = 10944;
  c.moe_intermediate_size = 1408;
  c.num_hidden_layers = 28;
  c.num_attention_heads = 16;
  c.num_key_value_heads = 16;
  c.head_dim = 128;
  c.max_position_embeddings = 4096;
  c.num_experts = 64;
  c.num_experts_per_tok = 6;
  c.n_shared_experts = 2;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.norm_topk_prob = false;
  c.torch_dtype = "bfloat16";
  c.eos_token_ids = {100001};
  return c;
}

}  // namespace moemesh::planner
