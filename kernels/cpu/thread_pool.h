// A small persistent thread pool for the batch-1 decode kernels (decode_layer.cpp): one wake-up per call,
// phases synchronized by completed work, never by thread arrival.
//
// Why not at::parallel_for: a batch-1 decode step makes ~150 parallel calls of 10-100 us each, and with
// OMP_WAIT_POLICY=PASSIVE (mandatory on a shared machine) every OpenMP fork/join and barrier sleeps in the
// kernel and pays a futex wake-up (tens of us) on each side; and a team barrier waits for EVERY thread, so
// on a loaded machine one descheduled thread stalls the step for a whole time slice (llama-bench at 2
// threads on this VM under load: 1.5 tok/s vs 23 at 1 thread).
// Here:
//   - the caller is a worker too and may do all the work alone: a phase is over when its work items are
//     done (`Phase::wait_done`), whoever did them; a helper that wakes late joins at the current phase or
//     finds nothing left. So a descheduled helper costs at most the items it already claimed.
//   - an idle helper spins for `SGL_CPU_SPIN_US` (default 200 us: longer than the Python gap between two
//     layers' calls, shorter than a scheduler step), then sleeps on a futex; waits inside a call do the same.
// Invariants: run() is serialized by a mutex (two engines in one process take turns); a task never throws
// (the launchers validate first); run() returns only after no helper is inside the task (a reference count
// checked against a closed flag, Dekker-style); after fork() the child gets a fresh pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>

namespace sgl_cpu {

// Waits until `word` != `seen`: spins for the spin budget, then sleeps; `sleepers` counts the sleepers so
// a publisher only makes the wake-up system call when somebody sleeps.
void await_change(const std::atomic<uint32_t>& word, uint32_t seen, std::atomic<int>& sleepers);
// word += amount and wakes whoever sleeps on it.
void publish(std::atomic<uint32_t>& word, std::atomic<int>& sleepers, uint32_t amount = 1);

// A phase of `n` work items handed out in chunks by an atomic counter. Any number of threads may take part.
struct Phase {
  std::atomic<int64_t> next{0};
  std::atomic<uint32_t> done{0};
  std::atomic<int> sleepers{0};
  int64_t n = 0, chunk = 1;

  void reset(int64_t items, int64_t chunk_size) {
    next.store(0, std::memory_order_relaxed);
    done.store(0, std::memory_order_relaxed);
    n = items;
    chunk = chunk_size < 1 ? 1 : chunk_size;
  }
  bool has_work() const { return next.load(std::memory_order_relaxed) < n; }
  // Runs f(i0, i1) on chunks until none is left; returns whether this thread did any.
  template <class F>
  bool work(F&& f) {
    bool any = false;
    for (int64_t s; (s = next.fetch_add(chunk, std::memory_order_acq_rel)) < n;) {
      const int64_t e = s + chunk < n ? s + chunk : n;
      f(s, e);
      publish(done, sleepers, uint32_t(e - s));  // release: the chunk's writes are visible to wait_done
      any = true;
    }
    return any;
  }
  void wait_done() {
    for (uint32_t d; (d = done.load(std::memory_order_acquire)) < uint32_t(n);) await_change(done, d, sleepers);
  }
};

// Runs task() on the caller and on up to threads - 1 helpers (whichever wake while the call runs) and
// returns when the caller's task() returned and no helper is inside it. threads <= 1 runs inline. The task
// must itself wait for the work it depends on (Phase::wait_done): a helper may run it late or never.
void parallel_run(int threads, const std::function<void()>& task);

// A call site that picks, by measurement, between running its calls alone and with the helpers. On a
// machine shared with other processes a helper is often descheduled while it holds claimed work, and the
// caller then waits for it: with 2 threads under load a decode step measured SLOWER than with 1 (18.9 vs
// 28.3 tok/s at load average ~11). Every `kPeriod` calls the site runs kProbe calls alone and kProbe with
// the helpers (the first kWarm of each not timed: a sleeping helper's wake-up), compares the time per unit
// of work, and uses the faster way for the rest of the period (the helpers only when clearly faster).
// Results never depend on the choice (the kernels are bit-identical across thread counts). Unsynchronized
// statistics: two engines sharing a site only blur its measurement.
struct AdaptiveSite {
  static constexpr int64_t kPeriod = 256, kProbe = 16, kWarm = 4;
  int64_t calls = 0;
  double ns[2] = {0, 0}, work[2] = {0, 0};  // [alone, helpers] in the current probe
  bool helpers = true;
};
// parallel_run(threads, task), or task() alone, as `site` decides; `work` is the call's size (any unit
// proportional to its cost, e.g. weight bytes) so calls of different shapes compare.
void parallel_run_adaptive(int threads, AdaptiveSite& site, double work, const std::function<void()>& task);
// false: every call runs with the helpers (tests of the threaded path; SGL_CPU_ADAPTIVE=0 at start-up).
void set_adaptive(bool on);

// The spin budget of a waiting thread (SGL_CPU_SPIN_US at start-up), for benchmarks.
void set_spin_us(int64_t us);

// Items (a GEMM's output columns) [0, n) over the decode pool in chunks of 64 taken from an atomic counter:
// its helpers spin a moment between calls, so a decode step's ~120 batch matmuls do not each pay an OpenMP
// fork whose sleeping (PASSIVE) workers need a futex wake-up. A column's result does not depend on the split.
template <class F>
void columns_on_pool(int64_t n, int64_t threads, F&& f) {
  threads = std::max<int64_t>(1, threads);
  if (threads == 1 || n <= 64) {
    f(0, n);
    return;
  }
  Phase ph;
  ph.reset(n, 64);
  parallel_run(int(threads), [&] {
    ph.work(f);
    ph.wait_done();
  });
}

}  // namespace sgl_cpu
