// Data parallelism on c10d with Gloo over loopback: ranks as threads of this process (gradient
// averaging, identical weights) and as blpa-train processes (resume, a rank that dies); and
// NCCL with one rank where a GPU is present.
#include <blpa/checkpoint.h>
#include <blpa/distributed.h>
#include <blpa/loader.h>
#include <blpa/resnet.h>
#include <blpa/train.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <fstream>
#include <iostream>
#include <iterator>
#include <regex>
#include <set>
#include <thread>

#include "test_support.h"

namespace fs = std::filesystem;
using blpa::Distributed;
using blpa::DistConfig;

namespace {

// Runs f(rank) for ranks 0..world-1, each in its own thread, and rethrows the first failure.
template <typename F>
void run_ranks(int world, F f) {
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(world);
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      try {
        f(r);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

DistConfig two_ranks(int rank, int port) {
  DistConfig c;
  c.rank = rank, c.world = 2, c.master_port = port, c.timeout = std::chrono::seconds(60);
  return c;
}

blpa::ResNet small_net(blpa::ModeConfig mode) {
  blpa::NetConfig net;
  net.depth = 11;
  net.mode = mode;
  torch::manual_seed(3);
  blpa::ResNet m(net);
  m->train();
  return m;
}

}  // namespace

TEST_CASE("distributed: two ranks with accumulation hold identical gradients and weights over several steps", "[distributed]") {
  auto y = torch::randint(0, 10, {4});
  for (auto mode : {blpa::ModeConfig{blpa::Mode::plain, 8}, blpa::ModeConfig{blpa::Mode::blpa, 4}}) {
    CAPTURE(mode.str());
    std::vector<std::vector<torch::Tensor>> grads(2), weights(2);
    // Built here: LibTorch's generator is shared by threads. Rank 1 starts different, as a
    // rank with another seed would, and receives rank 0's state, as blpa-train does.
    std::vector<blpa::ResNet> nets{small_net(mode), small_net(mode)};
    {
      torch::NoGradGuard g;
      for (auto& q : nets[1]->parameters()) q.add_(1.0);
    }
    const int p = free_port();
    run_ranks(2, [&](int rank) {
      Distributed d(two_ranks(rank, p), "gloo");
      auto& net = nets[rank];
      std::vector<torch::Tensor> state;
      for (const auto& q : net->parameters()) state.push_back(q.detach());
      for (const auto& b : net->buffers()) state.push_back(b);
      d.broadcast(state);
      auto reducer = d.reducer(net->parameters(), 64 << 10);  // small buckets: several all-reduces
      torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.05).momentum(0.9));
      for (int step = 0; step < 4; ++step) {  // each rank on its own data, in 2 accumulated parts
        opt.zero_grad();
        auto xs = torch::linspace(-1, 1, 4 * 3 * 16 * 16).view({4, 3, 16, 16}).add_(rank + step);
        blpa::accumulate_gradients(net, xs, y, 2, nullptr, reducer.get());
        if (step == 0)
          for (const auto& q : net->parameters()) grads[rank].push_back(q.grad().clone());
        opt.step();
        net->constrain_();
      }
      for (const auto& q : net->parameters()) weights[rank].push_back(q.detach().clone());
    });
    bool moved = false;
    auto initial = small_net(mode)->parameters();
    for (size_t i = 0; i < weights[0].size(); ++i) {
      CHECK(torch::equal(grads[0][i], grads[1][i]));
      CHECK(torch::equal(weights[0][i], weights[1][i]));
      moved = moved || !torch::equal(weights[0][i], initial[i]);
    }
    CHECK(moved);
  }
}

TEST_CASE("distributed: the averaged gradient equals the mean of the shards' gradients", "[distributed]") {
  auto x = torch::randn({8, 3, 16, 16});
  auto y = torch::randint(0, 10, {8});
  for (auto mode : {blpa::ModeConfig{blpa::Mode::plain, 8}, blpa::ModeConfig{blpa::Mode::blpa, 4}}) {
    CAPTURE(mode.str());
    std::vector<torch::Tensor> expect;
    for (int r = 0; r < 2; ++r) {
      auto net = small_net(mode);
      blpa::accumulate_gradients(net, x.narrow(0, 4 * r, 4), y.narrow(0, 4 * r, 4), 1);
      auto params = net->parameters();
      for (size_t i = 0; i < params.size(); ++i) {
        if (r == 0) expect.push_back(params[i].grad().clone() / 2);
        else expect[i] += params[i].grad() / 2;
      }
    }
    std::vector<std::vector<torch::Tensor>> grads(2);
    std::vector<blpa::ResNet> nets{small_net(mode), small_net(mode)};  // here: the generator is shared
    const int p = free_port();
    run_ranks(2, [&](int rank) {
      Distributed d(two_ranks(rank, p), "gloo");
      auto& net = nets[rank];
      auto reducer = d.reducer(net->parameters(), 64 << 10);
      blpa::accumulate_gradients(net, x.narrow(0, 4 * rank, 4), y.narrow(0, 4 * rank, 4), 1, nullptr, reducer.get());
      for (const auto& q : net->parameters()) grads[rank].push_back(q.grad().clone());
    });
    for (size_t i = 0; i < expect.size(); ++i) {
      CAPTURE(i);
      CHECK(torch::allclose(grads[0][i], expect[i], 1e-5, 1e-7));
      CHECK(torch::equal(grads[0][i], grads[1][i]));
    }
  }
}

// The ranks part after a run's last collective: each closes its group (as PyTorch's
// destroy_process_group), rank 0 first here, and the other still has its result. NCCL's
// flush is what this is for; Gloo's shutdown is the base class's and needs a GPU to differ.
TEST_CASE("distributed: ranks that close their group after the last collective each have its result", "[distributed]") {
  std::vector<std::vector<std::string>> got(2);
  const int p = free_port();
  run_ranks(2, [&](int rank) {
    Distributed d(two_ranks(rank, p), "gloo");
    if (rank == 1) std::this_thread::sleep_for(std::chrono::milliseconds(200));  // rank 0 leaves first
    got[rank] = d.all_gather(rank == 0 ? "end its export" : "");
    d.close();
    d.close();  // once is enough: a second does nothing
  });
  for (const auto& g : got) CHECK(g == std::vector<std::string>{"end its export", ""});
}

// Rank 1 asked to stop while rank 0 is busy alone (its evaluation): rank 0 hears of it through
// the rendezvous, not at their next collective, with the signal it was asked by; rank 1 sees
// its own stop, and no other rank's.
TEST_CASE("distributed: a rank's stop reaches the others through the rendezvous", "[distributed]") {
  std::array<std::atomic<bool>, 2> mine{};
  std::array<std::atomic<int>, 2> signal{};
  std::array<Distributed::Stops, 2> seen;
  std::array<bool, 2> quiet_before{};
  const int p = free_port();
  run_ranks(2, [&](int rank) {
    Distributed d(two_ranks(rank, p), "gloo", nullptr, &signal[rank]);
    d.watch_stops(&mine[rank], &seen[rank]);
    d.barrier();
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // three rounds of the watch
    quiet_before[rank] = !seen[rank].any.load();
    d.barrier();
    if (rank == 1) signal[1] = SIGTERM, mine[1] = true;  // as take_signals: the signal, then the stop
    for (int i = 0; i < 100 && !(seen[rank].any.load() && seen[rank].signal.load()); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    d.barrier();  // the store stays up until both have looked
  });
  CHECK(quiet_before == std::array<bool, 2>{true, true});
  CHECK(seen[0].any.load());
  CHECK(seen[1].any.load());
  CHECK(seen[0].others.load());
  CHECK_FALSE(seen[1].others.load());  // its own
  CHECK(seen[0].signal.load() == SIGTERM);
  CHECK(seen[1].signal.load() == SIGTERM);
}

// Two runs left at the default port: the second's rank 0 cannot listen, and its rank 1 joined
// the first run's store, where it waited for a collective's timeout (600 s by default) and then
// failed with Gloo's "Timed out waiting ... for send operation".
TEST_CASE("distributed: a run started at a port another run uses fails at once and names the port", "[distributed]") {
  const int port = free_port();
  std::string second_rank0, second_rank1;
  double secs = 0;
  std::vector<std::string> after;
  run_ranks(2, [&](int rank) {
    Distributed d(two_ranks(rank, port), "gloo");
    d.all_gather("joined");
    if (rank == 0) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int r : {0, 1}) {
        try {
          Distributed intruder(two_ranks(r, port), "gloo");
        } catch (const std::exception& e) {
          (r == 0 ? second_rank0 : second_rank1) = e.what();
        }
      }
      secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    const auto all = d.all_gather("still " + std::to_string(rank));  // the first run is unharmed
    if (rank == 0) after = all;
  });
  CAPTURE(second_rank0, second_rank1, secs);
  const std::string p = std::to_string(port);
  CHECK(second_rank0.find("rank 0 of 2: cannot open the rendezvous on port " + p) != std::string::npos);
  CHECK(second_rank0.find("another run may be using that port; give each run its own --master-port") !=
        std::string::npos);
  CHECK(second_rank1.find("rank 1 of 2: more than this run's 2 ranks joined the rendezvous at 127.0.0.1:" + p +
                          ": another run is using that port") != std::string::npos);
  CHECK(secs < 30);  // the timeout is 60 s
  CHECK(after == std::vector<std::string>{"still 0", "still 1"});
}

