// blpa-train checkpoints through their public reader: read_checkpoint (the zip records
// against their CRCs, the format and the header), then load_model (the network it names,
// its weights, the finite check). The input is the file, written to a temporary file since
// the reader takes a path. A checkpoint is either loaded or refused with a CheckpointError.
//
// Under libFuzzer a custom mutator rewrites the CRCs of the stored zip records after each
// mutation, so that mutated inputs get past the CRC check to the header and the weights
// (the fixed CRCs are taken from the record sizes as the directory gives them).
#include <blpa/checkpoint.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "fuzz.h"

namespace {

uint64_t le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = v << 8 | p[i];
  return v;
}

void put_le32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// For each central directory entry of a stored record whose local header and data lie
// inside the input, the CRC-32 of the data, written to both headers. Only libFuzzer's
// custom mutator below calls it; the replay build has none.
[[maybe_unused]] void fix_crcs(uint8_t* data, size_t size) {
  for (size_t i = 0; i + 46 <= size; ++i) {
    if (le(data + i, 4) != 0x02014b50) continue;
    const uint8_t* h = data + i;
    const uint64_t local = le(h + 42, 4), compressed = le(h + 20, 4);
    if (le(h + 10, 2) != 0 || local + 30 > size || le(data + local, 4) != 0x04034b50) continue;
    const uint64_t start = local + 30 + le(data + local + 26, 2) + le(data + local + 28, 2);
    if (start > size || compressed > size - start) continue;
    const uint32_t crc = static_cast<uint32_t>(crc32(0, data + start, static_cast<uInt>(compressed)));
    put_le32(data + i + 16, crc);
    put_le32(data + local + 14, crc);
  }
}

std::string temp_path() {
  const char* dir = std::getenv("TMPDIR");
  std::string p = std::string(dir && *dir ? dir : "/tmp") + "/blpa-fuzz-checkpoint-XXXXXX";
  const int fd = ::mkstemp(p.data());
  FUZZ_CHECK(fd >= 0);
  ::close(fd);
  static const std::string keep = p;
  std::atexit([] { ::unlink(keep.c_str()); });
  return p;
}

}  // namespace

#ifdef BLPA_LIBFUZZER
extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);
extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned int seed) {
  size = LLVMFuzzerMutate(data, size, max_size);
  fix_crcs(data, size);
  return size;
}
#endif

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = [] {
    torch::set_num_threads(1);
    return temp_path();
  }();
  FILE* f = std::fopen(path.c_str(), "wb");
  FUZZ_CHECK(f && std::fwrite(data, 1, size, f) == size && std::fclose(f) == 0);
  try {
    const blpa::Checkpoint c = blpa::read_checkpoint(path);
    blpa::ResNet model = blpa::load_model(c);
    FUZZ_CHECK(blpa::all_finite(model));
  } catch (const blpa::CheckpointError&) {
  }
  return 0;
}
