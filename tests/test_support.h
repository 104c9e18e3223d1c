#pragma once

#include <ATen/Context.h>
#include <blpa/dataset.h>
#include <torch/torch.h>

#include <arpa/inet.h>
#include <ftw.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <random>
#include <string>

// CUDA tests call this first: without a device they print the marker that CTest's
// SKIP_REGULAR_EXPRESSION turns into a visible "Skipped" and return.
#define BLPA_REQUIRE_CUDA()                                                       \
  do {                                                                            \
    if (!torch::cuda::is_available()) {                                           \
      std::cout << "BLPA_SKIP: no CUDA device on this machine" << std::endl;      \
      return;                                                                     \
    }                                                                             \
  } while (0)

// Tests that train on Fashion-MNIST call this first: without Debian's copy they print the
// skip marker and return.
inline bool have_fashion_mnist() {
  if (std::filesystem::exists(blpa::data::kDebianFashionMnist)) return true;
  std::cout << "BLPA_SKIP: dataset-fashion-mnist is not installed (scripts/setup.sh installs it)" << std::endl;
  return false;
}

// LibTorch runs CUDA convolutions in TF32 by default (10-bit mantissa). Tests that compare a
// GPU result with the CPU's at fp32 tolerances turn it off for their duration.
struct NoTF32 {
  bool cudnn = at::globalContext().allowTF32CuDNN(), cublas = at::globalContext().allowTF32CuBLAS();
  NoTF32() {
    at::globalContext().setAllowTF32CuDNN(false);
    at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~NoTF32() {
    at::globalContext().setAllowTF32CuDNN(cudnn);
    at::globalContext().setAllowTF32CuBLAS(cublas);
  }
  NoTF32(const NoTF32&) = delete;
  NoTF32& operator=(const NoTF32&) = delete;
};

// Deletes a directory tree. Not std::filesystem::remove_all: LibTorch 2.11's libtorch.so
// exports a copy of it that jumps to a null pointer, and on some systems calls reach it.
inline void remove_tree(const std::filesystem::path& p) {
  ::nftw(p.c_str(), [](const char* f, const struct stat*, int, struct FTW*) { return std::remove(f); }, 16,
         FTW_DEPTH | FTW_PHYS);
}

// A new, empty folder blpa-<name>-<pid> in the system's temporary folder (emptied if it exists).
inline std::filesystem::path fresh_temp_dir(const std::string& name) {
  auto p = std::filesystem::temp_directory_path() / ("blpa-" + name + "-" + std::to_string(::getpid()));
  remove_tree(p);
  std::filesystem::create_directories(p);
  return p;
}

// A file's bytes ("" if it cannot be read).
inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// A port nothing is bound to now, for a test's rendezvous. Drawn at random below the system's
// ephemeral range (/proc/sys/net/ipv4/ip_local_port_range), where the kernel does not hand
// ports out by itself: a port the system gave us (port 0) was free again when we closed it,
// and the Gloo listeners and connections of a test running beside this one could take it
// before rank 0 listened there (a CI run saw both ranks exit 1). 20000 + pid * 2 + k collided
// between tests started a few pids apart; random draws from ~20,000 ports rarely do.
inline int free_port() {
  int ephemeral = 32768;
  std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> ephemeral;
  const int low = 10000, high = std::max(low + 1000, std::min(ephemeral, 65536));
  static std::mt19937 draw(std::random_device{}() ^ static_cast<unsigned>(::getpid()));
  for (int tries = 0; tries < 200; ++tries) {
    const int port = std::uniform_int_distribution<int>(low, high - 1)(draw);
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    REQUIRE(fd >= 0);
    sockaddr_in at{};
    at.sin_family = AF_INET;
    at.sin_addr.s_addr = htonl(INADDR_ANY);  // taken on any address is taken for the loopback
    at.sin_port = htons(static_cast<uint16_t>(port));
    const bool bound = ::bind(fd, reinterpret_cast<sockaddr*>(&at), sizeof at) == 0;
    ::close(fd);
    if (bound) return port;
  }
  FAIL("no free port in [" << low << ", " << high << ") after 200 draws");
  return 0;
}
