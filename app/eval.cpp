// blpa-eval: top-1/top-5 of a blpa-train checkpoint on its data set's test split; for
// ImageNet the validation protocol of DESIGN.md 1.7 (shorter side 256, centre crop or the
// 10 crops: 4 corners + centre and their mirrors, softmax averaged).
#include <blpa/checkpoint.h>
#include <blpa/train.h>
#include <fmt/format.h>

#include <cmath>
#include <csignal>
#include <cxxopts.hpp>
#include <filesystem>
#include <iostream>

#include "flags.h"

// --export: the checkpoint's network as blpa-train --export writes it, for a run trained
// without --export, say. A file already there is replaced only where it is empty or this
// run's export (export_not_replaceable), so that the same command runs again.
static int export_network(const std::string& checkpoint, const std::string& path, bool json) {
  const blpa::Checkpoint ck = blpa::read_checkpoint(checkpoint);
  const auto id = ck.config.find("run_id");
  const std::string run_id = id != ck.config.end() ? id->second : "";
  namespace fs = std::filesystem;
  if (std::error_code ec; fs::exists(path, ec) && !(fs::is_regular_file(path, ec) && fs::file_size(path, ec) == 0))
    if (const std::string why = blpa::export_not_replaceable(path, run_id, ck.net); !why.empty())
      throw blpa::FlagError(fmt::format("--export {} already exists and {}: give another path, or remove it", path, why));
  // Its folder made and the file tried, as blpa-train's outputs are (it failed at the write,
  // naming no flag, exit 1).
  try {
    blpa::check_output_path(path, "--export", /*atomic=*/true);
  } catch (const std::invalid_argument& e) {
    throw blpa::FlagError(e.what());
  }
  blpa::ResNet model = blpa::load_model(ck);
  blpa::export_state_dict(path, model, run_id);
  if (json)
    fmt::print("{{\"checkpoint\": {}, \"iteration\": {}, \"run_id\": {}, \"export\": {}}}\n",
               blpa::json_string(checkpoint), ck.state.iteration,
               run_id.empty() ? std::string("null") : blpa::json_string(run_id), blpa::json_string(path));
  else
    fmt::print("{}: the network of iteration {}{} written to {} (for Python: torch.load, scripts/blpa_torch.py)\n",
               checkpoint, ck.state.iteration, run_id.empty() ? "" : " of run " + run_id, path);
  return 0;
}

