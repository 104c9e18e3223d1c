// blpa-train: trains a ResNet with approximate activations. Defaults are the paper's CIFAR
// protocol (DESIGN.md 1.7); --preset imagenet is its ResNet-152 ImageNet protocol; without
// --data-dir it trains on Debian's Fashion-MNIST.
#include <blpa/checkpoint.h>
#include <blpa/codec.h>
#include <blpa/train.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstring>
#include <iostream>
#include <string>
#include <thread>

#include "flags.h"
#include "train_flags.h"

namespace {

std::atomic<bool> g_stop{false};
std::atomic<int> g_signal{0};
std::atomic<int> g_phase{0};  // 0 before train(), 1 in it, 2 after it returned or threw
blpa::SummaryDraft g_draft;           // what a second signal leaves in --summary

// A leading newline ends the progress line a terminal shows (rewritten in place, with no
// newline of its own); where standard error is a file it would leave a blank line.
void say(const char* text) {
  static const bool terminal = ::isatty(STDERR_FILENO) == 1;
  if (text[0] == '\n' && !terminal) ++text;
  const ssize_t n = ::write(STDERR_FILENO, text, std::strlen(text));
  (void)n;
}

// SIGINT and SIGTERM are blocked in every thread and taken here (sigwait), so that no data or
// LibTorch thread runs what they do, and it need not be async-signal-safe. Before training
// they stop the program as by default. In training, the first asks for a checkpoint and a
// clean exit after the current step (or at once during an evaluation); a second one (not the
// first again within half a second, nor a repeated SIGHUP: see below) stops at
// once, without a checkpoint (the user insists), and says so: the last checkpoint written
// stays as it was, and --summary gets the summary of an interruption (SummaryDraft). After
// it, the run's files are written, and a signal changes nothing.
void take_signals(sigset_t set, std::string checkpoint, bool writes_checkpoints) {
  const bool checkpointing = !checkpoint.empty();
  std::chrono::steady_clock::time_point first_at;  // of the signal that asked for the stop
  for (;;) {
    int sig = 0;
    if (::sigwait(&set, &sig) != 0 || g_phase.load() == 2) continue;
    // A closed terminal sends SIGHUP twice (bash passes it on to its jobs, then the kernel to
    // the foreground group): a repeated one is not the user insisting. Nor is the first
    // signal again within half a second: GNU timeout sends SIGTERM to the run and then to its
    // process group, which lost the checkpoint it was asking for when the two came apart.
    const auto now = std::chrono::steady_clock::now();
    if (sig == SIGHUP && g_signal.load() != 0) continue;
    if (sig == g_signal.load() && now - first_at < std::chrono::milliseconds(500)) continue;
    int none = 0;  // the signal is stored before the stop is seen: the main thread names it
    if (g_phase.load() == 1 && g_signal.compare_exchange_strong(none, sig)) {
      first_at = now;
      g_stop.store(true);
      say(checkpointing ? "\nblpa-train: stopping after the current step and writing a checkpoint (a second "
                          "signal stops at once, without one; a new run still loading stops before it writes "
                          "anything)\n"
                        : "\nblpa-train: stopping after the current step (a second signal stops at once)\n");
      continue;
    }
    if (g_phase.load() == 1) {
      g_draft.write();
      blpa::remove_transient_files();  // lock files, a checkpoint half written
      say(!checkpointing || !writes_checkpoints ? "\nblpa-train: stopped at once by a second signal\n"
          : ::access(checkpoint.c_str(), F_OK) == 0
              ? "\nblpa-train: stopped at once by a second signal: no checkpoint of the current iteration (the last "
                "one written is kept)\n"
              : "\nblpa-train: stopped at once by a second signal, before the run's first checkpoint: there is none "
                "to resume\n");
    }
    if (g_phase.load() == 1) blpa::post_stop_now();  // several ranks: the others end as interrupted, by the signal
    std::signal(sig, SIG_DFL);  // the default: the process ends, killed by the signal
    ::pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
    ::raise(sig);
    ::_exit(128 + sig);
  }
}

// Ends the process by `sig` itself, once everything is written: a shell running a loop of
// runs (a sweep) sees that its child was interrupted and stops too, where an exit code of
// 128 + N would have let it start the next run. Shells report the same 128 + N.
void end_by(int sig) {
  spdlog::default_logger()->flush();
  std::fflush(nullptr);
  std::signal(sig, SIG_DFL);
  sigset_t only;
  sigemptyset(&only);
  sigaddset(&only, sig);
  ::pthread_sigmask(SIG_UNBLOCK, &only, nullptr);
  ::raise(sig);
}

// A run that fails after a signal (its summary cannot be written, say) still ends by the
// signal, once its error is said: the user asked the sweep to stop.
int exit_code(int code) {
  if (const int sig = g_signal.load()) end_by(sig);
  return code;
}

// The signals that stop a run, taken by take_signals. SIGHUP (the terminal or ssh session
// closed) is taken as SIGTERM, unless nohup ignores it. SIGINT is taken even where it came
// ignored: a script's `cmd &` ignores it (non-interactive bash does), and a Ctrl-C on a script
// that started runs or ranks so (scripts/precision.sh, the README's ranks) then stops them all
// with their checkpoints, where they would run on with the script gone. (Linux keeps a blocked
// signal pending whatever its disposition.)
sigset_t stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  if (struct sigaction hup {}; ::sigaction(SIGHUP, nullptr, &hup) == 0 && hup.sa_handler != SIG_IGN)
    sigaddset(&set, SIGHUP);
  return set;
}

