// The files of a blpa-train run (its log, checkpoint, summary and export) before, during and
// after it: their locks, the checks that a run replaces or resumes only its own, the log's
// records, and the summary a second signal writes.
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "blpa/checkpoint.h"
#include "train_parts.h"

namespace blpa {

namespace fs = std::filesystem;

LogFile::~LogFile() {
  if (fd_ >= 0) ::close(fd_);
}

void LogFile::open(const std::string& path, bool append) {
  path_ = path;
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : 0), 0644);
  if (fd_ < 0) throw std::runtime_error("--log " + path + ": cannot be opened for writing (" + std::strerror(errno) + ")");
  struct stat st{};
  if (::fstat(fd_, &st) == 0 && S_ISREG(st.st_mode)) {
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK)
      throw std::runtime_error("--log " + path + " is in use by another blpa-train, under another name (a hard "
                               "link): wait for it to end, or give another path");
    if (!append && ::ftruncate(fd_, 0) != 0)
      throw std::runtime_error("--log " + path + ": cannot be emptied (" + std::strerror(errno) + ")");
  }
}

void LogFile::write(const std::string& record) {
  if (fd_ < 0) return;
  const off_t end = ::lseek(fd_, 0, SEEK_END);  // -1 for a pipe: nothing to cut there
  const char* p = record.data();
  for (size_t left = record.size(); left > 0;) {
    const ssize_t w = ::write(fd_, p, left);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const std::string why = w < 0 ? std::strerror(errno) : "no progress";
      if (end >= 0 && left < record.size()) {
        const int cut = ::ftruncate(fd_, end);  // if this fails, --resume drops the line: it has no newline
        (void)cut;
      }
      throw std::runtime_error("--log " + path_ + ": a record could not be written (" + why + ")");
    }
    p += w, left -= static_cast<size_t>(w);
  }
}

// ---- Records: the log's and the summary's one-line JSON objects ----

namespace {

// The "iter" of a log record, or -1.
int64_t record_iteration(const std::string& line) {
  const auto at = line.find("\"iter\": ");
  if (at == std::string::npos) return -1;
  return std::strtoll(line.c_str() + at + 8, nullptr, 10);
}

}  // namespace

std::string json_field(const std::string& line, const std::string& key) {
  const std::string tag = "\"" + key + "\": ";
  const auto at = line.find(tag);
  if (at == std::string::npos) return "";
  size_t i = at + tag.size(), j = i;
  if (j < line.size() && line[j] == '"') {
    for (++j; j < line.size() && line[j] != '"'; ++j)
      if (line[j] == '\\') ++j;
    return line.substr(i, j + 1 - i);
  }
  if (j < line.size() && line[j] == '[') return line.substr(i, line.find(']', j) + 1 - i);
  while (j < line.size() && line[j] != ',' && line[j] != '}') ++j;
  return line.substr(i, j - i);
}

bool whole_object(const std::string& line) {
  size_t begin = line.rfind("\xEF\xBB\xBF", 0) == 0 ? 3 : 0;
  begin = line.find_first_not_of(" \t", begin);
  const size_t end = line.find_last_not_of(" \t\r");
  if (begin == std::string::npos || line[begin] != '{') return false;
  int depth = 0;
  bool in_string = false;
  for (size_t i = begin; i <= end; ++i) {
    const char ch = line[i];
    if (in_string) {
      if (ch == '\\') ++i;
      else if (ch == '"') in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '{' || ch == '[') {
      ++depth;
    } else if ((ch == '}' || ch == ']') && --depth == 0) {
      return i == end;
    }
  }
  return false;
}

std::string first_line_of(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

namespace {

// A log's first config record (the run's settings and id), or "" where it has none.
std::string first_config_record(const std::string& path) {
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);)
    if (line.find("\"type\": \"config\"") != std::string::npos) return line;
  return "";
}

// An output of the run to resume that is there but cannot be read (its permissions): said as
// such, rather than taken for another run's file.
void check_readable(const std::string& flag, const std::string& path) {
  if (::access(path.c_str(), R_OK) != 0)
    throw std::runtime_error(flag + " " + path + ": cannot be read (" + std::strerror(errno) + ")");
}

// ---- A resume's outputs must be its run's ----

