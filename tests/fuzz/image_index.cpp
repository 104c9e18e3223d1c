// The ImageNet index cache (parse_image_index) of a folder with three class folders: the
// input is the cache file. An index it accepts must name only image files directly inside
// the class folder of their label (its unreadable images too), so the loader cannot be led out
// of the data folder.
#include <blpa/image_index.h>

#include <sstream>
#include <string>
#include <vector>

#include "fuzz.h"

using namespace blpa::data;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::vector<std::string> classes = {"n01440764", "n01443537", "x"};
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  ImageList list;
  ScanReport report;
  if (!parse_image_index(in, classes, list, &report).empty()) {
    FUZZ_CHECK(list.paths.empty() && list.labels.empty());
    return 0;
  }
  FUZZ_CHECK(list.labels.size() == list.paths.size());
  auto inside_a_class = [](const std::string& p) {  // directly inside one of the class folders
    for (const auto& cls : classes)
      if (p.size() > cls.size() + 1 && p.compare(0, cls.size(), cls) == 0 && p[cls.size()] == '/') {
        const std::string name = p.substr(cls.size() + 1);
        return name.find('/') == std::string::npos && name != "." && name != "..";
      }
    return false;
  };
  for (size_t i = 0; i < list.paths.size(); ++i) {
    FUZZ_CHECK(list.labels[i] >= 0 && list.labels[i] < 3);
    const std::string& cls = classes[list.labels[i]];
    FUZZ_CHECK(list.paths[i].compare(0, cls.size() + 1, cls + "/") == 0 && inside_a_class(list.paths[i]));
  }
  for (const auto& p : report.unreadable) FUZZ_CHECK(inside_a_class(p));
  FUZZ_CHECK(report.files == list.size() && report.skipped >= 0 && report.empty_classes.size() <= classes.size());
  return 0;
}
