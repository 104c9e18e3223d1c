// blpa-train's command line, parsed into a TrainConfig without running anything (the
// program and the command-line fuzz target share it).
#pragma once

#include <blpa/train.h>

#include <string>

namespace blpa {

struct TrainCommand {
  TrainConfig config;
  bool help = false;          // --help: print `help_text` and exit 0
  bool print_config = false;  // --print-config: print the resolved configuration and exit 0
  std::string help_text;
};

// argv[0] is the program's name. Throws FlagError for anything that cannot run as given.
TrainCommand parse_train_command(int argc, const char* const* argv);

// What --print-config prints.
std::string printed_config(const TrainConfig& c);

}  // namespace blpa
