// The subcommands of blpa-bench: whole networks (bench_training.cpp) and the data pipeline
// (bench_data.cpp).
#pragma once

int memory_main(int argc, char** argv);
int step_main(int argc, char** argv);
int max_batch_main(int argc, char** argv);
int fidelity_main(int argc, char** argv);
int data_main(int argc, char** argv);