static int run(int argc, char** argv) {
  blpa::quiet_library_log();
  cxxopts::Options opts("blpa-eval", "Evaluate a blpa-train checkpoint: top-1 and top-5 on the test split of the data "
                                     "set it was trained on (ImageNet: val/); or, with --export, write its network for "
                                     "Python. A damaged checkpoint, or one holding non-finite weights, is refused.\nExit codes: 0 done, 1 error, 2 bad flags, 3 the loss is not finite (weights too large for the forward pass).\n");
  // clang-format off
  opts.add_options()
    ("checkpoint", "Checkpoint written by blpa-train --checkpoint", cxxopts::value<std::string>())
    ("data-dir", "Data directory (default: the one the checkpoint was trained on)", cxxopts::value<std::string>())
    ("val-list", "ImageNet: a list file of 'relative/path,label' lines instead of <data-dir>/val", cxxopts::value<std::string>())
    ("ten-crop", "ImageNet: average the 10 crops (4 corners + centre, and their mirrors) instead of the centre crop")
    ("resize", "ImageNet: shorter side before cropping", cxxopts::value<std::string>()->default_value("256"))
    ("crop", "ImageNet: crop size", cxxopts::value<std::string>()->default_value("224"))
    ("subset", "Evaluate N test images (0: all; ImageNet: spread over all classes)", cxxopts::value<std::string>()->default_value("0"))
    ("batch", "Images per batch (10-crop: times 10 crops)", cxxopts::value<std::string>()->default_value("50"))
    ("workers", "JPEG decode threads, 0 to 256 (0: one per core, at most 16, as blpa-train's for ImageNet)", cxxopts::value<std::string>()->default_value("0"))
    ("threads", "LibTorch CPU threads, 0 to 1024 (0: its default, one per core)", cxxopts::value<std::string>()->default_value("0"))
    ("device", "cpu, cuda or cuda:N", cxxopts::value<std::string>()->default_value("cpu"))
    ("precision", "fp32, tf32 (CUDA only), bf16 or auto: the one the network was trained in, so that the scores are the training log's (tf32 is fp32 on the CPU; a checkpoint from before --precision: tf32 on CUDA, fp32 on the CPU)", cxxopts::value<std::string>()->default_value("auto"))
    ("memory-format", "nchw, nhwc or auto (the checkpoint's layout, as blpa-train's --resume takes it: NCHW for one from before the flag)", cxxopts::value<std::string>()->default_value("auto"))
    ("index-cache", "Directory of cached ImageNet file lists ('' to disable)", cxxopts::value<std::string>()->default_value(blpa::default_cache_dir()))
    ("export", "Write the checkpoint's network to PATH for Python (torch.load), as blpa-train --export does, instead of evaluating it: for a run trained without --export, say. A file there is replaced only if it is empty or an export of the same run", cxxopts::value<std::string>())
    ("json", "Print one JSON object: the checkpoint's iteration and run_id; top1 and top5 are accuracies (as the log's test_acc and test_top5), top1_error and top5_error their complements (as the summary's test_error)")
    ("quiet", "No progress line")
    ("h,help", "This help");
  // clang-format on
  blpa::CheckpointEval e;
  bool json = false;
  std::string export_path;
  try {
    auto a = blpa::parse_flags(opts, argc, argv);
    if (blpa::switched_on(a, "help")) {
      std::cout << opts.help() << std::endl;
      return 0;
    }
    if (!a.unmatched().empty())
      throw std::invalid_argument("unexpected argument '" + a.unmatched()[0] + "'" +
                                  (a.count("checkpoint") ? "" : " (a checkpoint is given as --checkpoint FILE)"));
    if (!a.count("checkpoint")) throw std::invalid_argument("--checkpoint is required");
    e.checkpoint = a["checkpoint"].as<std::string>();
    if (a.count("export")) {
      export_path = a["export"].as<std::string>();
      if (export_path.empty()) throw std::invalid_argument("--export needs a path");
      // What only an evaluation uses: given with --export, it would be ignored without a word.
      for (const char* flag : {"data-dir", "val-list", "ten-crop", "resize", "crop", "subset", "batch", "workers",
                               "device", "precision", "memory-format", "index-cache", "quiet"})
        if (a.count(flag))
          throw std::invalid_argument(std::string("--") + flag + " is for an evaluation, and --export evaluates "
                                      "nothing: give them in two commands");
    }
    if (a.count("data-dir")) e.data_dir = a["data-dir"].as<std::string>();
    e.index_cache = a["index-cache"].as<std::string>();
    if (a.count("val-list")) e.val_list = a["val-list"].as<std::string>();
    e.subset = blpa::number<int64_t>(a, "subset");
    if (blpa::switched_on(a, "ten-crop")) e.imagenet_flags.push_back("--ten-crop");
    for (const char* flag : {"val-list", "resize", "crop", "index-cache"})
      if (a.count(flag)) e.imagenet_flags.push_back(std::string("--") + flag);
    e.options.ten_crop = blpa::switched_on(a, "ten-crop");
    e.options.resize_short = blpa::number<int>(a, "resize");
    e.options.crop = blpa::number<int>(a, "crop");
    e.options.batch = blpa::number<int64_t>(a, "batch");
    e.options.workers = blpa::number<int>(a, "workers");
    blpa::set_threads(blpa::number<int>(a, "threads"));
    e.options.device = a["device"].as<std::string>();
    if (e.subset < 0) throw std::invalid_argument("--subset must be >= 0 (0: all)");
    const torch::Device device = blpa::parse_device(e.options.device);
    e.options.precision = a["precision"].as<std::string>();
    e.options.memory_format = a["memory-format"].as<std::string>();
    blpa::numerics_for(e.options.precision, e.options.memory_format, device);  // the names
    e.options.progress = !blpa::switched_on(a, "quiet") && !blpa::switched_on(a, "json");
    json = blpa::switched_on(a, "json");
    if (e.options.batch <= 0) throw std::invalid_argument("--batch must be positive");
    if (e.options.workers < 0 || e.options.workers > blpa::kMaxWorkers)
      throw std::invalid_argument("--workers must be 0 (automatic) to " + std::to_string(blpa::kMaxWorkers));
    if (e.options.workers == 0) e.options.workers = blpa::default_workers("imagenet", 1);
    if (e.options.resize_short <= 0) throw std::invalid_argument("--resize must be positive");
    if (e.options.crop <= 0 || e.options.resize_short < e.options.crop)
      throw std::invalid_argument("--crop must be positive and at most --resize");
    blpa::require_file("--checkpoint", e.checkpoint);  // last: the other flags' errors come first
  } catch (const std::exception& ex) {
    std::cerr << "blpa-eval: " << blpa::error_message(ex) << "\nRun blpa-eval --help for the options.\n";
    return 2;
  }
  if (blpa::parse_device(e.options.device).is_cuda() && !torch::cuda::is_available()) {  // cpu:0 is the CPU
    std::cerr << "blpa-eval: --device " << e.options.device << ": this machine has no CUDA device\n";
    return 2;
  }
  try {
    if (!export_path.empty()) return export_network(e.checkpoint, export_path, json);
    const auto r = blpa::evaluate_checkpoint(e);
    // No image scored: "100% error, loss 0" would read as a result.
    if (r.count == 0 && !r.interrupted) {
      std::cerr << fmt::format("blpa-eval: {}: no image could be evaluated ({} could not be read or decoded)\n",
                               e.checkpoint, r.failed);
      return 1;
    }
    // Outputs that overflow score nothing: NaN logits rank as LibTorch's topk puts them, and
    // the accuracies would read as a result. They are null, as the loss is.
    const bool finite = std::isfinite(r.loss);
    auto score = [&](double v) { return finite ? fmt::format("{:.6f}", v) : std::string("null"); };
    if (json)
      fmt::print("{{\"checkpoint\": {}, \"iteration\": {}, \"run_id\": {}, \"precision\": \"{}\", "
                 "\"memory_format\": \"{}\", \"ten_crop\": {}, \"images\": {}, \"failed\": {}, \"loss\": {}, "
                 "\"top1\": {}, \"top5\": {}, \"top1_error\": {}, \"top5_error\": {}}}\n",
                 blpa::json_string(e.checkpoint), r.iteration,
                 r.run_id.empty() ? std::string("null") : blpa::json_string(r.run_id),
                 blpa::to_string(r.numerics.precision),
                 blpa::layout_name(r.numerics.layout), e.options.ten_crop, r.count, r.failed, score(r.loss),
                 score(r.top1), score(r.top5), score(1 - r.top1), score(1 - r.top5));
    else if (finite)
      fmt::print("{}: {} images{}: top-1 error {:.2f}%, top-5 error {:.2f}%, loss {:.4f}{}\n", e.checkpoint, r.count,
                 e.options.ten_crop ? " (10 crops)" : "", 100 * (1 - r.top1), 100 * (1 - r.top5), r.loss,
                 r.failed ? fmt::format(" ({} could not be read or decoded)", r.failed) : "");
    else
      fmt::print("{}: {} images{}: no scores, the loss is {}{}\n", e.checkpoint, r.count,
                 e.options.ten_crop ? " (10 crops)" : "", r.loss,
                 r.failed ? fmt::format(" ({} could not be read or decoded)", r.failed) : "");
    // Finite weights can still be too large for the forward pass: those of a run in the
    // iterations before its loss became NaN. The scores above are then meaningless.
    if (!finite) {
      std::cerr << "blpa-eval: " << e.checkpoint << ": the loss is " << r.loss
                << ": the network's outputs overflow (its weights are finite but too large, as those of a run "
                   "about to diverge)\n";
      return 3;
    }
    return 0;
  } catch (const blpa::FlagError& ex) {
    std::cerr << "blpa-eval: " << ex.what() << "\n";
    return 2;
  } catch (const std::exception& ex) {
    std::cerr << "blpa-eval: " << blpa::error_message(ex) << "\n";
    return 1;
  }
}

int main(int argc, char** argv) { return blpa::checked_output("blpa-eval", run(argc, argv)); }