// Blocked as the program is loaded, before any library's initialisers: the dynamic loader runs
// an executable's preinit array first. LibTorch's take 0.3 s, and a signal then was lost: one
// a script's `cmd &` sent (ignored, as above), and the run trained to its end. Every thread
// inherits the mask, LibTorch's and train()'s, so that only take_signals takes them.
void block_stop_signals(int, char**, char**) {
  const sigset_t set = stop_signals();
  ::sigprocmask(SIG_BLOCK, &set, nullptr);
}
__attribute__((section(".preinit_array"), used)) void (*const g_block_at_load)(int, char**, char**) =
    block_stop_signals;

}  // namespace

int main(int argc, char** argv) {
  const sigset_t signals = stop_signals();  // blocked since the program was loaded
  // A program that will not train takes them as by default again (and one already pending
  // now): --help, --print-config (which reads the data folder) and a refused command line.
  auto unblock = [&] { ::pthread_sigmask(SIG_UNBLOCK, &signals, nullptr); };
  blpa::quiet_library_log();
  blpa::TrainCommand cmd;
  try {
    cmd = blpa::parse_train_command(argc, argv);
  } catch (const std::exception& e) {
    unblock();
    std::cerr << "blpa-train: " << blpa::error_message(e) << "\nRun blpa-train --help for the options.\n";
    return 2;
  }
  if (cmd.help || cmd.print_config) unblock();
  if (cmd.help) {
    std::cout << cmd.help_text << std::endl;
    return blpa::checked_output("blpa-train", 0);
  }
  const blpa::TrainConfig& c = cmd.config;
  if (cmd.print_config) {
    try {
      std::cout << blpa::printed_config(c) << std::flush;
      return blpa::checked_output("blpa-train", 0);
    } catch (const std::exception& e) {  // the run's exit codes: 3 for a diverged run --auto-resume skips
      std::cerr << "blpa-train: " << blpa::error_message(e) << "\n";
      return dynamic_cast<const blpa::FlagError*>(&e) ? 2 : dynamic_cast<const blpa::NonFiniteLoss*>(&e) ? 3 : 1;
    }
  }

  // A console that has gone (`blpa-train ... | tee log` where Ctrl-C ends tee first, or
  // `| head`) must not end the run by SIGPIPE before it writes its checkpoint: writes to it
  // fail instead, and the run goes on, or stops as the signal it was sent asks.
  std::signal(SIGPIPE, SIG_IGN);
  // Rank 0 writes the checkpoints: only it can say whether there is one. In training from here
  // (phase 1), before the thread takes a signal that came while the program loaded: taken in
  // phase 0, it would end the program as by default, without a word.
  g_phase.store(1);
  std::thread(take_signals, signals, c.checkpoint, c.dist.rank == 0).detach();
  // A file-size limit (ulimit -f) makes writes fail with EFBIG, reported like a full disk,
  // instead of killing the process mid-checkpoint.
  std::signal(SIGXFSZ, SIG_IGN);
  try {
    const auto r = [&] {
      struct Training {  // until train() returns or throws
        Training() { g_phase.store(1); }
        ~Training() { g_phase.store(2); }
      } training;
      return blpa::train(c, &g_stop, &g_draft, &g_signal);
    }();
    if (r.interrupted) {
      // A rank without a signal of its own stopped because another rank was interrupted: it
      // ends as that one does, by its signal, so that a loop of runs on its machine stops too.
      const int sig = g_signal.load() ? g_signal.load() : r.stop_signal ? r.stop_signal : SIGINT;
      spdlog::warn("{} after iteration {}{}",
                   g_signal.load() ? fmt::format("interrupted by signal {}", sig)
                                   : std::string("stopped because another rank was interrupted"),
                   r.iteration,
                   c.checkpoint.empty()
                       ? std::string(" (no --checkpoint: progress is lost)")
                   : !c.dist.enabled()
                       ? fmt::format("; checkpoint {} holds iteration {}, continue with --resume", c.checkpoint,
                                     r.iteration)
                       : fmt::format("; {} holds iteration {}, continue with --resume on every rank",
                                     c.dist.rank == 0 ? "checkpoint " + c.checkpoint : "rank 0's checkpoint",
                                     r.iteration));
      end_by(sig);
      return 128 + sig;
    }
    // NaN: this process trained no iteration (a resumed run that only finished its evaluation).
    const std::string last = std::isfinite(r.last_loss) ? fmt::format("loss of the last iteration {:.4f}", r.last_loss)
                                                        : std::string("no iteration trained in this process");
    if (c.dist.rank == 0 && r.evaluated)
      spdlog::info("done: {} iterations, {}, test loss {:.4f}, test error {:.2f}% (top-5 error {:.2f}%)", r.iteration,
                   last, r.test_loss, 100 * (1 - r.test_acc), 100 * (1 - r.test_top5));
    else if (c.dist.rank == 0)  // a complete run resumed for its lost export: its summary has the scores
      spdlog::info("done: {} iterations, {}, not evaluated again (the export was written{})", r.iteration, last,
                   c.summary_path.empty() ? "" : "; --summary " + c.summary_path + " keeps the run's scores");
    else
      spdlog::info("done: {} iterations, {} (rank {}; rank 0 evaluates)", r.iteration, last, c.dist.rank);
    // A signal in the last iteration: done, and a sweep stops too; on every rank, where the
    // ranks told each other of it (one ended by the signal and the others exited 0).
    if (!g_signal.load() && r.stop_signal != 0)
      spdlog::info("another rank was sent signal {} in the run's last iteration: ending by it too", r.stop_signal);
    if (const int sig = g_signal.load() ? g_signal.load() : r.stop_signal) end_by(sig);
    return 0;
  } catch (const blpa::RunComplete& e) {
    spdlog::info("{}", e.what());
    return exit_code(0);
  } catch (const blpa::Stopped& e) {
    spdlog::warn("{}", e.what());
    const int sig = g_signal.load() ? g_signal.load() : e.signal ? e.signal : SIGINT;
    end_by(sig);  // as an interrupted run: by the signal, so that a loop of runs stops too
    return exit_code(128 + sig);
  } catch (const blpa::FlagError& e) {
    std::cerr << "blpa-train: " << e.what() << "\n";
    return exit_code(2);
  } catch (const blpa::NonFiniteLoss& e) {
    spdlog::error("{}", e.what());
    return exit_code(3);
  } catch (const std::exception& e) {
    spdlog::error("{}", blpa::error_message(e));
    return exit_code(1);
  }
}