// Rank 0 alone said it "cannot open the rendezvous", which it had opened.
TEST_CASE("distributed: a rank 0 whose other ranks never come says so after the timeout", "[distributed]") {
  DistConfig c = two_ranks(0, free_port());
  c.timeout = std::chrono::seconds(1);
  std::string why;
  try {
    Distributed alone(c, "gloo");
  } catch (const std::exception& e) {
    why = e.what();
  }
  CAPTURE(why);
  CHECK(why.find("rank 0 of 2: the other ranks did not join the rendezvous at 127.0.0.1:") != std::string::npos);
  CHECK(why.find("within 1 s (not come: rank 1)") != std::string::npos);
  CHECK(why.find("start every rank, with the same --master-addr and --master-port") != std::string::npos);
}

// Three ranks, rank 2 never started: rank 0 times out and closes its store under rank 1,
// which said only c10d's "Failed to recv, got 0 bytes. Connection was likely closed".
TEST_CASE("distributed: a rank whose rank 0 closed the rendezvous says so", "[distributed]") {
  const int port = free_port();
  auto rank = [&](int r, std::chrono::milliseconds timeout) {
    DistConfig c = two_ranks(r, port);
    c.world = 3;
    c.timeout = timeout;
    try {
      Distributed joined(c, "gloo");
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  std::string why0, why1;
  std::thread zero([&] { why0 = rank(0, std::chrono::milliseconds(1500)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  why1 = rank(1, std::chrono::seconds(20));
  zero.join();
  CAPTURE(why0, why1);
  CHECK(why0.find("(not come: rank 2)") != std::string::npos);
  CHECK(why1.find("rank 1 of 3: rank 0 closed the rendezvous (127.0.0.1:") != std::string::npos);
  CHECK(why1.find("before every rank joined: it stopped, or timed out waiting for a rank that did not come") !=
        std::string::npos);
}

// Rank 1 waited about 2.5 times --dist-timeout for a rank 0 that never came (TCPStore's client).
TEST_CASE("distributed: a rank whose rank 0 never comes says so within the timeout", "[distributed]") {
  DistConfig c = two_ranks(1, free_port());
  c.timeout = std::chrono::milliseconds(1500);
  std::string why;
  const auto start = std::chrono::steady_clock::now();
  try {
    Distributed alone(c, "gloo");
  } catch (const std::exception& e) {
    why = e.what();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CAPTURE(why, seconds);
  CHECK(why.find("rank 1 of 2: no rendezvous at 127.0.0.1:") != std::string::npos);
  CHECK(why.find("within 1500 ms (rank 0 is not listening): start every rank, with the same --master-addr and "
                 "--master-port") != std::string::npos);
  CHECK(seconds >= 1.4);
  CHECK(seconds < 3.0);  // the limit, and not 2.5 times it: generous for a loaded machine
}

// Something else listening at the port that never answers (another program, a hung process):
// TCPStore's client waited for its answer for good.
TEST_CASE("distributed: a rank whose port has a silent listener says so after the timeout", "[distributed]") {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  REQUIRE(::listen(fd, 8) == 0);  // connections are taken by the kernel, never accepted or answered
  socklen_t len = sizeof a;
  REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0);
  DistConfig c = two_ranks(1, ntohs(a.sin_port));
  c.timeout = std::chrono::seconds(1);
  std::string why;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    Distributed d(c, "gloo");
  } catch (const std::exception& e) {
    why = e.what();
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // Nor does a refusing rank stay there past its grace.
  const auto t1 = std::chrono::steady_clock::now();
  Distributed::refuse(c, "2--depth 12", std::chrono::seconds(1));
  const double refusing = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  ::close(fd);
  CAPTURE(why, secs, refusing);
  CHECK(refusing < 5);
  CHECK(why.find("rank 1 of 2: something listens at 127.0.0.1:") != std::string::npos);
  CHECK(why.find(" but does not answer as a rendezvous within 1 s: another program may be using that port") !=
        std::string::npos);
  CHECK(secs < 20);
}

// Ctrl-C at the rendezvous: blpa-train said it would stop "after the current step" and went on
// waiting for the other ranks until --dist-timeout.
TEST_CASE("distributed: a signal ends the wait at the rendezvous", "[distributed]") {
  for (const int rank : {0, 1}) {  // waiting for the others, and for rank 0's store
    DistConfig c = two_ranks(rank, free_port());  // 60 s timeout
    std::atomic<bool> stop{false};
    std::thread signal([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      stop = true;
    });
    std::string why;
    const auto t0 = std::chrono::steady_clock::now();
    try {
      Distributed d(c, "gloo", &stop);
    } catch (const blpa::Interrupted& e) {
      why = e.what();
    } catch (const std::exception& e) {
      why = std::string("not Interrupted: ") + e.what();
    }
    signal.join();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CAPTURE(rank, why, secs);
    CHECK(why == "rank " + std::to_string(rank) + " of 2: stopped by a signal at the rendezvous, before training");
    CHECK(secs < 10);
  }
}

// A --master-addr that names no host waited the whole timeout and blamed rank 0.
TEST_CASE("distributed: a --master-addr that does not resolve is said at once", "[distributed]") {
  addrinfo* found = nullptr;
  const int direct = ::getaddrinfo("nosuchhost.invalid", "80", nullptr, &found);
  if (found) ::freeaddrinfo(found);
  if (direct == EAI_AGAIN) {  // no resolver answers here: the name might exist, so it is waited for
    std::cout << "BLPA_SKIP: this machine's resolver does not answer (EAI_AGAIN)" << std::endl;
    return;
  }
  DistConfig c = two_ranks(1, free_port());
  c.master_addr = "nosuchhost.invalid";
  c.timeout = std::chrono::seconds(60);
  std::string why;
  try {
    Distributed alone(c, "gloo");
  } catch (const std::exception& e) {
    why = e.what();
  }
  CHECK(why.find("rank 1 of 2: --master-addr nosuchhost.invalid cannot be resolved (") != std::string::npos);
}

// NCCL needs a GPU per rank; one rank on one GPU still runs NCCL's communicator, its
// collectives and the reducer's buckets on CUDA tensors.
TEST_CASE("CUDA: NCCL with one rank sums, broadcasts and reduces gradients on the GPU", "[distributed][cuda]") {
  BLPA_REQUIRE_CUDA();
  DistConfig c;
  c.master_port = free_port(), c.timeout = std::chrono::seconds(60);
  Distributed d(c, "nccl");
  CHECK(d.backend() == "nccl");
  CHECK(d.sum({1.5, -2.0}) == std::vector<double>{1.5, -2.0});
  auto a = torch::arange(10, torch::dtype(torch::kFloat).device(torch::kCUDA));
  auto b = torch::full({3}, 7, torch::dtype(torch::kLong).device(torch::kCUDA));
  d.allreduce_sum({a, b});
  d.broadcast({a, b});
  CHECK(torch::equal(a.cpu(), torch::arange(10, torch::kFloat)));
  CHECK(torch::equal(b.cpu(), torch::full({3}, 7, torch::kLong)));
  d.barrier();
  auto x = torch::randn({4, 3, 16, 16}, torch::kCUDA);
  auto y = torch::randint(0, 10, {4}, torch::dtype(torch::kLong).device(torch::kCUDA));
  for (auto mode : {blpa::ModeConfig{blpa::Mode::plain, 8}, blpa::ModeConfig{blpa::Mode::blpa, 4}}) {
    CAPTURE(mode.str());
    auto net = small_net(mode);
    net->to(torch::kCUDA);
    blpa::accumulate_gradients(net, x, y, 2);
    std::vector<torch::Tensor> alone;
    for (const auto& q : net->parameters()) alone.push_back(q.grad().clone()), q.mutable_grad().reset();
    auto reducer = d.reducer(net->parameters(), 64 << 10);  // several buckets
    blpa::accumulate_gradients(net, x, y, 2, nullptr, reducer.get());
    auto params = net->parameters();
    for (size_t i = 0; i < params.size(); ++i) {
      CAPTURE(i);  // one rank's average is its own gradient (cuDNN may reorder sums between runs)
      CHECK(torch::allclose(params[i].grad(), alone[i], 1e-4, 1e-6));
    }
  }
}

// A run that ends as planned closes its group (NCCL's flush, then ncclCommDestroy); one that
// leaves on an error aborts it in the destructor, without the warning NCCL's own gives.
TEST_CASE("CUDA: an NCCL group closes after its collectives, and one left open aborts", "[distributed][cuda]") {
  BLPA_REQUIRE_CUDA();
  for (bool close : {true, false}) {
    CAPTURE(close);
    DistConfig c;
    c.master_port = free_port(), c.timeout = std::chrono::seconds(60);
    Distributed d(c, "nccl");
    CHECK(d.all_gather("end its export") == std::vector<std::string>{"end its export"});
    if (close) d.close(), d.close();
  }
}

TEST_CASE("distributed: the ranks' shards of an epoch are disjoint and cover it", "[distributed]") {
  const int64_t n = 1000, batch = 16;
  for (int world : {1, 2, 3}) {
    const int64_t per_epoch = n / (batch * world);
    std::set<int64_t> seen;
    int64_t count = 0;
    for (int r = 0; r < world; ++r)
      for (int64_t b = 0; b < per_epoch; ++b)
        for (int64_t i : blpa::data::shard_indices(n, batch, {r, world}, 7, b)) seen.insert(i), ++count;
    CHECK(count == per_epoch * batch * world);
    CHECK(static_cast<int64_t>(seen.size()) == count);  // no sample twice
    CHECK(count > n - batch * world);                    // all but the dropped partial batch
    // The same global order for any world size: rank r's slice of global batch b.
    auto global = blpa::data::batch_indices(n, batch * world, 7, 3);
    auto last = blpa::data::shard_indices(n, batch, {world - 1, world}, 7, 3);
    CHECK(std::vector<int64_t>(global.end() - batch, global.end()) == last);
  }
}

TEST_CASE("distributed: the sampler's cached epochs give shard_indices' batches, from any thread, in any order", "[distributed]") {
  const int64_t n = 997, batch = 8;
  for (int world : {1, 3}) {
    for (int rank = 0; rank < world; ++rank) {
      CAPTURE(world, rank);
      blpa::data::ShardSampler sampler(n, batch, {rank, world}, 11);
      const int64_t per_epoch = sampler.batches_per_epoch();
      CHECK(per_epoch == n / (batch * world));
      // Batches of five epochs, out of order and across epoch ends, from four threads; epoch 0
      // is asked for again after three later ones have pushed it out of the cache.
      std::vector<int64_t> bs;
      for (int64_t b = 0; b < 4 * per_epoch; b += 3) bs.push_back(b);
      for (int64_t b : {per_epoch - 1, 4 * per_epoch + 2, int64_t{1}, 2 * per_epoch}) bs.push_back(b);
      std::vector<std::vector<int64_t>> got(bs.size());
      run_ranks(4, [&](int t) {
        for (size_t i = t; i < bs.size(); i += 4) got[i] = sampler.indices(bs[i]);
      });
      for (size_t i = 0; i < bs.size(); ++i) {
        CAPTURE(bs[i]);
        CHECK(got[i] == blpa::data::shard_indices(n, batch, {rank, world}, 11, bs[i]));
      }
    }
  }
  CHECK_THROWS_WITH(blpa::data::ShardSampler(10, 4, {0, 3}, 0), Catch::Contains("exceeds the data set"));
}

namespace {

// env: "NAME=VALUE" for the child alone, or "".
pid_t spawn(const std::vector<std::string>& args, const std::string& out, const std::string& env = "") {
  std::fflush(nullptr);  // or the child would write this process's buffered output again
  const pid_t pid = ::fork();
  if (pid == 0) {
    if (!env.empty()) ::putenv(const_cast<char*>(env.c_str()));
    if (!std::freopen(out.c_str(), "w", stdout) || !std::freopen(out.c_str(), "a", stderr)) ::_exit(126);
    std::vector<char*> argv{const_cast<char*>(BLPA_TRAIN_EXE)};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(BLPA_TRAIN_EXE, argv.data());
    ::_exit(127);
  }
  return pid;
}

int wait_exit(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::vector<double> losses(const fs::path& log) {
  std::vector<double> out;
  std::regex re("\"loss\": ([-0-9.e+]+)");
  std::smatch m;
  std::ifstream f(log);
  for (std::string line; std::getline(f, line);)
    if (std::regex_search(line, m, re)) out.push_back(std::stod(m[1]));
  return out;
}

fs::path fresh_dir(const std::string& tag) {
  const fs::path dir = fs::temp_directory_path() / ("blpa-dist-" + tag + "-" + std::to_string(::getpid()));
  remove_tree(dir);
  fs::create_directories(dir);
  return dir;
}

// Both ranks of a 2-process blpa-train run, rank 1 given `rank1` after the others (its own
// --checkpoint, say); returns their exit codes.
std::pair<int, int> train_pair(const fs::path& dir, int port, std::vector<std::string> extra, const std::string& tag,
                               const std::vector<std::string>& rank1 = {}) {
  std::vector<std::string> common{"--depth", "11", "--batch", "16", "--train-subset", "1000", "--test-subset", "100",
                                  "--warmup", "0", "--threads", "1", "--log-every", "2", "--eval-every", "0",
                                  "--quiet", "--world-size", "2", "--master-port", std::to_string(port),
                                  "--checkpoint", (dir / "ck.pt").string(), "--dist-timeout", "60"};
  common.insert(common.end(), extra.begin(), extra.end());
  auto a1 = common, a0 = common;
  a1.insert(a1.end(), {"--rank", "1"});
  a1.insert(a1.end(), rank1.begin(), rank1.end());
  a0.insert(a0.end(), {"--rank", "0", "--log", (dir / (tag + ".jsonl")).string()});
  const pid_t p1 = spawn(a1, (dir / (tag + "-1.out")).string());
  const pid_t p0 = spawn(a0, (dir / (tag + "-0.out")).string());
  const int r0 = wait_exit(p0);
  return {r0, wait_exit(p1)};
}

// Starts a two-rank run of a small network (200 images; with --eval-every 0, evaluated at its
// end alone): `extra` on both ranks, `rank0` on rank 0 alone (its outputs), each rank with its
// environment (a test hook). Their output goes to <dir>/r0<tag>.out and r1<tag>.out.
std::pair<pid_t, pid_t> start_pair(const fs::path& dir, const std::vector<std::string>& extra,
                                   const std::vector<std::string>& rank0, const std::string& tag,
                                   const std::string& env0 = "", const std::string& env1 = "") {
  std::vector<std::string> common{"--depth", "11", "--batch", "16", "--train-subset", "200", "--test-subset", "50",
                                  "--warmup", "0", "--threads", "1", "--eval-every", "0", "--quiet", "--world-size",
                                  "2", "--master-port", std::to_string(free_port()), "--dist-timeout", "60"};
  common.insert(common.end(), extra.begin(), extra.end());
  auto a1 = common, a0 = common;
  a1.insert(a1.end(), {"--rank", "1"});
  a0.insert(a0.end(), {"--rank", "0"});
  a0.insert(a0.end(), rank0.begin(), rank0.end());
  return {spawn(a0, (dir / ("r0" + tag + ".out")).string(), env0),
          spawn(a1, (dir / ("r1" + tag + ".out")).string(), env1)};
}

}  // namespace

TEST_CASE("distributed: a test loss that overflows stops every rank as a divergence", "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("overflow");
  // Only rank 0 evaluates; rank 1 said it had lost the other ranks (exit 1).
  const auto codes =
      train_pair(dir, free_port(), {"--iterations", "3", "--lr", "0.02", "--weight-decay", "1e9"}, "overflow");
  const std::string out0 = slurp(dir / "overflow-0.out"), out1 = slurp(dir / "overflow-1.out");
  CAPTURE(out0, out1);
  CHECK(codes == std::pair{3, 3});
  CHECK(out1.find("lost the other ranks") == std::string::npos);
  remove_tree(dir);
}

// An export that fails at a multi-rank run's end, then one deleted: only rank 0 sees the run's
// files, so a resume of the run at its end is its word. It did nothing with several ranks (the
// ranks could not agree on what rank 0's files lack), and a lost export or summary, or one
// left "running" by a kill, stayed so.
TEST_CASE("distributed: a run at its end is finished by rank 0 alone on a resume", "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("export-failed");
  const std::string exported = (dir / "model.pt").string(), ck = (dir / "ck.pt").string(),
                    summary = (dir / "s.json").string();
  const std::vector<std::string> outputs{"--iterations", "2", "--export", exported, "--summary", summary};
  ::setenv("BLPA_TEST_FAIL", "export:1", 1);
  const auto codes = train_pair(dir, free_port(), outputs, "end");
  ::unsetenv("BLPA_TEST_FAIL");
  std::string out0 = slurp(dir / "end-0.out"), out1 = slurp(dir / "end-1.out");
  CAPTURE(out0, out1);
  CHECK(codes.first == 1);
  CHECK(out0.find("the export failed (BLPA_TEST_FAIL). Checkpoint " + ck + " holds iteration 2: --resume (or "
                  "--auto-resume), given to every rank, writes the export and the summary.") != std::string::npos);
  CHECK(!fs::exists(exported));
  CHECK(slurp(summary).find("\"status\": \"failed\"") != std::string::npos);

  // Its summary says "failed": rank 0 evaluates the run's end again and writes both.
  auto resumed = outputs;
  resumed.push_back("--resume");
  CHECK(train_pair(dir, free_port(), resumed, "end") == std::pair{0, 0});
  out0 = slurp(dir / "end-0.out"), out1 = slurp(dir / "end-1.out");
  CHECK(out0.find("the run is at its last iteration (2): rank 0 writes its evaluation, export and summary alone, "
                  "the other ranks exit") != std::string::npos);
  CHECK(out0.find("done: 2 iterations, no iteration trained in this process, test loss") != std::string::npos);
  CHECK(out1.find("the run is at its last iteration (2), and rank 0 writes its evaluation, export and summary alone: "
                  "nothing for rank 1 to do") != std::string::npos);
  CHECK(blpa::exported_run_id(exported) == blpa::read_checkpoint(ck).config.at("run_id"));
  const std::string done = slurp(summary);
  CHECK(done.find("{\"type\": \"summary\", \"status\": \"done\", \"iter\": 2,") == 0);
  // Its log: the first evaluation's record replaced by rank 0's, and the resume's config record
  // that of the 2-rank run.
  const std::string log = slurp(dir / "end.jsonl");
  CAPTURE(log);
  const auto eval = log.find("{\"type\": \"eval\", \"iter\": 2,");
  CHECK(eval != std::string::npos);
  CHECK(log.find("{\"type\": \"eval\"", eval + 1) == std::string::npos);
  const auto resumed_config = log.find("\"resumed\": true");
  CHECK(resumed_config != std::string::npos);
  CHECK(resumed_config < eval);
  CHECK(log.find("\"world\": 2", resumed_config) != std::string::npos);

  // The export alone lost, and rank 1's copy of the checkpoint gone (a sweep that cleaned the
  // other machines): rank 0 writes the export, the summary kept as it is (rank 1's missing
  // copy was refused as "started with different settings", exit 2 on both).
  fs::remove(exported);
  auto rank1_none = outputs;
  rank1_none.push_back("--auto-resume");
  const std::vector<std::string> no_copy{"--checkpoint", (dir / "none.pt").string()};
  CHECK(train_pair(dir, free_port(), rank1_none, "end", no_copy) == std::pair{0, 0});
  out0 = slurp(dir / "end-0.out"), out1 = slurp(dir / "end-1.out");
  CHECK(out0.find("rank 0 writes its export alone") != std::string::npos);
  CHECK(out1.find("rank 0 writes its export alone: nothing for rank 1 to do") != std::string::npos);
  CHECK(fs::exists(exported));
  CHECK(slurp(summary) == done);

  // Nothing lost: every rank says so, exit 0, rank 1 in rank 0's words.
  CHECK(train_pair(dir, free_port(), resumed, "end") == std::pair{0, 0});
  out1 = slurp(dir / "end-1.out");
  CHECK(out1.find("rank 0: checkpoint " + ck + " is at iteration 2, evaluated: with --iterations 2 the run is "
                  "complete, nothing to do") != std::string::npos);
  CHECK(slurp(summary) == done);

  // A sweep that deletes finished runs' checkpoints: rank 0's summary says the run is done, and
  // the others, which find no checkpoint either, are told so (rank 1 exited 2, "started with
  // different settings"); so where rank 1 still has a copy.
  fs::copy_file(ck, dir / "kept.pt");
  fs::remove(ck);
  for (const std::string& rank1_ck : {ck, (dir / "kept.pt").string()}) {
    CHECK(train_pair(dir, free_port(), rank1_none, "end", {"--checkpoint", rank1_ck}) == std::pair{0, 0});
    out1 = slurp(dir / "end-1.out");
    CHECK(out1.find("rank 0: --auto-resume: summary " + summary + " says this run is done at iteration 2") !=
          std::string::npos);
    CHECK(!fs::exists(ck));
  }
  fs::rename(dir / "kept.pt", ck);

  // blpa-eval writes the same export from the checkpoint, byte for byte.
  const std::string copy = (dir / "copy.pt").string();
  CHECK(std::system(("\"" BLPA_EVAL_EXE "\" --checkpoint '" + ck + "' --export '" + copy + "' > /dev/null").c_str()) ==
        0);
  CHECK(slurp(copy) == slurp(exported));
  remove_tree(dir);
}

// Stopped after iteration 3 of 6 (iteration 4 failed on both ranks) and resumed with
// --iterations 3: rank 0 finishes alone and logs the checkpoint's open window, as the run's
// record: its world, its images/s (rank 0's times the ranks, which stepped in lockstep), and
// null for the other ranks' bytes it does not have. (It had no world fields, and rank 0's
// images/s alone.)
TEST_CASE("distributed: rank 0 finishing a run alone logs the last window with the run's fields",
          "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("alone-record");
  ::setenv("BLPA_TEST_FAIL", "step:4", 1);
  const auto failed = train_pair(dir, free_port(), {"--iterations", "6"}, "alone");
  ::unsetenv("BLPA_TEST_FAIL");
  CAPTURE(slurp(dir / "alone-0.out"), slurp(dir / "alone-1.out"));
  REQUIRE(failed.first == 1);
  REQUIRE(blpa::read_checkpoint(dir / "ck.pt").state.iteration == 3);
  REQUIRE(train_pair(dir, free_port(), {"--iterations", "3", "--resume"}, "alone") == std::pair{0, 0});
  CHECK(slurp(dir / "alone-0.out").find("rank 0 writes its evaluation") != std::string::npos);
  std::string record;
  std::istringstream in(slurp(dir / "alone.jsonl"));
  for (std::string line; std::getline(in, line);)
    if (line.rfind("{\"type\": \"train\", \"iter\": 3,", 0) == 0) record = line;
  CAPTURE(record);
  REQUIRE(!record.empty());
  CHECK(record.find("\"world\": 2, \"global_batch\": 32,") != std::string::npos);
  CHECK(record.find("\"stored_activation_bytes_total\": null, \"peak_bytes_total\": null") != std::string::npos);
  std::smatch m;
  REQUIRE(std::regex_search(record, m, std::regex("\"images_per_s\": ([0-9.]+).*\"images_per_s_per_rank\": ([0-9.]+)")));
  CHECK(std::stod(m[1]) > 0);
  CHECK(std::stod(m[1]) == Approx(2 * std::stod(m[2])).epsilon(1e-3));
  remove_tree(dir);
}

TEST_CASE("distributed: a 2-rank run resumed from its checkpoint continues identically", "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("resume");
  auto straight = train_pair(dir, free_port(), {"--iterations", "8"}, "straight");
  REQUIRE(straight == std::pair{0, 0});
  fs::remove(dir / "ck.pt");
  REQUIRE(train_pair(dir, free_port(), {"--iterations", "4"}, "split") == std::pair{0, 0});
  REQUIRE(train_pair(dir, free_port(), {"--iterations", "8", "--resume"}, "split") == std::pair{0, 0});
  const auto a = losses(dir / "straight.jsonl"), b = losses(dir / "split.jsonl");
  CAPTURE(slurp(dir / "split-0.out"));
  REQUIRE(a.size() == 4);
  REQUIRE(b.size() == 4);
  for (size_t i = 0; i < a.size(); ++i) CHECK(a[i] == b[i]);
  CHECK(slurp(dir / "straight.jsonl").find("\"world\": 2, \"global_batch\": 32") != std::string::npos);
  remove_tree(dir);
}

TEST_CASE("distributed: a rank that cannot start stops the others at once, naming why", "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("refused");
  REQUIRE(train_pair(dir, free_port(), {"--iterations", "2"}, "first") == std::pair{0, 0});
  // The same command again: rank 0 refuses to replace the first run's checkpoint. Rank 1 used
  // to wait for it at the rendezvous until --dist-timeout (60 s here, 600 by default).
  const auto t0 = std::chrono::steady_clock::now();
  const auto codes = train_pair(dir, free_port(), {"--iterations", "2"}, "again");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string out0 = slurp(dir / "again-0.out"), out1 = slurp(dir / "again-1.out");
  CAPTURE(out0, out1, secs);
  CHECK(codes == std::pair{2, 2});  // as the refusing rank exits (the other exited 1)
  CHECK(out0.find("already exists: continue that run with --resume") != std::string::npos);
  CHECK(out1.find("rank 1 of 2: rank 0 cannot start, so no rank trains (--checkpoint " + (dir / "ck.pt").string() +
                  " already exists") != std::string::npos);
  CHECK(secs < 45);
  remove_tree(dir);
}

// A rank that fails to load its data stops before the weights' broadcast, where the other
// rank then read Gloo's "[.../pair.cc:561] Connection closed by peer ... GLHF!".
TEST_CASE("distributed: a rank whose data fails to load stops the others before training", "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("nodata");
  fs::create_directories(dir / "empty");
  // A folder without the data fails as it loads, after the rendezvous; one missing on rank 1's
  // machine fails before it (the others waited there for --dist-timeout).
  for (const auto& [folder, said] :
       {std::pair{"empty", "rank 0 of 2: another rank stopped before training began (all-gather failed: "},
        std::pair{"gone", "rank 0 of 2: rank 1 cannot start, so no rank trains ("}}) {
    std::vector<std::string> common{"--depth", "11", "--batch", "16", "--train-subset", "1000", "--test-subset",
                                    "100", "--warmup", "0", "--threads", "1", "--eval-every", "0", "--quiet",
                                    "--iterations", "2", "--dataset", "fashion-mnist", "--world-size", "2",
                                    "--master-port", std::to_string(free_port()), "--dist-timeout", "60"};
    auto a1 = common, a0 = common;
    a1.insert(a1.end(), {"--rank", "1", "--data-dir", (dir / folder).string()});
    a0.insert(a0.end(), {"--rank", "0"});
    const auto t0 = std::chrono::steady_clock::now();
    const pid_t p1 = spawn(a1, (dir / "r1.out").string());
    const pid_t p0 = spawn(a0, (dir / "r0.out").string());
    const int r0 = wait_exit(p0), r1 = wait_exit(p1);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const std::string out0 = slurp(dir / "r0.out"), out1 = slurp(dir / "r1.out");
    CAPTURE(folder, out0, out1, secs);
    CHECK(r0 == 1);  // a missing file, not a flag: as the failing rank exits
    CHECK(r1 == 1);
    CHECK(out1.find(std::string(folder) == "empty" ? "train-images-idx3-ubyte" : (dir / "gone").string()) !=
          std::string::npos);
    CHECK(out0.find(said) != std::string::npos);
    CHECK(out0.find("GLHF") == std::string::npos);
    CHECK(secs < 45);  // not the 60 s timeout
  }
  remove_tree(dir);
}

// Ranks started for worlds of different sizes: Gloo, given them, waited for a rank that would
// never come, up to five timeouts, then failed in its own words ("connectFullMesh failed").
TEST_CASE("distributed: ranks started for worlds of different sizes are refused at once", "[distributed]") {
  const int port = free_port();
  std::string why[2];
  const auto t0 = std::chrono::steady_clock::now();
  run_ranks(2, [&](int rank) {
    DistConfig c = two_ranks(rank, port);
    if (rank == 1) c.world = 3;
    try {
      Distributed d(c, "gloo");
    } catch (const blpa::WorldsDiffer& e) {
      why[rank] = e.what();
    } catch (const std::exception& e) {
      why[rank] = std::string("not WorldsDiffer: ") + e.what();
    }
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CAPTURE(why[0], why[1], secs);
  CHECK(why[0] == "rank 0 of 2: rank 1 was started for a world of 3 ranks, this one for 2: give every rank the "
                  "same --world-size (WORLD_SIZE)");
  CHECK(why[1] == "rank 1 of 3: rank 0 was started for a world of 2 ranks, this one for 3: give every rank the "
                  "same --world-size (WORLD_SIZE)");
  CHECK(secs < 30);  // the timeout is 60 s
}

// A rank that cannot start before the rendezvous (its flags, a data folder missing on its
// machine, no GPU there) left the others waiting for it until --dist-timeout, then saying
// only that it "did not join".
TEST_CASE("distributed: a rank that refuses before the rendezvous stops every other rank at once", "[distributed]") {
  for (const int refusing : {0, 2}) {
    const int port = free_port();
    std::string why[3];
    int from[3] = {-1, -1, -1};
    const auto t0 = std::chrono::steady_clock::now();
    run_ranks(3, [&](int rank) {
      DistConfig c = two_ranks(rank, port);
      c.world = 3;  // 60 s timeout
      if (rank == refusing) {
        if (rank == 2) std::this_thread::sleep_for(std::chrono::milliseconds(300));  // after the others
        Distributed::refuse(c, "2--depth 12: not 9n+2", std::chrono::seconds(10));
        return;
      }
      try {
        Distributed d(c, "gloo");
        why[rank] = "started";
      } catch (const blpa::RankRefused& e) {
        why[rank] = e.what(), from[rank] = e.rank;
        CHECK(e.why == "2--depth 12: not 9n+2");
      } catch (const std::exception& e) {
        why[rank] = std::string("not RankRefused: ") + e.what();
      }
    });
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (int r = 0; r < 3; ++r) {
      if (r == refusing) continue;
      CAPTURE(refusing, r, why[r], secs);
      CHECK(why[r] == "rank " + std::to_string(r) + " of 3: rank " + std::to_string(refusing) +
                          " cannot start, so no rank trains (--depth 12: not 9n+2)");
      CHECK(from[r] == refusing);
    }
    CHECK(secs < 30);  // not the 60 s timeout
  }
}

// A launch script that did not change RANK: two processes as rank 1 of 3, none as rank 2.
// The others waited for rank 2 until --dist-timeout.
TEST_CASE("distributed: two processes given one rank stop every rank at once", "[distributed]") {
  const int port = free_port();
  std::string why[3];
  const auto t0 = std::chrono::steady_clock::now();
  run_ranks(3, [&](int process) {
    DistConfig c = two_ranks(process == 0 ? 0 : 1, port);
    c.world = 3;  // 60 s timeout
    try {
      Distributed d(c, "gloo");
      why[process] = "started";
    } catch (const std::exception& e) {
      why[process] = e.what();
    }
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CAPTURE(why[0], why[1], why[2], secs);
  const std::string dup = "two processes were given rank 1: give each its own --rank (RANK)";
  CHECK(why[0] == "rank 0 of 3: rank 1 cannot start, so no rank trains (" + dup + ")");
  // Whichever came second says so; the first stops as rank 0 does.
  const std::string first = "rank 1 of 3: rank 1 cannot start, so no rank trains (" + dup + ")";
  const std::string second = "rank 1 of 3: " + dup;
  CHECK(((why[1] == first && why[2] == second) || (why[1] == second && why[2] == first)));
  CHECK(secs < 30);  // not the 60 s timeout
}

// A scheduler's SIGTERM to one rank: the others exited 130, as after a Ctrl-C, and with a code
// rather than by the signal, so that a shell loop of runs on their machine went on.
TEST_CASE("distributed: a rank stopped by another rank's signal ends by that signal", "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("signal");
  std::vector<std::string> common{"--depth", "11", "--batch", "16", "--train-subset", "1000", "--test-subset", "100",
                                  "--warmup", "0", "--threads", "1", "--eval-every", "0", "--quiet", "--iterations",
                                  "100000", "--checkpoint-every", "100000", "--world-size", "2", "--master-port",
                                  std::to_string(free_port()), "--dist-timeout", "60", "--checkpoint",
                                  (dir / "ck.pt").string(), "--log-every", "1"};
  auto a1 = common, a0 = common;
  a1.insert(a1.end(), {"--rank", "1"});
  a0.insert(a0.end(), {"--rank", "0", "--log", (dir / "log.jsonl").string()});
  const pid_t p1 = spawn(a1, (dir / "r1.out").string());
  const pid_t p0 = spawn(a0, (dir / "r0.out").string());
  for (int i = 0; i < 600 && slurp(dir / "log.jsonl").find("\"iter\": 2,") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ::kill(p0, SIGTERM);
  int s0 = 0, s1 = 0;
  ::waitpid(p0, &s0, 0);
  ::waitpid(p1, &s1, 0);
  CAPTURE(slurp(dir / "r0.out"), slurp(dir / "r1.out"));
  CHECK((WIFSIGNALED(s0) && WTERMSIG(s0) == SIGTERM));
  CHECK((WIFSIGNALED(s1) && WTERMSIG(s1) == SIGTERM));  // it exited 130
  CHECK(slurp(dir / "r1.out").find("stopped because another rank was interrupted") != std::string::npos);
  CHECK(fs::exists(dir / "ck.pt"));
  // Rank 1 cannot see rank 0's file (another machine's), and rank 0 resumed alone would wait
  // for the others.
  const std::string at = std::to_string(blpa::read_checkpoint(dir / "ck.pt").state.iteration);
  CHECK(slurp(dir / "r1.out").find("; rank 0's checkpoint holds iteration " + at +
                                   ", continue with --resume on every rank") != std::string::npos);
  CHECK(slurp(dir / "r0.out").find("; checkpoint " + (dir / "ck.pt").string() + " holds iteration " + at +
                                   ", continue with --resume on every rank") != std::string::npos);
  remove_tree(dir);
}

// A second signal ends a rank at once, before the ranks stop together: the other exited 1 with
// "lost the other ranks", its summary "failed", and a loop of runs on its machine went on to
// its next run. It ends by the signal too, as interrupted. Steps of 4 s (slow-step) hold both
// signals within one, whatever the machine; rank 1 stopped twice, then rank 0.
TEST_CASE("distributed: a rank stopped at once by a second signal ends the others by that signal",
          "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("second-signal");
  const std::string ck = (dir / "ck.pt").string(), log = (dir / "log.jsonl").string(),
                    summary = (dir / "s.json").string();
  auto run = [&](const std::string& tag, const std::string& env) {
    return start_pair(dir, {"--iterations", "6", "--log-every", "1", "--checkpoint", ck, "--auto-resume"},
                      {"--log", log, "--summary", summary}, tag, env, env);
  };
  // Waits until this process's run (the log's `configs`-th config record) has logged an
  // iteration: the next iteration's 4 s have just begun. (A resume first drops the records
  // past its checkpoint.)
  const auto trained_one = [&](size_t configs) {
    for (int i = 0; i < 3000; ++i) {
      std::istringstream lines(slurp(log));
      size_t seen = 0, after = 0;
      for (std::string line; std::getline(lines, line);) {
        if (line.find("\"type\": \"config\"") != std::string::npos) ++seen, after = 0;
        else if (line.find("\"type\": \"train\"") != std::string::npos) ++after;
      }
      if (seen == configs && after > 0) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return false;
  };
  size_t configs = 0;
  for (const int signalled : {1, 0}) {
    CAPTURE(signalled);
    const std::string tag = "-" + std::to_string(signalled);
    const auto [p0, p1] = run(tag, "BLPA_TEST_FAIL=slow-step:4000");
    REQUIRE(trained_one(++configs));
    const pid_t victim = signalled == 1 ? p1 : p0, other = signalled == 1 ? p0 : p1;
    ::kill(victim, SIGTERM);
    std::this_thread::sleep_for(std::chrono::milliseconds(1000));  // not the first again (within 0.5 s)
    ::kill(victim, SIGTERM);
    CHECK(wait_exit(victim) == 128 + SIGTERM);
    const int rc_other = wait_exit(other);
    const std::string out_other = slurp(dir / ("r" + std::to_string(1 - signalled) + tag + ".out"));
    CAPTURE(out_other, slurp(dir / ("r" + std::to_string(signalled) + tag + ".out")));
    CHECK(rc_other == 128 + SIGTERM);  // it exited 1
    CHECK(out_other.find("of 2: interrupted: another rank was asked to stop, and the ranks were lost during "
                         "iteration") != std::string::npos);
    // Rank 0's summary says "interrupted" (it said "failed"), or, rank 0 stopped at once, its
    // draft does.
    CHECK(slurp(summary).find("{\"type\": \"summary\", \"status\": \"interrupted\", ") == 0);
  }
  {  // Two signals 0.05 s apart: the stop is posted before the rank ends (it ended before the
     // rendezvous heard of it, and the other exited 1 as failed).
    const auto [p0, p1] = run("-quick", "BLPA_TEST_FAIL=slow-step:4000");
    REQUIRE(trained_one(++configs));
    ::kill(p0, SIGINT);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ::kill(p0, SIGTERM);
    CHECK(wait_exit(p0) == 128 + SIGTERM);
    CHECK(wait_exit(p1) == 128 + SIGINT);  // the stop's signal, as posted
    CAPTURE(slurp(dir / "r1-quick.out"));
    CHECK(slurp(dir / "r1-quick.out").find("interrupted: another rank was asked to stop") != std::string::npos);
  }
  {  // A rank that crashed is a failure, though this one was asked to stop: it is no other's stop.
    const auto [p0, p1] = run("-crash", "BLPA_TEST_FAIL=slow-step:4000");
    REQUIRE(trained_one(++configs));
    ::kill(p1, SIGKILL);
    ::kill(p0, SIGTERM);
    CHECK(wait_exit(p1) == 128 + SIGKILL);
    CHECK(wait_exit(p0) == 128 + SIGTERM);  // by its own signal, as any failure after one
    const std::string out0 = slurp(dir / "r0-crash.out");
    CAPTURE(out0);
    CHECK(out0.find("rank 0 of 2: lost the other ranks during iteration") != std::string::npos);
    CHECK(slurp(summary).find("{\"type\": \"summary\", \"status\": \"failed\", ") == 0);
  }
  // The run resumes from rank 0's last checkpoint, to its end.
  const auto [p0, p1] = run("-resumed", "");
  CHECK(wait_exit(p0) == 0);
  CHECK(wait_exit(p1) == 0);
  CHECK(slurp(summary).find("{\"type\": \"summary\", \"status\": \"done\", \"iter\": 6,") == 0);
  remove_tree(dir);
}

// A signal to one rank in the run's last iteration stops rank 0's final evaluation (the
// rendezvous tells it), and the run is interrupted on every rank, its evaluation left for the
// resume. Rank 1 said "done" and exited 0 where rank 0 was stopped, and a loop of runs on its
// machine went on.
TEST_CASE("distributed: a signal in the run's last iteration interrupts every rank alike", "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("last-signal");
  const std::string log = (dir / "log.jsonl").string(), summary = (dir / "s.json").string();
  auto run = [&](const std::string& tag, const std::string& env) {
    return start_pair(dir,
                      {"--iterations", "2", "--log-every", "1", "--checkpoint", (dir / "ck.pt").string(),
                       "--auto-resume"},
                      {"--log", log, "--summary", summary, "--export", (dir / "w.pt").string()}, tag, env, env);
  };
  const auto [p0, p1] = run("", "BLPA_TEST_FAIL=slow-step:4000");  // the last iteration's 4 s hold the signal
  for (int i = 0; i < 3000 && losses(log).empty(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  REQUIRE(losses(log).size() == 1);  // iteration 1's record: the last iteration has begun
  ::kill(p0, SIGTERM);
  const int rc0 = wait_exit(p0), rc1 = wait_exit(p1);
  CAPTURE(slurp(dir / "r0.out"), slurp(dir / "r1.out"));
  CHECK(rc0 == 128 + SIGTERM);
  CHECK(rc1 == 128 + SIGTERM);  // it exited 0
  CHECK(slurp(dir / "r1.out").find("stopped because another rank was interrupted after iteration 2") !=
        std::string::npos);
  CHECK(slurp(dir / "r1.out").find("done") == std::string::npos);
  CHECK(slurp(summary).find("{\"type\": \"summary\", \"status\": \"interrupted\", \"iter\": 2,") == 0);
  // The resume evaluates, exports and ends the run.
  const auto [q0, q1] = run("-resumed", "");
  CHECK(wait_exit(q0) == 0);
  CHECK(wait_exit(q1) == 0);
  CHECK(slurp(summary).find("{\"type\": \"summary\", \"status\": \"done\", \"iter\": 2,") == 0);
  CHECK(fs::exists(dir / "w.pt"));
  remove_tree(dir);
}

// A signal to a rank waiting for rank 0's final checkpoint, after the ranks' last agreement:
// the run is done, and every rank ends by the signal. The signalled rank did, and rank 0
// exited 0, so that a loop of runs on its machine went on.
TEST_CASE("distributed: a signal during the final checkpoint ends every rank by it, the run done",
          "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("end-signal");
  const std::string log = (dir / "log.jsonl").string(), summary = (dir / "s.json").string();
  // Starts a new run, and returns once its final evaluation's record is written: rank 0's
  // checkpoint (4 s) follows, and rank 1 waits for it.
  const auto at_final_checkpoint = [&](const std::string& tag) {
    fs::remove_all(dir);
    fs::create_directories(dir);
    const auto ranks = start_pair(dir, {"--iterations", "2", "--checkpoint", (dir / "ck.pt").string()},
                                  {"--log", log, "--summary", summary, "--export", (dir / "w.pt").string()}, tag,
                                  "BLPA_TEST_FAIL=slow-checkpoint:4000");
    for (int i = 0; i < 3000 && slurp(log).find("\"type\": \"eval\", \"iter\": 2,") == std::string::npos; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    REQUIRE(slurp(log).find("\"type\": \"eval\", \"iter\": 2,") != std::string::npos);
    return ranks;
  };
  const auto [p0, p1] = at_final_checkpoint("");
  ::kill(p1, SIGTERM);
  const int rc1 = wait_exit(p1), rc0 = wait_exit(p0);
  CAPTURE(slurp(dir / "r0.out"), slurp(dir / "r1.out"));
  CHECK(rc1 == 128 + SIGTERM);
  CHECK(rc0 == 128 + SIGTERM);  // it exited 0
  CHECK(slurp(dir / "r0.out").find("another rank was sent signal 15 in the run's last iteration: ending by it too") !=
        std::string::npos);
  CHECK(slurp(summary).find("{\"type\": \"summary\", \"status\": \"done\", \"iter\": 2,") == 0);
  CHECK(fs::exists(dir / "w.pt"));
  // Rank 1 stopped at once there by a second signal: rank 0, whole at its end, writes the
  // export and summary and ends by the signal too (it exited 0).
  const auto [q0, q1] = at_final_checkpoint("-twice");
  ::kill(q1, SIGINT);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ::kill(q1, SIGTERM);
  CHECK(wait_exit(q1) == 128 + SIGTERM);
  CHECK(wait_exit(q0) == 128 + SIGINT);  // it exited 0
  CAPTURE(slurp(dir / "r0-twice.out"));
  CHECK(slurp(summary).find("{\"type\": \"summary\", \"status\": \"done\", \"iter\": 2,") == 0);
  CHECK(fs::exists(dir / "w.pt"));
  remove_tree(dir);
}

// A rank stopped while it waits at the rendezvous (a Ctrl-C on one machine's launcher) tells the
// others, which end by its signal at once: they waited --dist-timeout (600 s by default) and
// exited 1 ("rank 0 is not listening"). Rank 0 stopped before rank 1 comes, and rank 1 stopped
// before rank 0 comes.
TEST_CASE("distributed: a rank stopped at the rendezvous stops the others at once, by its signal",
          "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("rendezvous-stop");
  std::string port;
  auto args = [&](int rank, int world) {
    return std::vector<std::string>{"--depth", "11", "--batch", "16", "--train-subset", "200", "--test-subset", "50",
                                    "--threads", "1", "--quiet", "--iterations", "3", "--world-size",
                                    std::to_string(world), "--master-port", port, "--dist-timeout", "60", "--rank",
                                    std::to_string(rank), "--checkpoint", (dir / "ck.pt").string()};
  };
  for (const auto& [first, sig] : {std::pair{0, SIGTERM}, std::pair{1, SIGHUP}}) {
    CAPTURE(first, sig);
    port = std::to_string(free_port());
    const auto out = [&](int rank) {
      std::string name = "r";  // not "r" + std::to_string(...): GCC 12's false -Wrestrict on it
      name += std::to_string(rank) + ".out";
      return (dir / name).string();
    };
    const pid_t a = spawn(args(first, 2), out(first));
    std::this_thread::sleep_for(std::chrono::milliseconds(1000));  // waiting, or loading with the signal held
    ::kill(a, sig);
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    const auto t0 = std::chrono::steady_clock::now();
    const pid_t b = spawn(args(1 - first, 2), out(1 - first));
    const int rc_b = wait_exit(b), rc_a = wait_exit(a);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    CAPTURE(slurp(out(0)), slurp(out(1)), secs);
    CHECK(rc_a == 128 + sig);
    CHECK(rc_b == 128 + sig);
    CHECK(secs < 30);  // not --dist-timeout
    CHECK(slurp(out(1 - first)).find("rank " + std::to_string(first) + " was stopped by a signal at the rendezvous, "
                                     "so no rank trains: nothing was written") != std::string::npos);
    CHECK_FALSE(fs::exists(dir / "ck.pt"));
  }
  // A world of 3 whose rank 2 has not come: rank 1 waits on rank 0's store, which rank 0's stop
  // closes. Told on that store first, rank 1 ends by the signal (it exited 1: "rank 0 closed the
  // rendezvous").
  port = std::to_string(free_port());
  const pid_t r1 = spawn(args(1, 3), (dir / "w1.out").string()), r0 = spawn(args(0, 3), (dir / "w0.out").string());
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // both waiting for rank 2
  ::kill(r0, SIGTERM);
  const int rc0 = wait_exit(r0), rc1 = wait_exit(r1);
  CAPTURE(slurp(dir / "w0.out"), slurp(dir / "w1.out"));
  CHECK(rc0 == 128 + SIGTERM);
  CHECK(rc1 == 128 + SIGTERM);
  CHECK(slurp(dir / "w1.out").find("rank 0 was stopped by a signal at the rendezvous") != std::string::npos);
  remove_tree(dir);
}

// A stop while the ranks load (here rank 1's, after the rendezvous): every rank ends by its
// signal before the first step, and --overwrite has removed nothing of the run it would replace.
// (Before, rank 0 removed the old run's files and the ranks trained a step to agree.)
TEST_CASE("distributed: a signal to one rank while a new run loads stops every rank, nothing replaced",
          "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("load-stop");
  const std::string ck = (dir / "ck.pt").string(), log = (dir / "log.jsonl").string(),
                    summary = (dir / "s.json").string();
  auto run = [&](const std::vector<std::string>& extra, const std::string& tag, const std::string& env1) {
    std::vector<std::string> common{"--depth", "11", "--batch", "16", "--train-subset", "200", "--test-subset", "50",
                                    "--warmup", "0", "--threads", "1", "--eval-every", "0", "--quiet", "--iterations",
                                    "3", "--world-size", "2", "--master-port", std::to_string(free_port()),
                                    "--dist-timeout", "60", "--checkpoint", ck};
    common.insert(common.end(), extra.begin(), extra.end());
    auto a1 = common, a0 = common;
    a1.insert(a1.end(), {"--rank", "1"});
    a0.insert(a0.end(), {"--rank", "0", "--log", log, "--summary", summary});
    return std::pair{spawn(a0, (dir / ("r0" + tag + ".out")).string()),
                     spawn(a1, (dir / ("r1" + tag + ".out")).string(), env1)};
  };
  const auto [old0, old1] = run({}, "-old", "");
  REQUIRE(wait_exit(old0) == 0);
  REQUIRE(wait_exit(old1) == 0);
  const std::vector<std::string> before{slurp(ck), slurp(log), slurp(summary)};

  // The signal to rank 1, still loading, or to rank 0, loaded and waiting for rank 1 (a signal
  // there was lost: the ranks trained a step, and --overwrite replaced the earlier run).
  for (const int signalled : {1, 0}) {
    CAPTURE(signalled);
    const std::string tag = "-" + std::to_string(signalled);  // this round's outputs, not the last's
    const auto [p0, p1] = run({"--overwrite"}, tag, "BLPA_TEST_FAIL=slow-load:30000");
    // Rank 1 has joined and names its network just before it loads on until a rank is stopped
    // (30 s).
    for (int i = 0; i < 600 && slurp(dir / ("r1" + tag + ".out")).find("model cifar-11") == std::string::npos; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::this_thread::sleep_for(std::chrono::milliseconds(300));  // rank 0 loaded too
    ::kill(signalled == 1 ? p1 : p0, SIGTERM);
    const int rc1 = wait_exit(p1), rc0 = wait_exit(p0);
    const std::string out_signalled = slurp(dir / ("r" + std::to_string(signalled) + tag + ".out"));
    const std::string out_other = slurp(dir / ("r" + std::to_string(1 - signalled) + tag + ".out"));
    CAPTURE(out_signalled, out_other);
    CHECK(rc1 == 128 + SIGTERM);
    CHECK(rc0 == 128 + SIGTERM);  // by the one signal, so that a loop of runs on each machine stops too
    CHECK(out_signalled.find("stopped before the run began: --overwrite replaced nothing, and nothing was written") !=
          std::string::npos);
    CHECK(out_other.find("stopped before the run began (another rank was interrupted): --overwrite replaced "
                         "nothing") != std::string::npos);
    CHECK(std::vector<std::string>{slurp(ck), slurp(log), slurp(summary)} == before);
  }
  remove_tree(dir);
}

// A launcher whose variable is left unset but exported (RANK=) started every process as rank 0.
TEST_CASE("distributed: an empty torchrun variable is refused, not taken as its default", "[distributed]") {
  ::setenv("RANK", "", 1);
  CHECK_THROWS_WITH(DistConfig::from_env(), Catch::Contains("environment variable RANK is set but empty"));
  ::unsetenv("RANK");
  CHECK(DistConfig::from_env().rank == 0);
}

// A rank resumed from a stale copy of another run's checkpoint at the same iteration took
// rank 0's weights but kept its own momentum, and the ranks drifted apart without a word; a
// rank given a copy of the data with other labels trained on them.
TEST_CASE("distributed: ranks must resume the same run and train on the same data", "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("same-run");
  REQUIRE(train_pair(dir, free_port(), {"--iterations", "2"}, "a") == std::pair{0, 0});
  fs::rename(dir / "ck.pt", dir / "a.pt");
  REQUIRE(train_pair(dir, free_port(), {"--iterations", "2"}, "b") == std::pair{0, 0});  // another run, ck.pt
  fs::copy_file(dir / "a.pt", dir / "rank1.pt");
  auto resume = [&](const std::string& tag, std::vector<std::string> rank1_extra) {
    std::vector<std::string> common{"--depth", "11", "--batch", "16", "--train-subset", "1000", "--test-subset",
                                    "100", "--warmup", "0", "--threads", "1", "--eval-every", "0", "--quiet",
                                    "--iterations", "4", "--world-size", "2", "--master-port",
                                    std::to_string(free_port()), "--dist-timeout", "60", "--resume"};
    auto a1 = common, a0 = common;
    a0.insert(a0.end(), {"--rank", "0", "--checkpoint", (dir / "ck.pt").string()});
    a1.insert(a1.end(), {"--rank", "1"});
    a1.insert(a1.end(), rank1_extra.begin(), rank1_extra.end());
    const pid_t p1 = spawn(a1, (dir / (tag + "-1.out")).string());
    const pid_t p0 = spawn(a0, (dir / (tag + "-0.out")).string());
    const int r0 = wait_exit(p0);
    return std::pair{r0, wait_exit(p1)};
  };
  const auto stale = resume("stale", {"--checkpoint", (dir / "rank1.pt").string()});
  std::string out0 = slurp(dir / "stale-0.out"), out1 = slurp(dir / "stale-1.out");
  CAPTURE(out0, out1);
  CHECK(stale == std::pair{2, 2});
  CHECK(out1.find("the ranks were started with different settings:\n  run of the checkpoint: rank 0 ") !=
        std::string::npos);
  CHECK(out1.find("\ngive every rank's --checkpoint a copy of rank 0's (the same file at the same iteration), or "
                  "resume none") != std::string::npos);
  // --auto-resume on both, rank 1 without a copy: the copy differs, not the flags, and rank 1's
  // missing checkpoint has no iteration or run to name (they read "rank 1 0" and "the same flags").
  const auto no_copy = train_pair(dir, free_port(), {"--iterations", "4", "--auto-resume"}, "b",
                                  {"--checkpoint", (dir / "none.pt").string()});
  out1 = slurp(dir / "b-1.out");
  CAPTURE(out1);
  CHECK(no_copy == std::pair{2, 2});
  CHECK(out1.find("the ranks were started with different settings:\n  resume (true: from its --checkpoint, false: a "
                  "new run): rank 0 true, rank 1 false\ngive every rank's --checkpoint a copy of rank 0's") !=
        std::string::npos);
  // Rank 1 given the checkpoint's --iterations would find the run complete; rank 0, given more,
  // would train: refused on both (both exited 0, and a script extending the run took it as
  // done; then rank 1 alone exited 0).
  const auto iterations = resume("iterations", {"--checkpoint", (dir / "ck.pt").string(), "--iterations", "2"});
  out0 = slurp(dir / "iterations-0.out");
  out1 = slurp(dir / "iterations-1.out");
  CAPTURE(out0, out1);
  CHECK(iterations == std::pair{2, 2});
  for (const auto& out : {out0, out1})
    CHECK(out.find("the ranks were started with different settings:\n  --iterations: rank 0 4, rank 1 2") !=
          std::string::npos);

  // The same run, its data a copy with one label of the first 1000 changed.
  fs::create_directories(dir / "data");
  const std::string from = "/usr/share/datasets/fashion-mnist/";
  for (const char* f : {"train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"})
    fs::create_symlink(from + f, dir / "data" / f);
  const std::string labels = (dir / "data" / "train-labels-idx1-ubyte").string();
  REQUIRE(std::system(("gunzip -c " + from + "train-labels-idx1-ubyte.gz > " + labels).c_str()) == 0);
  {
    std::fstream f(labels, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(8 + 5);
    const char label = static_cast<char>(f.get());
    f.seekp(8 + 5);
    f.put(static_cast<char>((label + 1) % 10));
  }
  fs::copy_file(dir / "ck.pt", dir / "rank1.pt", fs::copy_options::overwrite_existing);
  const auto other_data = resume("data", {"--checkpoint", (dir / "rank1.pt").string(), "--data-dir",
                                          (dir / "data").string(), "--dataset", "fashion-mnist"});
  out0 = slurp(dir / "data-0.out");
  out1 = slurp(dir / "data-1.out");
  CAPTURE(out0, out1);
  CHECK(other_data == std::pair{2, 2});
  CHECK(out0.find("the ranks were started with different settings:\n  training data (hash of its pixels and labels): "
                  "rank 0 ") != std::string::npos);
  CHECK(out0.find("\ngive every rank the same training data") != std::string::npos);
  remove_tree(dir);
}

namespace {

// Two blpa-train ranks that evaluate every 2 iterations, rank 0's evaluations `slow` seconds
// longer (BLPA_TEST_FAIL=slow-eval), writing r0.out and r1.out in `dir`; {rank 0, rank 1}.
std::pair<pid_t, pid_t> slow_eval_pair(const fs::path& dir, const char* iterations, const char* timeout, int slow,
                                       std::vector<std::string> rank0) {
  std::vector<std::string> common{"--depth", "11", "--batch", "16", "--train-subset", "1000", "--test-subset", "100",
                                  "--warmup", "0", "--threads", "1", "--eval-every", "2", "--quiet", "--iterations",
                                  iterations, "--world-size", "2", "--master-port", std::to_string(free_port()),
                                  "--dist-timeout", timeout, "--log-every", "1"};
  auto a1 = common, a0 = common;
  a1.insert(a1.end(), {"--rank", "1"});
  a0.insert(a0.end(), {"--rank", "0"});
  a0.insert(a0.end(), rank0.begin(), rank0.end());
  const pid_t p1 = spawn(a1, (dir / "r1.out").string());
  ::setenv("BLPA_TEST_FAIL", ("slow-eval:" + std::to_string(slow)).c_str(), 1);  // rank 0's only
  const pid_t p0 = spawn(a0, (dir / "r0.out").string());
  ::unsetenv("BLPA_TEST_FAIL");
  return {p0, p1};
}

}  // namespace

// A signal to rank 1 while rank 0 evaluated: rank 1 had read its flag before it began to wait,
// so the ranks went on for one more iteration. And it waited for the evaluation's end (minutes
// of ImageNet on a CPU), where a signal to rank 0 stops it at once: rank 1's stop reaches rank
// 0's evaluation through the rendezvous, which stops, to run first on the resume.
TEST_CASE("distributed: a signal during rank 0's evaluation stops every rank after it", "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("eval-signal");
  const std::string ck = (dir / "ck.pt").string();
  const auto [p0, p1] = slow_eval_pair(dir, "100000", "120", 60, {"--log", (dir / "log.jsonl").string(),
                                                                  "--checkpoint", ck, "--checkpoint-every", "1000"});
  for (int i = 0; i < 600 && slurp(dir / "log.jsonl").find("\"iter\": 2,") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::this_thread::sleep_for(std::chrono::seconds(1));  // rank 0 is in its evaluation's 60 s
  const auto sent = std::chrono::steady_clock::now();
  ::kill(p1, SIGTERM);
  int s0 = 0, s1 = 0;
  ::waitpid(p0, &s0, 0);
  ::waitpid(p1, &s1, 0);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - sent).count();
  const std::string out0 = slurp(dir / "r0.out"), out1 = slurp(dir / "r1.out");
  CAPTURE(out0, out1, secs);
  CHECK(secs < 40);  // not the evaluation's 59 s left: well under, on a loaded machine too
  CHECK((WIFSIGNALED(s1) && WTERMSIG(s1) == SIGTERM));
  CHECK((WIFSIGNALED(s0) && WTERMSIG(s0) == SIGTERM));
  CHECK(out1.find("interrupted by signal 15 after iteration 2") != std::string::npos);
  CHECK(out0.find("evaluation at iteration 2 interrupted; it runs first when the run resumes") != std::string::npos);
  CHECK(out0.find("stopped because another rank was interrupted after iteration 2") != std::string::npos);
  const auto state = blpa::read_checkpoint(ck).state;
  CHECK(state.iteration == 2);
  CHECK(state.pending_eval);
  remove_tree(dir);
}

// A rank lost while rank 0 ran the run's final evaluation: the run is whole, so rank 0
// checkpoints, exports and summarises it, exit 0. It exited 1 with its summary "failed" and no
// export, and a resume found the run complete and left them so.
TEST_CASE("distributed: a rank lost after the last iteration leaves the run whole", "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("lost-at-end");
  const std::string log = (dir / "log.jsonl").string(), summary = (dir / "s.json").string(),
                    exported = (dir / "m.pt").string(), ck = (dir / "ck.pt").string();
  const auto [p0, p1] = slow_eval_pair(dir, "2", "60", 4,
                                       {"--log", log, "--summary", summary, "--export", exported, "--checkpoint", ck});
  for (int i = 0; i < 600 && slurp(log).find("\"type\": \"train\", \"iter\": 2,") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::this_thread::sleep_for(std::chrono::seconds(1));  // rank 0 is in its final evaluation's 4 s
  ::kill(p1, SIGKILL);
  wait_exit(p1);
  const int r0 = wait_exit(p0);
  const std::string out0 = slurp(dir / "r0.out");
  CAPTURE(out0);
  CHECK(r0 == 0);
  CHECK(out0.find("rank 0 of 2: lost the other ranks after the run's last iteration") != std::string::npos);
  CHECK(fs::exists(exported));
  CHECK(blpa::read_checkpoint(ck).state.iteration == 2);
  CHECK(slurp(summary).find("{\"type\": \"summary\", \"status\": \"done\", \"iter\": 2,") == 0);
  remove_tree(dir);
}

// An evaluation longer than --dist-timeout: the rank waiting for it said only that it "lost
// the other ranks".
TEST_CASE("distributed: a rank that times out waiting for rank 0's evaluation says so", "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("slow-eval");
  const auto [p0, p1] = slow_eval_pair(dir, "4", "8", 16, {});  // 8 s: room for a loaded machine's start-up
  const int r1 = wait_exit(p1), r0 = wait_exit(p0);
  const std::string out0 = slurp(dir / "r0.out"), out1 = slurp(dir / "r1.out");
  CAPTURE(out0, out1);
  CHECK(r1 == 1);
  CHECK(r0 == 1);
  CHECK(out1.find("rank 1 of 2: lost the other ranks after iteration ") != std::string::npos);  // its evaluation
  CHECK(out1.find("This rank was waiting for rank 0's evaluation: one that takes longer than --dist-timeout (8 s) "
                  "looks the same; give a longer one.") != std::string::npos);
  CHECK(out0.find("This rank was waiting") == std::string::npos);  // rank 0 was the one evaluating
  remove_tree(dir);
}

TEST_CASE("distributed: when a rank dies the other stops with an error instead of hanging", "[distributed][train]") {
  if (!have_fashion_mnist()) return;
  const fs::path dir = fresh_dir("kill");
  std::vector<std::string> common{"--depth", "11", "--batch", "16", "--train-subset", "1000", "--test-subset", "100",
                                  "--warmup", "0", "--threads", "1", "--log-every", "1", "--eval-every", "0",
                                  "--quiet", "--world-size", "2", "--master-port", std::to_string(free_port()),
                                  "--iterations", "100000", "--dist-timeout", "30"};
  auto a1 = common, a0 = common;
  a1.insert(a1.end(), {"--rank", "1"});
  a0.insert(a0.end(), {"--rank", "0", "--log", (dir / "log.jsonl").string(), "--summary", (dir / "s.json").string()});
  const pid_t p1 = spawn(a1, (dir / "r1.out").string());
  const pid_t p0 = spawn(a0, (dir / "r0.out").string());
  for (int i = 0; i < 600 && losses(dir / "log.jsonl").size() < 3; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  REQUIRE(losses(dir / "log.jsonl").size() >= 3);
  ::kill(p1, SIGKILL);
  wait_exit(p1);
  const auto t0 = std::chrono::steady_clock::now();
  int status = 0;
  pid_t done = 0;
  while ((done = ::waitpid(p0, &status, WNOHANG)) == 0 && std::chrono::steady_clock::now() - t0 < std::chrono::seconds(90))
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  if (done == 0) {
    ::kill(p0, SIGKILL);
    ::waitpid(p0, &status, 0);
    FAIL("rank 0 was still running 90 s after rank 1 died");
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  INFO("rank 0 stopped " << secs << " s after rank 1 was killed");
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 1);
  const std::string out = slurp(dir / "r0.out");
  CAPTURE(out);
  CHECK(out.find("[error] rank 0 of 2: lost the other ranks during iteration") != std::string::npos);
  // Its summary says "failed" and why (a failed run left none, and dropped out of a sweep's table).
  const std::string summary = slurp(dir / "s.json");
  CAPTURE(summary);
  CHECK(summary.find("{\"type\": \"summary\", \"status\": \"failed\", ") == 0);
  CHECK(summary.find("\"error\": \"rank 0 of 2: lost the other ranks during iteration ") != std::string::npos);
  remove_tree(dir);
}
