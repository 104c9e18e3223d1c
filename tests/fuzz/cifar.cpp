// CIFAR-10/100 binary records (parse_cifar). The first byte picks the format: CIFAR-10,
// CIFAR-100 with fine labels, or with coarse labels; the rest is the file.
#include <blpa/formats.h>

#include <stdexcept>

#include "fuzz.h"

using namespace blpa::data;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  static const CifarFormat formats[] = {kCifar10, kCifar100Fine, kCifar100Coarse};
  const CifarFormat& format = formats[data[0] % 3];
  RawImages out;
  try {
    parse_cifar(data + 1, size - 1, format, "fuzz.bin", out);
  } catch (const std::runtime_error&) {
    return 0;
  }
  FUZZ_CHECK(out.size() > 0);
  FUZZ_CHECK(out.pixels.size() == static_cast<size_t>(out.size() * kCifarPixels));
  FUZZ_CHECK(size - 1 == static_cast<size_t>(out.size() * (format.label_bytes + kCifarPixels)));
  for (int64_t label : out.labels) FUZZ_CHECK(label >= 0 && label < format.num_classes);
  return 0;
}