// The log must be this run's. Its first config record names the run (identity keys an older
// log lacks are not compared); a log of another run is refused before its records past the
// checkpoint are dropped.
void check_log_is_this_runs(const std::string& path, const TrainConfig& c) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec) || fs::file_size(path, ec) == 0) return;
  check_readable("--log", path);
  const std::string first = first_config_record(path);
  if (first.empty())
    throw FlagError("--log " + path + " holds no blpa-train config record: it is not the log of checkpoint " +
                    c.checkpoint + "'s run; give that run's log, or another path");
  const std::string ours = c.json();
  std::string differ;
  for (const auto& key : TrainConfig::identity_keys()) {
    const std::string theirs = json_field(first, key);
    if (!theirs.empty() && theirs != json_field(ours, key))
      differ += fmt::format("\n  {}: log {}, this run {}", key, theirs, json_field(ours, key));
  }
  const std::string theirs = json_field(first, "run_id");
  if (differ.empty() && theirs.size() > 2 && theirs != json_field(ours, "run_id"))
    differ = fmt::format("\n  run_id: log {}, checkpoint {}", theirs, json_field(ours, "run_id"));
  if (!differ.empty())
    throw FlagError("--log " + path + " is the log of another run:" + differ + "\ngive the log of checkpoint " +
                    c.checkpoint + "'s run, or another path");
}

// A summary or an export already there is replaced when the run ends, so it must be this
// run's: c.run_id is the checkpoint's, "" for a run from before run ids (whose summary without
// a run id is taken to be its own, and whose export is where it holds `net`'s tensors).
void check_outputs_are_this_runs(const TrainConfig& c, const NetConfig& net) {
  auto refuse = [&](const std::string& flag, const std::string& path, const std::string& why) {
    throw FlagError(flag + " " + path + " " + why + ": give checkpoint " + c.checkpoint + "'s run's " + flag + " (" +
                    (c.run_id.empty() ? "a run from before run ids" : "run id " + c.run_id) + "), or another path");
  };
  std::error_code ec;
  if (!c.summary_path.empty() && fs::is_regular_file(c.summary_path, ec) && fs::file_size(c.summary_path, ec) > 0) {
    check_readable("--summary", c.summary_path);
    const std::string line = first_line_of(c.summary_path);
    if (line.find("\"type\": \"summary\"") == std::string::npos) refuse("--summary", c.summary_path, "is no summary");
    const std::string theirs = json_field(line, "run_id");  // cut short in it: no closing quote
    if (theirs.size() > 2 && theirs.back() == '"' && theirs != json_string(c.run_id))
      refuse("--summary", c.summary_path, "is the summary of run " + theirs.substr(1, theirs.size() - 2));
    if (!whole_object(line))  // damaged by hand or by a disk (summaries are written whole)
      spdlog::warn("--summary {} is cut short ({} bytes, not a whole JSON object): this run replaces it when it ends",
                   c.summary_path, line.size());
  }
  if (!c.export_path.empty() && fs::is_regular_file(c.export_path, ec) && fs::file_size(c.export_path, ec) > 0) {
    check_readable("--export", c.export_path);
    // A file without a run id is not replaced: an existing torch.save file or another run's
    // checkpoint passed as no run's export, and the run's own end wrote over it.
    if (const std::string why = export_not_replaceable(c.export_path, c.run_id, net); !why.empty())
      refuse("--export", c.export_path, why);
  }
}

}  // namespace

void check_outputs_are_the_runs(TrainConfig c, const Checkpoint& resumed) {
  const auto id = resumed.config.find("run_id");
  c.run_id = id != resumed.config.end() ? id->second : "";
  if (!c.log_path.empty()) check_log_is_this_runs(c.log_path, c);
  check_outputs_are_this_runs(c, resumed.net);
}

