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
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
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

// A port no process listens on now, from the system (port 0): tests running in parallel get
// different ones. 20000 + pid * 2 + k collided between tests started a few pids apart.
inline int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in at{};
  at.sin_family = AF_INET;
  at.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  at.sin_port = 0;
  socklen_t size = sizeof at;
  const bool got = fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&at), sizeof at) == 0 &&
                   ::getsockname(fd, reinterpret_cast<sockaddr*>(&at), &size) == 0;
  if (fd >= 0) ::close(fd);
  REQUIRE(got);
  return ntohs(at.sin_port);
}
