// Reading metric values in tests: one series of a prometheus-cpp registry.
#pragma once
#include <string>

#include <prometheus/registry.h>

namespace moemesh::testing {

// The value of one series in the registry's exposition (0 when absent): a counter or gauge by its
// name, a histogram's sample count by <name>_count.
inline double series_value(prometheus::Registry& reg, const std::string& name, const prometheus::Labels& labels) {
  for (const auto& fam : reg.Collect()) {
    for (const auto& m : fam.metric) {
      prometheus::Labels got;
      for (const auto& l : m.label) got[l.name] = l.value;
      if (got != labels) continue;
      if (fam.name == name) return fam.type == prometheus::MetricType::Counter ? m.counter.value : m.gauge.value;
      if (fam.name + "_count" == name) return double(m.histogram.sample_count);
    }
  }
  return 0;
}

}  // namespace moemesh::testing