int64_t drop_records_after(const std::string& path, int64_t iteration, bool evaluates, bool window_open) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return 0;  // a device or a pipe keeps what it was given
  std::ifstream in(path);
  if (!in) return 0;
  std::string kept;
  int64_t dropped = 0, removed = 0, number = 0;
  for (std::string line; std::getline(in, line);) {
    ++number;
    const int64_t at = record_iteration(line);
    // At the checkpoint's iteration: its evaluation, run again; and where the checkpoint holds an
    // open log window, a train record a resume at the run's end wrote from it, written again.
    const bool redone = at == iteration && ((evaluates && line.rfind("{\"type\": \"eval\", ", 0) == 0) ||
                                            (window_open && line.rfind("{\"type\": \"train\", ", 0) == 0));
    if (at > iteration || redone) {
      ++dropped;
      ++removed;
      continue;
    }
    // Cut short at or before the checkpoint's iteration (eof: no newline after it): the resumed
    // run does not compute that record again (its window was closed), so the log has none for
    // it. Said, not counted among the records "after" the checkpoint.
    if (in.eof()) {
      const size_t digits = line.find("\"iter\": ") + 8;  // cut in its number: not the iteration it was
      const bool whole = at >= 0 && line.find_first_not_of("0123456789", digits) != std::string::npos;
      // A run's config record covers no iterations: "(up to 0)" said nothing.
      if (line.rfind("{\"type\": \"config\"", 0) == 0)
        spdlog::warn("--log {}: its last record, a run's config record, was cut short (a write interrupted) and is "
                     "removed; this run writes its own",
                     path);
      else
        spdlog::warn("--log {}: its last record was cut short (a write interrupted) and is removed; the log has no "
                     "record for the iterations it covered{}",
                     path, whole ? fmt::format(" (up to {})", at) : std::string());
      ++removed;
      continue;
    }
    // A line damaged in the middle (by hand, by a disk): kept, it made the log no JSON lines
    // for plot.sh and every reader after it. A blank one goes without a word.
    if (line.find_first_not_of(" \t\r") == std::string::npos) {
      ++removed;
      continue;
    }
    if (!whole_object(line)) {
      spdlog::warn("--log {}: line {} is no whole JSON record (damaged) and is removed: '{}'", path, number,
                   line.size() > 60 ? line.substr(0, 60) + "..." : line);
      ++removed;
      continue;
    }
    kept += line + "\n";
  }
  if (removed > 0) {
    AtomicFile f(path);
    f.write(kept);
    f.commit();
  }
  return dropped;
}

// ---- Sweeps run again ----

namespace {

// A describe()'s key=value lines, by key.
std::map<std::string, std::string> key_values(const std::string& describe) {
  std::map<std::string, std::string> kv;
  std::istringstream lines(describe);
  for (std::string line; std::getline(lines, line);)
    if (const auto eq = line.find('='); eq != std::string::npos) kv[line.substr(0, eq)] = line.substr(eq + 1);
  return kv;
}

// --cuda-graphs as it acted, where a run recorded "auto" unresolved (before 2026-12-04): off
// on the CPU and with several ranks, as resolve() now records it. `device` and `world` as the
// run recorded them.
std::string graphs_as_acted(const std::string& graphs, const std::string& device, const std::string& world) {
  return graphs == "auto" && (device.rfind("cuda", 0) != 0 || (!world.empty() && world != "1")) ? "off" : graphs;
}

// The settings that act on training steps alone (not on an evaluation or the outputs).
const std::set<std::string>& training_keys() {
  static const std::set<std::string> keys{"lr",           "warmup",      "warmup_lr", "steps",     "factor",
                                          "momentum",     "weight_decay", "accum_steps", "log_every", "eval_every",
                                          "checkpoint_every", "cuda_graphs"};
  return keys;
}

}  // namespace

void refuse_diverged_rerun(const TrainConfig& c) {
  if (c.summary_path.empty()) return;
  const std::string summary = first_line_of(c.summary_path), ours = c.json();
  if (json_field(summary, "status") != "\"diverged\"") return;
  if (!c.resume)  // diverged before its first checkpoint: nothing to resume, whatever the settings
    throw NonFiniteLoss(fmt::format(
        "--auto-resume: the run of summary {} diverged after iteration {}, before its first checkpoint ({} does not "
        "exist): there is nothing to resume. Start it again with --overwrite (and a lower --lr)",
        c.summary_path, json_field(summary, "iter"), c.checkpoint));
  for (const char* key : {"lr", "warmup", "warmup_lr", "steps", "factor", "momentum", "weight_decay", "accum_steps"})
    if (json_field(summary, key) != json_field(ours, key)) return;
  throw NonFiniteLoss(fmt::format(
      "--auto-resume: the run of checkpoint {} diverged after iteration {} with --lr {} (summary {}) and would "
      "again with the same learning rate, momentum and weight decay: not retried. Give a lower --lr (or other "
      "--lr-steps, --warmup, ...) to resume it, or start again with --overwrite",
      c.checkpoint, json_field(summary, "iter"), json_field(summary, "lr"), c.summary_path));
}

