// The subcommands of blpa-bench that measure whole networks (bench_training.cpp).
#pragma once

int memory_main(int argc, char** argv);
int step_main(int argc, char** argv);
int max_batch_main(int argc, char** argv);
int fidelity_main(int argc, char** argv);
