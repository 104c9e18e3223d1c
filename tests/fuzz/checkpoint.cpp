// blpa-train checkpoints through their public reader: read_checkpoint (the zip records
// against their CRCs, the format and the header), then load_model (the network it names,
// its weights, the finite check). The input is the file, written to a temporary file since
// the reader takes a path. A checkpoint is either loaded or refused with a CheckpointError.
//
// Under libFuzzer a custom mutator rewrites the CRCs of the stored zip records after each
// mutation, so that mutated inputs get past the CRC check to the header and the weights
// (zip_crcs.h).
#include <blpa/checkpoint.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "fuzz.h"
#include "zip_crcs.h"

namespace {

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
  blpa_test::fix_zip_crcs(data, size);
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
