// CPU parallelism for the CPU backend: a persistent worker pool with a blocking parallel_for.
// Fork-safe (a child process starts a fresh pool on first use), exceptions re-thrown in the caller.
#pragma once

#include <cstdint>
#include <functional>

namespace kvcore {

// Runs fn(begin, end) over [0, n) in chunks of at least `grain` items; returns when all are done.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

int num_threads();
// 0 restores the default (hardware concurrency, or KVCORE_NUM_THREADS when set).
void set_num_threads(int n);

}  // namespace kvcore
