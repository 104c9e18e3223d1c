#pragma once

#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <iostream>

// CUDA tests call this first: without a device they print the marker that CTest's
// SKIP_REGULAR_EXPRESSION turns into a visible "Skipped" and return.
#define BLPA_REQUIRE_CUDA()                                                       \
  do {                                                                            \
    if (!torch::cuda::is_available()) {                                           \
      std::cout << "BLPA_SKIP: no CUDA device on this machine" << std::endl;      \
      return;                                                                     \
    }                                                                             \
  } while (0)
