#include "core/planner_search.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <sstream>

#include "core/error.h"

namespace moemesh::planner {

Slo Slo::parse(const std::string& spec) {
  Slo s;
  std::istringstream in(spec);
  std::string item;
  bool any = false;
  while (std::getline(in, item, ',')) {
    const auto eq = item.find('=');
    if (eq == std::string::npos) throw Error("--slo \"" + item + "\": expected NAME=VALUE (e.g. ttft_p99=2s)");
    const std::string name = item.substr(0, eq), value = item.substr(eq + 1);
    double scale = 1;
    std::string num = value;
    if (value.size() > 2 && value.substr(value.size() - 2) == "ms") {
      scale = 1e-3;
      num = value.substr(0, value.size() - 2);
    } else if (!value.empty() && value.back() == 's') {
      num = value.substr(0, value.size() - 1);
    }
    double v = 0;
    try {
      size_t used = 0;
      v = std::stod(num, &used) * scale;
      if (used != num.size() || v <= 0) throw std::invalid_argument(num);
    } catch (const std::exception&) {
      throw Error("--slo \"" + item + "\": \"" + value + "\" is not a positive duration (e.g. 2s, 100ms)");
    }
    std::map<std::string, double*> fields = {
        {"ttft_p50", &s.ttft_p50}, {"ttft_p90", &s.ttft_p90}, {"ttft_p99", &s.ttft_p99}, {"itl_p50", &s.itl_p50},
        {"itl_p90", &s.itl_p90},   {"itl_p99", &s.itl_p99},   {"e2e_p99", &s.e2e_p99}};
    auto it = fields.find(name);
    if (it == fields.end())
      throw Error("--slo: unknown bound \"" + name + "\" (ttft_p50/p90/p99, itl_p50/p90/p99, e2e_p99)");
    *it->second = v;
    any = true;
  }
  if (!any) throw Error("--slo: no bound given");
  return s;
}

double Slo::worst_ratio(const SimResult& r) const {
  const std::pair<double, double> pairs[] = {{r.ttft.p50, ttft_p50}, {r.ttft.p90, ttft_p90}, {r.ttft.p99, ttft_p99},
                                             {r.itl.p50, itl_p50},   {r.itl.p90, itl_p90},   {r.itl.p99, itl_p99},
                                             {r.e2e.p99, e2e_p99}};
  double worst = 0;
  for (auto [got, bound] : pairs)
    if (std::isfinite(bound)) worst = std::max(worst, got / bound);
  return worst;
}

bool Slo::met_by(const SimResult& r) const { return r.unfinished == 0 && r.completed > 0 && worst_ratio(r) <= 1.0; }

std::string Slo::describe() const {
  std::ostringstream o;
  const std::pair<const char*, double> pairs[] = {
      {"ttft_p50", ttft_p50}, {"ttft_p90", ttft_p90}, {"ttft_p99", ttft_p99}, {"itl_p50", itl_p50},
      {"itl_p90", itl_p90},   {"itl_p99", itl_p99},   {"e2e_p99", e2e_p99}};
  for (auto [name, v] : pairs)
    if (std::isfinite(v)) o << (o.tellp() > 0 ? "," : "") << name << "=" << v * 1e3 << "ms";
  return o.str();
}

SearchResult search(const CostProfile& profile, const TrafficSpec& traffic, const ExpertLoad& load, const Slo& slo,
                    const SearchSpace& space, const SimOptions& opts) {
  struct Shape {
    int a, e;
    int nodes;
    double cost;
  };
  std::vector<Shape> shapes;
  for (int a = 1; a <= space.max_attention; ++a)
    for (int e = 1; e <= space.max_experts; ++e) {
      Deployment d = space.base;
      d.attention_workers = a;
      d.expert_hosts = e;
      const int n = d.nodes(profile);
      shapes.push_back({a, e, n, double(n) * profile.node_cost_per_hour});
    }
  std::stable_sort(shapes.begin(), shapes.end(), [](const Shape& x, const Shape& y) {
    return x.cost != y.cost ? x.cost < y.cost : x.a + x.e < y.a + y.e;
  });
  SearchResult out;
  size_t i = 0;
  while (i < shapes.size() && out.evaluated < space.max_evaluations) {
    // One cost level: same cost and the same number of processes.
    size_t j = i;
    while (j < shapes.size() && shapes[j].cost == shapes[i].cost &&
           shapes[j].a + shapes[j].e == shapes[i].a + shapes[i].e)
      ++j;
    std::optional<Candidate> best, best_fail;
    for (size_t k = i; k < j; ++k)
      for (int r : space.replicas) {
        if (r > shapes[k].e) continue;
        for (int mb : space.micro_batches)
          for (int64_t budget : space.step_budgets) {
            if (out.evaluated >= space.max_evaluations) break;
            Candidate c;
            c.dep = space.base;
            c.dep.attention_workers = shapes[k].a;
            c.dep.expert_hosts = shapes[k].e;
            c.dep.replicas = r;
            c.dep.micro_batches = mb;
            c.dep.step_token_budget = budget;
            c.nodes = shapes[k].nodes;
            c.cost_per_hour = shapes[k].cost;
            c.result = simulate(profile, c.dep, traffic, load, opts);
            c.meets = slo.met_by(c.result);
            ++out.evaluated;
            auto& slot = c.meets ? best : best_fail;
            if (!slot || slo.worst_ratio(c.result) < slo.worst_ratio(slot->result)) slot = std::move(c);
          }
      }
    if (best) {
      out.best = std::move(best);
      return out;
    }
    if (best_fail && out.cheapest_failures.size() < 8) out.cheapest_failures.push_back(std::move(*best_fail));
    i = j;
  }
  return out;
}

std::string helm_values(const Candidate& c, const CostProfile& profile, const std::string& slo,
                        const std::string& traffic, const std::string& model_path) {
  const bool gpu = profile.kind == "roofline" || c.dep.nccl;
  const int64_t kv_tokens = c.dep.kv_tokens_per_worker > 0 ? c.dep.kv_tokens_per_worker : profile.kv_tokens_per_worker;
  std::ostringstream o;
  char buf[256];
  o << "# Written by `moemesh plan search` (docs/planner.md). Do not edit by hand: rerun the search.\n";
  o << "# profile: " << profile.name << " (" << profile.kind << ")\n";
  o << "# traffic: " << traffic << "\n# slo: " << slo << "\n";
  o << "# shape: " << c.dep.describe() << "; " << c.nodes << " node(s) at " << c.cost_per_hour << " per hour\n";
  std::snprintf(buf, sizeof buf, "# predicted: %.2f req/s, TTFT p99 %.1f ms, ITL p99 %.1f ms, bottleneck: %s\n",
                c.result.requests_per_s, c.result.ttft.p99 * 1e3, c.result.itl.p99 * 1e3, c.result.bottleneck.c_str());
  o << buf;
  o << "accelerator: " << (gpu ? "nvidia" : "cpu") << "\n";
  if (!model_path.empty()) o << "model:\n  path: \"" << model_path << "\"\n";
  o << "router:\n";
  o << "  expertHosts: " << c.dep.expert_hosts << "\n";
  o << "  expertReplicas: " << c.dep.replicas << "\n";
  o << "  stepTokenBudget: " << c.dep.step_token_budget << "\n";
  o << "attention:\n";
  o << "  replicas: " << c.dep.attention_workers << "\n";
  o << "  microBatches: " << c.dep.micro_batches << "\n";
  o << "  kvBlocks: " << std::max<int64_t>(1, kv_tokens / 16) << "\n";
  if (gpu) o << "  gpus: 1\n";
  o << "expert:\n";
  o << "  poolDefaults:\n";
  if (gpu) o << "    gpus: 1\n";
  o << "    batchWindowUs: " << int64_t(std::llround(c.dep.expert_batch_window_s * 1e6)) << "\n";
  o << "  pools:\n    - name: default\n      replicas: " << c.dep.expert_hosts << "\n";
  return o.str();
}

}  // namespace moemesh::planner