// --auto-resume without a checkpoint, where the summary says this run (its identity and
// --iterations) is done: its checkpoint was deleted (a sweep that keeps disks small), and
// there is nothing to do, as with the checkpoint there. It was refused as a new run over
// existing files, exit 2, on every rerun of the sweep.
void skip_completed_rerun(const TrainConfig& c) {
  std::error_code ec;
  if (c.summary_path.empty() || !fs::is_regular_file(c.summary_path, ec)) return;
  const std::string summary = first_line_of(c.summary_path), ours = c.json();
  if (!whole_object(summary) || json_field(summary, "status") != "\"done\"" ||
      json_field(summary, "iter") != std::to_string(c.iterations))
    return;
  for (const auto& key : TrainConfig::identity_keys())
    if (json_field(summary, key) != json_field(ours, key)) return;
  // Every other setting that differs (the identity and --iterations agree, as checked above),
  // as a resume of the evaluated run's checkpoint says them (compare_with_checkpoint): the
  // evaluation's (--test-subset, --device, ...) act on nothing either. A threads of 0 is an
  // older run's record of the default, unresolved.
  std::string idle;
  for (const auto& [key, value] : key_values(c.describe())) {
    std::string theirs = json_field(summary, key);
    if (key == "cuda_graphs" && theirs == "\"auto\"") {  // JSON strings: their quotes stripped and put back
      const std::string device = json_field(summary, "device");
      theirs = "\"" + graphs_as_acted("auto", device.size() > 1 ? device.substr(1, device.size() - 2) : "",
                                     json_field(summary, "world")) + "\"";
    }
    if (theirs.empty() || theirs == json_field(ours, key) || (key == "threads" && theirs == "0")) continue;
    idle += fmt::format("\n  {}: summary {}, command line {}", key, theirs, json_field(ours, key));
  }
  if (!idle.empty())
    spdlog::warn("--auto-resume: these settings differ from the summary's, but its run is done and evaluated: "
                 "nothing is left for them to change (another run needs other output paths){}",
                 idle);
  // Its export gone too: nothing can write it again, and a sweep that collects them would
  // find it missing without a word.
  if (!c.export_path.empty() && !fs::exists(c.export_path, ec))
    spdlog::warn("--auto-resume: --export {} does not exist, and its run's checkpoint {} is gone: it cannot be "
                 "written again (train the run anew with --overwrite)",
                 c.export_path, c.checkpoint);
  throw RunComplete(fmt::format("--auto-resume: summary {} says this run is done at iteration {} (its checkpoint {} "
                                "is gone): nothing to do",
                                c.summary_path, c.iterations, c.checkpoint));
}

// ---- A new run's outputs: locked, and replacing nothing unless told to ----

std::string draw_run_id() {
  std::random_device device;
  const uint64_t bits = (uint64_t{device()} << 32 | device()) ^
                        static_cast<uint64_t>(std::chrono::system_clock::now().time_since_epoch().count());
  return fmt::format("{:016x}", bits);
}

namespace {

// Throws, closing `fd`: the lock `file` of output `path` could not be taken (errno `e`).
[[noreturn]] void refuse(int fd, int e, const std::string& file, const std::string& path, const std::string& flag) {
  char text[32] = {};
  const ssize_t n = ::pread(fd, text, sizeof text - 1, 0);
  ::close(fd);
  // The pid its holder wrote, if that process lives (a killed run's stays in the file until
  // the next run that locks it writes its own).
  const long pid = n > 0 ? std::strtol(text, nullptr, 10) : 0;
  const bool alive = pid > 0 && (::kill(static_cast<pid_t>(pid), 0) == 0 || errno == EPERM);
  if (e == EWOULDBLOCK)
    throw std::runtime_error(fmt::format("{} {} is in use by another blpa-train{}: wait for it to end, or give "
                                         "another path",
                                         flag, path, alive ? fmt::format(" (process {})", pid) : std::string()));
  throw std::runtime_error(fmt::format("{} {}: its lock file {} cannot be locked ({})", flag, path, file,
                                       std::strerror(e)));
}

}  // namespace

