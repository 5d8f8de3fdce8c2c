// `moemesh status`: the cluster as the coordinator sees it.
#include <google/protobuf/util/json_util.h>

#include <iostream>

#include "actors/cluster_status.h"
#include "core/error.h"
#include "services/cli/commands.h"

namespace moemesh::cli {

void add_status(CLI::App& app) {
  auto endpoint = std::make_shared<std::string>("tcp://127.0.0.1:5550");
  auto json = std::make_shared<bool>(false);
  auto timeout_ms = std::make_shared<int>(2000);
  CLI::App* st = app.add_subcommand("status", "Print the cluster: services, health, expert placement, load");
  st->add_option("--router", *endpoint, "coordinator control endpoint")->capture_default_str();
  st->add_option("--timeout-ms", *timeout_ms, "how long to wait for an answer")->capture_default_str();
  st->add_flag("--json", *json, "print the status as JSON");
  st->callback([endpoint, json, timeout_ms] {
    auto s = actors::query_cluster_status(*endpoint, std::chrono::milliseconds(*timeout_ms));
    if (!s) throw Error("no answer from the coordinator at " + *endpoint + " within " + std::to_string(*timeout_ms) + " ms");
    if (*json) {
      std::string out;
      google::protobuf::util::JsonPrintOptions o;
      o.always_print_primitive_fields = true;
      (void)google::protobuf::util::MessageToJsonString(*s, &out, o);
      std::cout << out << "\n";
    } else {
      std::cout << actors::format_cluster_status(*s);
    }
  });
}

}  // namespace moemesh::cli
