// The decode thread pool (thread_pool.h says why it exists and its invariants).
#include "thread_pool.h"

#include <chrono>
#include <climits>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <linux/futex.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SGL_PAUSE() _mm_pause()
#else
#define SGL_PAUSE() std::this_thread::yield()
#endif

namespace sgl_cpu {

namespace {

int64_t spin_ns() {
  static const int64_t ns = [] {
    const char* s = std::getenv("SGL_CPU_SPIN_US");
    const long us = s != nullptr ? std::strtol(s, nullptr, 10) : 200;
    return int64_t(us < 0 ? 0 : us) * 1000;
  }();
  return ns;
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void sleep_while_equal(const std::atomic<uint32_t>& word, uint32_t seen) {
#if defined(__linux__)
  // FUTEX_WAIT re-checks word == seen atomically, so a publish between our load and the call is not lost.
  syscall(SYS_futex, reinterpret_cast<const uint32_t*>(&word), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
#else
  (void)word;
  (void)seen;
  std::this_thread::yield();
#endif
}

void wake_all(std::atomic<uint32_t>& word) {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
#else
  (void)word;
#endif
}

}  // namespace

void await_change(const std::atomic<uint32_t>& word, uint32_t seen, std::atomic<int>& sleepers) {
  const int64_t budget = spin_ns();
  int64_t start = -1;
  for (int i = 0;; i++) {
    if (word.load(std::memory_order_acquire) != seen) return;
    SGL_PAUSE();
    if ((i & 63) == 63) {
      const int64_t t = now_ns();
      if (start < 0) start = t;
      else if (t - start > budget) break;
    }
  }
  // Dekker with publish(): the sleeper count is raised before the final check of the word, the publisher
  // bumps the word before reading the count (both seq_cst), so one of them sees the other.
  sleepers.fetch_add(1, std::memory_order_seq_cst);
  while (word.load(std::memory_order_seq_cst) == seen) sleep_while_equal(word, seen);
  sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

void publish(std::atomic<uint32_t>& word, std::atomic<int>& sleepers) {
  word.fetch_add(1, std::memory_order_seq_cst);
  if (sleepers.load(std::memory_order_seq_cst) > 0) wake_all(word);
}

void SpinBarrier::wait() {
  const uint32_t g = gen_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
    arrived_.store(0, std::memory_order_relaxed);
    publish(gen_, sleepers_);  // release: every thread's writes before the barrier are visible after it
  } else {
    await_change(gen_, g, sleepers_);
  }
}

namespace {

class Pool {
 public:
  void run(int threads, const std::function<void(int, int)>& task) {
    std::lock_guard<std::mutex> lock(mu_);
    while (int(workers_) < threads - 1) start_worker(int(workers_++) + 1);
    task_ = &task;
    active_ = threads;
    pending_.store(int(workers_), std::memory_order_relaxed);  // every worker acknowledges each task
    publish(go_, go_sleepers_);
    task(0, threads);
    while (true) {
      const uint32_t d = done_.load(std::memory_order_acquire);
      if (pending_.load(std::memory_order_acquire) == 0) break;
      await_change(done_, d, done_sleepers_);
    }
    task_ = nullptr;
  }

 private:
  void start_worker(int index) {
    const uint32_t first = go_.load(std::memory_order_acquire);
    std::thread([this, index, first] {
      uint32_t seen = first;
      while (true) {
        await_change(go_, seen, go_sleepers_);
        seen = go_.load(std::memory_order_acquire);
        if (index < active_) (*task_)(index, active_);
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) publish(done_, done_sleepers_);
      }
    }).detach();  // lives as long as the process; it sleeps on a futex when idle
  }

  std::mutex mu_;
  size_t workers_ = 0;
  const std::function<void(int, int)>* task_ = nullptr;
  int active_ = 1;
  std::atomic<int> pending_{0};
  std::atomic<uint32_t> go_{0}, done_{0};
  std::atomic<int> go_sleepers_{0}, done_sleepers_{0};
};

Pool* g_pool = nullptr;
std::mutex g_create_mu;
std::once_flag g_atfork_once;

}  // namespace

void parallel_run(int threads, const std::function<void(int, int)>& task) {
  if (threads <= 1) {
    task(0, 1);
    return;
  }
#if defined(__linux__)
  // The child of a fork has none of the parent's workers: it starts a new pool (the old one is leaked).
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; }); });
#endif
  Pool* pool;
  {
    std::lock_guard<std::mutex> lock(g_create_mu);
    if (g_pool == nullptr) g_pool = new Pool();
    pool = g_pool;
  }
  pool->run(threads, task);
}

}  // namespace sgl_cpu
