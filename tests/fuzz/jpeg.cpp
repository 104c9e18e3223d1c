// The JPEG decode path (decode_jpeg): header, DCT scaling, grey and CMYK conversion. The
// first byte picks the shorter side asked for (0: full size, else 2 x byte pixels); the rest
// is the JPEG. decode_jpeg never throws; an image it returns must be the size it says.
#include <blpa/jpeg.h>

#include <algorithm>

#include "fuzz.h"

using namespace blpa::data;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const int min_short = 2 * data[0];
  const Decoded d = decode_jpeg(data + 1, size - 1, min_short);
  if (d.status != DecodeStatus::ok) {
    FUZZ_CHECK(d.image.rgb.empty() && !d.message.empty());
    return 0;
  }
  const Image& img = d.image;
  FUZZ_CHECK(img.width >= 1 && img.height >= 1);
  FUZZ_CHECK(img.rgb.size() == size_t(img.width) * size_t(img.height) * 3);
  FUZZ_CHECK(size_t(d.full_width) * size_t(d.full_height) <= kMaxJpegPixels);
  FUZZ_CHECK(d.scale_num >= 1 && d.scale_num <= d.scale_denom);
  FUZZ_CHECK(img.width <= d.full_width && img.height <= d.full_height);
  // The scale keeps the shorter side asked for, when the image has it.
  if (std::min(d.full_width, d.full_height) >= min_short) FUZZ_CHECK(std::min(img.width, img.height) >= min_short);
  return 0;
}
