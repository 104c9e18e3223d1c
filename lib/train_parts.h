// What the parts of blpa-train's library share, and nothing outside lib/ uses: the run's
// output files (run_files.cpp) and the evaluations (evaluation.cpp), for the training loop
// (train.cpp). The interface is blpa/train.h.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "blpa/checkpoint.h"
#include "blpa/dataset.h"
#include "blpa/train.h"

namespace blpa {

// The progress line and its ends, on stderr. A console that cannot take them (its reader gone,
// a full disk) loses them: fmt::print would throw and end the run.
template <typename... Args>
void console(fmt::format_string<Args...> format, Args&&... args) {
  const std::string text = fmt::format(format, std::forward<Args>(args)...);
  const size_t written = std::fwrite(text.data(), 1, text.size(), stderr);
  (void)written;
}

// "mnist" or "fashion-mnist", which of the two IDX data sets the images in `dir` look like (by
// their mean pixel; train_config.cpp); "" where the file cannot say (the load reports why).
std::string idx_kind(const std::string& dir);

// ---- The run's files (run_files.cpp) ----

// The JSON-lines log. Every record is one write(2), checked: a full disk or an unwritable
// file stops the run with the reason, never loses records silently.
class LogFile {
 public:
  LogFile() = default;
  ~LogFile();
  LogFile(const LogFile&) = delete;
  LogFile& operator=(const LogFile&) = delete;
  // The open file is locked too (flock, by the file rather than its name): a second name for
  // it (a hard link) that another run opens is refused before that run empties it.
  void open(const std::string& path, bool append);
  explicit operator bool() const { return fd_ >= 0; }
  // A record cut short (a full disk) is cut off again, so that the log ends with whole lines.
  void write(const std::string& record);

 private:
  int fd_ = -1;
  std::string path_;
};

// One run per output file: an advisory lock (flock) on "<path>.lock" beside each output, held
// for the run and removed after it. Without it two runs started together (or two resumes of
// one checkpoint) both passed the check that a fresh run replaces nothing, and then wrote over
// each other's log and checkpoint. The kernel drops a killed run's lock; its file is reused.
class OutputLocks {
 public:
  OutputLocks() = default;
  OutputLocks(const OutputLocks&) = delete;
  OutputLocks& operator=(const OutputLocks&) = delete;
  ~OutputLocks();
  void add(const std::string& path, const std::string& flag);

 private:
  void lock(const std::string& file, const std::string& path, const std::string& flag);
  std::vector<std::pair<std::string, int>> held_;
};

// Before anything is loaded: every output can be written where it goes, no other run is
// writing it, and a fresh run replaces no earlier run's files unless told to.
void prepare_outputs(const TrainConfig& c, OutputLocks& locks);

// --resume: the records of iterations after the checkpoint's are recomputed by the resumed
// run, so they leave the log (rewritten atomically), which then reads as one run. So does a
// last line without its newline: a record cut short by a full disk or a kill. `evaluates`:
// the resumed run evaluates at the checkpoint's iteration first (the process that wrote the
// checkpoint was stopped in or after that evaluation), so an evaluation record of that
// iteration is recomputed too. `window_open`: the checkpoint holds an unlogged window, so a
// train record of its iteration came after it (a resume at the run's end logs one) and is
// recomputed too. Returns the records after the checkpoint's iteration removed.
int64_t drop_records_after(const std::string& path, int64_t iteration, bool evaluates, bool window_open);

// What is left of a run resumed at its last iteration (ck's, which config's --iterations is).
// The run is complete once evaluated there and, as rank 0 sees it (the other ranks cannot see
// its files: with several, rank 0 alone finishes the run), once its export is written and its
// summary says "done". Otherwise the end is still to come: stopped part-way at what is now the
// end (never evaluated), or stopped after the final checkpoint (the export or summary not
// written), or given a --summary or --export it has not written. It evaluates, then exports and
// summarises; where only the export is missing, it writes the export alone (the summary that
// says "done" keeps its figures: this process would have none).
struct EndLeft {
  bool evaluate = false;        // and then export and summarise
  bool export_missing = false;  // only the export, where nothing is to evaluate
  bool nothing() const { return !evaluate && !export_missing; }
};
EndLeft end_left(const Checkpoint& ck, const TrainConfig& config);

// --auto-resume where there is no checkpoint: a log and a summary that record no training are
// the start of a run that failed in its first iteration (which keeps no checkpoint), and are
// replaced, so that the same command line runs it again; anything that records training is not.
bool records_no_training(const std::string& path, const std::string& flag);

// The run's output files that are given, with their flags.
std::vector<std::pair<std::string, std::string>> outputs_of(const TrainConfig& c);

// 16 hex digits, new for every run.
std::string draw_run_id();

// The text of field `key` of a one-line JSON object as written (a string with its quotes),
// or "" when absent. The config records' fields are numbers, booleans, strings and arrays of
// numbers.
std::string json_field(const std::string& line, const std::string& key);
// Whether a line is one whole JSON object, as the log's records and the summary are: its
// braces and brackets (outside strings) close at its last character. Blanks around it, a CR
// and a UTF-8 byte-order mark (an editor's) aside.
bool whole_object(const std::string& line);
// A file's first line ("" where it cannot be read).
std::string first_line_of(const std::string& path);

// ---- Evaluation (evaluation.cpp) ----

// The first `n` samples of `d` (0, or n past its size: all of them).
data::Dataset subset(data::Dataset d, int64_t n);

// Loss, top-1 and top-5 of `model` on a data set held in memory, in batches of `batch`;
// stopped early (interrupted) when `stop` turns true.
EvalResult evaluate(ResNet& model, const data::Dataset& test, const data::Normalisation& norm, int64_t batch,
                    const torch::Device& dev, const std::atomic<bool>* stop = nullptr);

// A list file read, and its first image looked for; an image listed twice is warned about,
// and refused with two labels. `flag` names the list in messages.
data::ImageList read_list(const std::string& flag, const std::string& file, const std::string& base);

// Class names in the checkpoint's one-line `classes=` list: comma-separated, with '%', ',' and
// line breaks written %XX (a folder's name may hold any of them). checkpoint_classes reads it.
std::string class_list(const std::vector<std::string>& names);

}  // namespace blpa
