// A small persistent thread pool for the batch-1 decode kernels (decode_layer.cpp): one fork per call,
// spin barriers inside it.
//
// Why not at::parallel_for: a batch-1 decode step makes ~150 parallel calls of 10-100 us each, and with
// OMP_WAIT_POLICY=PASSIVE (mandatory on a shared machine) every OpenMP fork/join and barrier sleeps in the
// kernel and pays a futex wake-up (tens of us) on each side. Here a worker that finished a task spins for
// `SGL_CPU_SPIN_US` (default 200 us: longer than the Python gap between two layers' calls, shorter than a
// scheduler step) and only then sleeps on a futex, so the calls of one step find it awake; barriers spin
// the same way. The caller is thread 0 of every task.
// Invariants: run() is serialized by a mutex (two engines in one process take turns); a task never throws
// (the launchers validate first); after fork() the child gets a fresh pool (the parent's workers do not exist
// there). Linux uses a futex to sleep; elsewhere a sleeping waiter polls with yields.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>

namespace sgl_cpu {

// Waits until `word` != `seen`: spins for the spin budget, then sleeps; `sleepers` counts the sleepers so
// a publisher only makes the wake-up system call when somebody sleeps.
void await_change(const std::atomic<uint32_t>& word, uint32_t seen, std::atomic<int>& sleepers);
// word += 1 and wakes whoever sleeps on it.
void publish(std::atomic<uint32_t>& word, std::atomic<int>& sleepers);

// A reusable barrier of `n` threads (sense by generation counter).
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait();

 private:
  const int n_;
  std::atomic<int> arrived_{0};
  std::atomic<uint32_t> gen_{0};
  std::atomic<int> sleepers_{0};
};

// Runs task(thread_index, num_threads) on `threads` threads (the caller is index 0) and returns when all
// finished. threads <= 1 runs inline.
void parallel_run(int threads, const std::function<void(int, int)>& task);

}  // namespace sgl_cpu
