// List files of "relative/path,label" lines (parse_image_list): the input is the file.
#include <blpa/image_index.h>

#include <sstream>
#include <stdexcept>
#include <string>

#include "fuzz.h"

using namespace blpa::data;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  ImageList list;
  try {
    list = parse_image_list(in, "fuzz.csv", "root");
  } catch (const std::runtime_error&) {
    return 0;
  }
  FUZZ_CHECK(list.size() > 0 && list.labels.size() == list.paths.size());
  FUZZ_CHECK(list.num_classes >= 1 && list.num_classes <= kMaxClasses);
  for (int64_t i = 0; i < list.size(); ++i) {
    FUZZ_CHECK(list.labels[i] >= 0 && list.labels[i] < list.num_classes);
    FUZZ_CHECK(!list.paths[i].empty());
  }
  return 0;
}
