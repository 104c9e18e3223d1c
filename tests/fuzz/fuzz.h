// Shared by the fuzz targets. Each target file defines LLVMFuzzerTestOneInput for one parser:
// an input may make the parser throw its own error (std::runtime_error), nothing else; what
// it accepts must satisfy the FUZZ_CHECKs that follow. Anything else -- a crash, another
// exception, a sanitizer report, a failed check -- is a finding.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define FUZZ_CHECK(cond)                                                                   \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      std::fprintf(stderr, "fuzz check failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                        \
    }                                                                                      \
  } while (0)

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);
