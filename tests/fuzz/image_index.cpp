// The ImageNet index cache (parse_image_index) of a folder with three class folders: the
// input is the cache file. An index it accepts must name only image files directly inside
// the class folder of their label, so the loader cannot be led out of the data folder.
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
  if (!parse_image_index(in, classes, list).empty()) {
    FUZZ_CHECK(list.paths.empty() && list.labels.empty());
    return 0;
  }
  FUZZ_CHECK(list.labels.size() == list.paths.size());
  for (size_t i = 0; i < list.paths.size(); ++i) {
    FUZZ_CHECK(list.labels[i] >= 0 && list.labels[i] < 3);
    const std::string& cls = classes[list.labels[i]];
    const std::string& p = list.paths[i];
    FUZZ_CHECK(p.size() > cls.size() + 1 && p.compare(0, cls.size(), cls) == 0 && p[cls.size()] == '/');
    const std::string name = p.substr(cls.size() + 1);
    FUZZ_CHECK(name.find('/') == std::string::npos && name != "." && name != "..");
  }
  return 0;
}
