#include "services/cli/plot.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>

#include "core/error.h"

namespace moemesh::cli {

namespace fs = std::filesystem;

void plot_csv(const std::string& body, const fs::path& csv, const fs::path& png) {
  const fs::path script = fs::temp_directory_path() / ("moemesh-plot-" + std::to_string(::getpid()) + ".py");
  {
    std::ofstream s(script);
    s << "import csv, sys\nimport matplotlib\nmatplotlib.use(\"Agg\")\nimport matplotlib.pyplot as plt\n"
         "rows = list(csv.DictReader(open(sys.argv[1])))\n"
      << body << "fig.tight_layout(); fig.savefig(sys.argv[2], dpi=100)\n";
  }
  // Debian's python3 (where apt puts python3-matplotlib), not whatever python3 PATH finds first.
  const std::string python = fs::exists("/usr/bin/python3") ? "/usr/bin/python3" : "python3";
  const std::string cmd = python + " '" + script.string() + "' '" + csv.string() + "' '" + png.string() + "'";
  const int rc = std::system(cmd.c_str());
  fs::remove(script);
  if (rc != 0) throw Error("plotting failed (python3-matplotlib installed? scripts/bootstrap installs it): " + cmd);
}

}  // namespace moemesh::cli