OutputLocks::~OutputLocks() {
  for (const auto& [lock, fd] : held_) {
    ::unlink(lock.c_str());  // before the close: a run waiting on this file sees it gone
    ::close(fd);
    release_transient(lock);
  }
}

void OutputLocks::add(const std::string& path, const std::string& flag) {
  std::error_code ec;
  if (path.empty() || (fs::exists(path, ec) && !fs::is_regular_file(path, ec))) return;  // a device, a pipe
  const fs::path parent = fs::path(path).has_parent_path() ? fs::path(path).parent_path() : fs::path(".");
  if (!fs::exists(parent, ec)) fs::create_directories(parent, ec);
  // PATH.lock beside the path as given; and where the path is a symbolic link, beside the
  // file it names too (one not written yet, too), which is the file written: a link to a
  // running run's checkpoint or log is that run's file.
  lock(path + ".lock", path, flag);
  const fs::path target = fs::absolute(link_target(path));
  if (target != fs::absolute(path)) {
    // Its folder first, as writing creates it: a lock that cannot be created is skipped.
    if (!fs::exists(target.parent_path(), ec)) fs::create_directories(target.parent_path(), ec);
    const fs::path resolved = fs::weakly_canonical(target, ec);
    if (!ec) lock(resolved.string() + ".lock", path, flag);
  }
}

// Takes `file` (creating it), or throws naming the run that holds it; returns quietly where
// the file cannot be created (the output checks after this say why, naming the flag).
void OutputLocks::lock(const std::string& file, const std::string& path, const std::string& flag) {
  for (;;) {
    // A folder that cannot take the lock file cannot take a checkpoint either: the checks
    // after this one say why, naming the flag.
    int fd = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 && errno == EACCES) fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);  // another user's: flock works
    if (fd < 0 && errno == EISDIR)
      throw FlagError(
          fmt::format("{} {}: {} is a folder, where the run keeps its lock: remove it", flag, path, file));
    if (fd < 0) return;
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) refuse(fd, errno, file, path, flag);
    // Locked; but if the run that held it removed the file meanwhile, this lock is on a
    // file nobody else will open: start again.
    struct stat mine {}, named {};
    if (::fstat(fd, &mine) == 0 && ::stat(file.c_str(), &named) == 0 && mine.st_ino == named.st_ino &&
        mine.st_dev == named.st_dev) {
      const std::string pid = std::to_string(::getpid());  // only for the message above
      const bool noted = ::ftruncate(fd, 0) == 0 && ::pwrite(fd, pid.data(), pid.size(), 0) > 0;
      (void)noted;
      held_.emplace_back(file, fd);
      hold_transient(file);
      return;
    }
    ::close(fd);
  }
}

bool records_no_training(const std::string& path, const std::string& flag) {
  if (flag == "--summary") {
    const std::string summary = first_line_of(path);
    return json_field(summary, "iter") == "0" && json_field(summary, "status") != "\"done\"";
  }
  if (flag != "--log") return false;
  std::ifstream in(path);
  int64_t configs = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.find("{\"type\": \"config\", ") != 0) return false;
    ++configs;
  }
  return configs > 0 && in.eof();
}

std::vector<std::pair<std::string, std::string>> outputs_of(const TrainConfig& c) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [path, flag] : {std::pair<std::string, const char*>{c.checkpoint, "--checkpoint"},
                                   {c.log_path, "--log"},
                                   {c.export_path, "--export"},
                                   {c.summary_path, "--summary"}})
    if (!path.empty()) out.emplace_back(path, flag);
  return out;
}

