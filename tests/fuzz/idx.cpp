// IDX files, plain or gzip (parse_idx_images, parse_idx_labels). The first byte picks the
// parser: even, images; odd, labels with 1 + byte / 2 classes. The rest is the file.
#include <blpa/formats.h>

#include <stdexcept>

#include "fuzz.h"

using namespace blpa::data;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  try {
    if (data[0] % 2 == 0) {
      const RawImages img = parse_idx_images(data + 1, size - 1, "fuzz-images");
      FUZZ_CHECK(img.channels == 1);
      FUZZ_CHECK(img.height >= 1 && img.height <= kMaxIdxSide && img.width >= 1 && img.width <= kMaxIdxSide);
      FUZZ_CHECK(!img.pixels.empty() && img.pixels.size() % static_cast<size_t>(img.height * img.width) == 0);
    } else {
      const int64_t classes = 1 + data[0] / 2;
      for (int64_t label : parse_idx_labels(data + 1, size - 1, "fuzz-labels", classes))
        FUZZ_CHECK(label >= 0 && label < classes);
    }
  } catch (const std::runtime_error&) {
  }
  return 0;
}
