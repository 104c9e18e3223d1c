// The main of a fuzz target in the normal build: runs LLVMFuzzerTestOneInput once on each
// file named, or in a folder named (in name order, one level deep). This is how CTest runs the
// committed corpora -- a regression suite that needs neither clang nor libFuzzer. Fails if
// no input was found, so a missing corpus cannot pass.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "fuzz.h"

int main(int argc, char** argv) {
  namespace fs = std::filesystem;
  std::vector<fs::path> inputs;
  for (int i = 1; i < argc; ++i) {
    const fs::path p = argv[i];
    if (!fs::is_directory(p)) {
      inputs.push_back(p);
      continue;
    }
    std::vector<fs::path> in_dir;
    for (const auto& e : fs::directory_iterator(p))
      if (e.is_regular_file()) in_dir.push_back(e.path());
    std::sort(in_dir.begin(), in_dir.end());
    inputs.insert(inputs.end(), in_dir.begin(), in_dir.end());
  }
  for (const auto& p : inputs) {
    std::printf("%s\n", p.c_str());  // before the run, so that a crash is traced to its input
    std::fflush(stdout);
    std::ifstream f(p, std::ios::binary);
    if (!f) {
      std::fprintf(stderr, "cannot read %s\n", p.c_str());
      return 1;
    }
    const std::vector<char> bytes(std::istreambuf_iterator<char>(f), {});
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  }
  std::printf("replayed %zu inputs\n", inputs.size());
  return inputs.empty() ? 1 : 0;
}