namespace {

// --print-config: whether a run holds `path`'s lock, found without creating the lock file
// (a shared lock, taken and dropped at once, fails where a run holds its exclusive one).
void refuse_if_locked(const std::string& path, const std::string& flag) {
  std::error_code ec;
  // Beside the path as given and, for a link, beside the file it names, as OutputLocks locks.
  const fs::path target = fs::weakly_canonical(fs::absolute(link_target(path)), ec);
  for (const std::string& file : {path + ".lock", ec ? path + ".lock" : target.string() + ".lock"}) {
    const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    if (::flock(fd, LOCK_SH | LOCK_NB) != 0) refuse(fd, errno, file, path, flag);
    ::close(fd);
  }
}

// What an existing log or summary holds, for a message about replacing it: " (the summary of
// run ID, done at iteration N)", " (the log of run ID)", or "" where it says nothing of one.
std::string whose(const std::string& path, const std::string& flag) {
  std::string line;
  if (flag == "--summary") {
    line = first_line_of(path);
    if (line.find("\"type\": \"summary\"") == std::string::npos) return "";
  } else if (flag == "--log") {
    line = first_config_record(path);
  }
  const std::string id = json_field(line, "run_id");
  if (id.size() < 3 || id.front() != '"' || id.back() != '"') return "";
  const std::string run = "run " + id.substr(1, id.size() - 2);
  if (flag == "--log") return " (the log of " + run + ")";
  const std::string status = json_field(line, "status");
  return fmt::format(" (the summary of {}, {} at iteration {})", run,
                     status.size() > 2 ? status.substr(1, status.size() - 2) : "?", json_field(line, "iter"));
}

// A fresh run replaces no earlier run's files unless told to.
void refuse_replacing(const TrainConfig& c) {
  std::error_code ec;
  const bool resumable = !c.checkpoint.empty() && fs::is_regular_file(c.checkpoint, ec);
  for (const auto& [path, flag] : outputs_of(c)) {
    const bool is_log = flag == "--log";
    if (!c.resume && !c.overwrite && fs::is_regular_file(path, ec) && (!is_log || fs::file_size(path, ec) > 0) &&
        !(c.auto_resume && records_no_training(path, flag)))
      throw FlagError(flag + " " + path + whose(path, flag) + " already exists: " +
                      (resumable          ? "continue that run with --resume, or replace it with --overwrite"
                       : c.checkpoint.empty() ? "without --checkpoint there is nothing to continue it from; replace "
                                                "it with --overwrite, or give another path"
                                              : "it has no checkpoint to continue from; replace it with --overwrite, "
                                                "or give another path"));
  }
}

// Each output can be written where it goes (`write` false: judged without creating anything).
void check_output_paths(const TrainConfig& c, bool write) {
  for (const auto& [path, flag] : outputs_of(c)) {
    try {
      check_output_path(path, flag, flag != "--log", write);
    } catch (const std::invalid_argument& e) {
      throw FlagError(e.what());
    }
  }
}

}  // namespace

void prepare_outputs(const TrainConfig& c, OutputLocks& locks) {
  for (const auto& [path, flag] : outputs_of(c)) locks.add(path, flag);  // first: the checks write probes
  refuse_replacing(c);
  check_output_paths(c, /*write=*/true);  // the probes, which create the log: not for a run refused above
  if (c.resume && !fs::exists(c.checkpoint))
    throw FlagError("--resume: checkpoint " + c.checkpoint + " does not exist");
}

void check_outputs_unwritten(const TrainConfig& c) {
  for (const auto& [path, flag] : outputs_of(c)) refuse_if_locked(path, flag);
  refuse_replacing(c);
  check_output_paths(c, /*write=*/false);
}

// ---- The checkpoint a run resumes ----

EndLeft end_left(const Checkpoint& ck, const TrainConfig& config) {
  EndLeft left;
  if (ck.state.pending_eval) {
    left.evaluate = true;
    return left;
  }
  const auto evaluated = ck.config.find("evaluated");
  std::error_code ec;
  const bool lead = config.dist.rank == 0;  // the others cannot see rank 0's files
  left.export_missing = lead && !config.export_path.empty() && !fs::exists(config.export_path, ec);
  const std::string summary = config.summary_path.empty() ? "" : first_line_of(config.summary_path);
  const bool unfinished_summary =
      lead && !config.summary_path.empty() &&
      (!whole_object(summary) || json_field(summary, "status") != "\"done\"" ||
       json_field(summary, "iter") != std::to_string(ck.state.iteration));
  left.evaluate = (evaluated != ck.config.end() && evaluated->second == "0") || unfinished_summary;
  return left;
}

