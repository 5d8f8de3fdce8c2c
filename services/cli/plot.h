// PNG plots of the CSV files the commands write, drawn by Debian's python3-matplotlib.
#pragma once
#include <filesystem>
#include <string>

namespace moemesh::cli {

// Runs `body`, Python that reads the CSV at sys.argv[1] (rows = its csv.DictReader rows) and draws
// on matplotlib's pyplot as plt, then saves the figure to sys.argv[2]. Throws moemesh::Error,
// naming the command, when Python or matplotlib fails.
void plot_csv(const std::string& body, const std::filesystem::path& csv, const std::filesystem::path& png);

}  // namespace moemesh::cli
