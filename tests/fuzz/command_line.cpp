// blpa-train's command line (parse_train_command): the input is the arguments after the
// program's name, separated by NUL bytes. A command line is either parsed or refused with a
// FlagError that names what is wrong; a parsed one prints its configuration. torchrun's
// variables are cleared first, so that the environment does not take part.
#include <train_flags.h>

#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const bool clean = [] {
    for (const char* v : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"})
      ::unsetenv(v);
    return true;
  }();
  (void)clean;
  std::vector<std::string> args{"blpa-train"};
  std::string arg;
  for (size_t i = 0; i < size && args.size() < 64; ++i) {
    if (data[i] == 0) {
      args.push_back(arg);
      arg.clear();
    } else {
      arg += static_cast<char>(data[i]);
    }
  }
  if (!arg.empty() && args.size() < 64) args.push_back(arg);
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  argv.push_back(nullptr);
  try {
    const blpa::TrainCommand c = blpa::parse_train_command(static_cast<int>(args.size()), argv.data());
    if (c.help) FUZZ_CHECK(!c.help_text.empty());
    FUZZ_CHECK(!blpa::printed_config(c.config).empty());
  } catch (const blpa::FlagError&) {
  } catch (const std::runtime_error&) {  // printed_config: a --data-dir holding no data set
  }
  return 0;
}