namespace {

// The precision checkpoint `ck` was trained in. One from before --precision and --memory-format
// ran as LibTorch does by default: float32, with TF32 convolutions (not matrix products) on
// CUDA; its precision is taken as the closest, fp32 on the CPU, tf32 on CUDA.
std::string trained_precision(const Checkpoint& ck) {
  if (const auto p = ck.config.find("precision"); p != ck.config.end()) return p->second;
  const auto device = ck.config.find("device");
  return device != ck.config.end() && device->second.rfind("cuda", 0) == 0 ? "tf32" : "fp32";
}

// --resume: the checkpoint's run and this command line must agree on the identity; any other
// setting that differs takes effect and is listed, with both values: returned, to be said once
// no other check refuses the resume.
std::vector<std::pair<spdlog::level::level_enum, std::string>> compare_with_checkpoint(const Checkpoint& ck,
                                                                                       const TrainConfig& c) {
  auto saved = ck.config;
  if (!saved.count("world")) saved["world"] = ck.identity.find(" world=") == std::string::npos
                                                  ? "1"
                                                  : ck.identity.substr(ck.identity.find(" world=") + 7);
  // A checkpoint from before --precision and --memory-format: NCHW, and the closest precision.
  saved["precision"] = trained_precision(ck);
  if (!saved.count("memory_format")) saved["memory_format"] = "nchw";
  if (saved["threads"] == "0") saved["threads"] = std::to_string(c.threads);  // recorded unresolved: the default
  if (const auto g = saved.find("cuda_graphs"); g != saved.end())
    g->second = graphs_as_acted(g->second, saved["device"], saved["world"]);
  // Before resolve() named it, the default folder was recorded as "".
  if (saved["data_dir"].empty() && saved["train_list"].empty()) saved["data_dir"] = data::kDebianFashionMnist;
  const auto now = key_values(c.describe());
  std::set<std::string> identity(TrainConfig::identity_keys().begin(), TrainConfig::identity_keys().end());
  // A tf32 run moved to the CPU, which has no TF32, goes on in its float32 arithmetic, fp32
  // (were it refused, only a GPU could resume it: tf32 needs CUDA).
  const bool tf32_on_cpu =
      saved["precision"] == "tf32" && c.precision == "fp32" && !torch::Device(c.device).is_cuda();
  if (tf32_on_cpu) identity.erase("precision");
  // At the run's last iteration no step is left for the training settings to act on; the
  // others (the test subset, device, workers, ...) still set a final evaluation's, unless it
  // was evaluated there (complete, or only its export left to write): then none acts but
  // --iterations, which made that iteration the last.
  const bool at_end = ck.state.iteration == c.iterations;
  const bool evaluated = at_end && !end_left(ck, c).evaluate;
  std::string refused, changed, idle;
  for (const auto& [key, value] : now) {
    const auto it = saved.find(key);
    if (it == saved.end() || it->second == value) continue;
    std::string& list = identity.count(key)                                                      ? refused
                        : (evaluated && key != "iterations") || (at_end && training_keys().count(key)) ? idle
                                                                                                       : changed;
    // Settings that can change the arithmetic (its order, or TF32 for float32): the run's
    // numbers may then part, in rounding, from those of a resume without the change (which is
    // bit for bit). CPU threads only where the CPU computes.
    const bool rounding = &list == &changed && (key == "device" || key == "memory_format" || key == "precision" ||
                                                (key == "threads" && !torch::Device(c.device).is_cuda()));
    list += fmt::format("\n  {}: checkpoint {}, command line {}{}{}", key, it->second, value,
                        key == "precision" && tf32_on_cpu ? " (the CPU has no TF32)" : "",
                        rounding ? " (other rounding: the numbers from here may differ slightly from an "
                                   "unchanged resume's)"
                                 : "");
  }
  if (!refused.empty())
    throw FlagError("--resume: checkpoint " + ck.path + " belongs to a different run:" + refused +
                    "\nresume with the same data set, training subset, augmentation, model, mode (bits, window, lift), "
                    "batch, seed, precision and world size, or start a new run");
  // A run at its last iteration trains no more: a sweep over --lr whose file names leave lr
  // out was told that each new one "takes effect", then "nothing to do".
  std::vector<std::pair<spdlog::level::level_enum, std::string>> notes;
  if (!idle.empty())
    notes.emplace_back(spdlog::level::warn,
                       fmt::format("--resume: these settings differ from the checkpoint's, but its run is at its "
                                   "--iterations {}{}: {} is left for them to change (another run needs other "
                                   "output paths){}",
                                   c.iterations, evaluated ? " and evaluated" : "",
                                   evaluated ? "nothing" : "no iteration", idle));
  if (!changed.empty())
    notes.emplace_back(spdlog::level::info,
                       "--resume: these settings differ from the checkpoint's and take effect:" + changed);
  return notes;
}

}  // namespace

Checkpoint read_resumed_checkpoint(TrainConfig& config, const TrainConfig& given, bool lead) {
  Checkpoint ck;
  try {
    ck = read_checkpoint(config.checkpoint);
  } catch (const CheckpointError& e) {  // a sweep's --auto-resume fails on it at every rerun: say what helps
    if (std::string(e.what()).find(" is damaged or truncated: ") == std::string::npos) throw;
    throw CheckpointError(std::string(e.what()) + ". A run keeps one checkpoint: resume a copy of it if you kept "
                          "one, or start the run again with --overwrite");
  }
  // --precision auto resumes at the checkpoint's precision, as blpa-eval runs it (tf32 as fp32
  // on the CPU, which has no TF32; one from before the flag at its closest, so that a CPU run's
  // resumes on CUDA in fp32, where it was refused as tf32); --memory-format auto at its layout
  // (NCHW for one from before the flag), so that a resume without either goes on as the run
  // went (auto took the device's layout, and the numbers parted from an unchanged resume's).
  const std::string trained = trained_precision(ck);
  if (given.precision == "auto" && (trained == "fp32" || trained == "bf16" || trained == "tf32"))
    config.precision = eval_precision(given.precision, trained, torch::Device(config.device));
  const auto layout = ck.config.find("memory_format");
  config.memory_format = eval_layout(given.memory_format, layout == ck.config.end() ? "" : layout->second);
  config.resolve_numerics();
  // A run on an MNIST folder that auto took for Fashion-MNIST (before the images told them
  // apart) resumes as the run it is.
  const auto dataset = ck.config.find("dataset");
  auto idx = [](const std::string& d) { return d == "mnist" || d == "fashion-mnist"; };
  if (given.dataset == "auto" && dataset != ck.config.end() && idx(dataset->second) && idx(config.dataset))
    config.dataset = dataset->second;
  // A run cannot go back: exit 0 ("nothing to do") left an interrupted run unevaluated,
  // unexported and summarised "interrupted", and a sweep took it for finished.
  if (ck.state.iteration > config.iterations)
    throw FlagError(fmt::format("checkpoint {} is at iteration {}, past --iterations {}: a run cannot go back; give "
                                "--iterations {} to finish it there, or more to go on (or --overwrite to start again)",
                                config.checkpoint, ck.state.iteration, config.iterations, ck.state.iteration));
  const auto notes = compare_with_checkpoint(ck, config);
  if (lead) check_outputs_are_the_runs(config, ck);  // with the checkpoint's id
  if (lead && config.auto_resume) refuse_diverged_rerun(config);
  if (lead && config.auto_resume) spdlog::info("--auto-resume: resuming the run in {}", config.checkpoint);
  for (const auto& [level, text] : notes) spdlog::log(level, text);
  return ck;
}

void SummaryDraft::open(const std::string& path) {
  std::lock_guard<std::mutex> lock(mutex_);
  path_ = path;
  draft_.clear();
  open_ = true;
}

void SummaryDraft::publish(std::string text) {
  std::lock_guard<std::mutex> lock(mutex_);
  draft_ = std::move(text);
}

void SummaryDraft::close() {
  // Waits for a write() under way: the run's own summary, written after this, comes last, and
  // its AtomicFile never meets the draft's.
  std::lock_guard<std::mutex> lock(mutex_);
  open_ = false;
}

void SummaryDraft::write() noexcept {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!open_ || draft_.empty()) return;
  try {
    AtomicFile f(path_);
    f.write(draft_);
    f.commit();
  } catch (const std::exception&) {  // the run stops at once all the same; no summary then
  }
}

}  // namespace blpa
