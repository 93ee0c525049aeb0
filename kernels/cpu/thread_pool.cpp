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

std::atomic<int64_t> g_spin_ns{[] {
  const char* s = std::getenv("SGL_CPU_SPIN_US");
  const long us = s != nullptr ? std::strtol(s, nullptr, 10) : 200;
  return int64_t(us < 0 ? 0 : us) * 1000;
}()};

int64_t spin_ns() { return g_spin_ns.load(std::memory_order_relaxed); }

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

void publish(std::atomic<uint32_t>& word, std::atomic<int>& sleepers, uint32_t amount) {
  word.fetch_add(amount, std::memory_order_seq_cst);
  if (sleepers.load(std::memory_order_seq_cst) > 0) wake_all(word);
}

namespace {

class Pool {
 public:
  void run(int threads, const std::function<void()>& task) {
    std::lock_guard<std::mutex> lock(mu_);
    while (int(workers_) < threads - 1) start_worker();
    task_ = &task;
    allowed_.store(threads - 1, std::memory_order_relaxed);
    open_.store(true, std::memory_order_seq_cst);
    publish(go_, go_sleepers_);
    task();
    // Close, then wait for the helpers inside (they can only be finishing claimed work or leaving):
    // a helper raises refs_ before it reads open_, both seq_cst, so it either sees closed or is waited for.
    open_.store(false, std::memory_order_seq_cst);
    for (int i = 1; refs_.load(std::memory_order_seq_cst) != 0; i++) {
      SGL_PAUSE();
      if (i % 256 == 0) std::this_thread::yield();  // a helper descheduled inside: let it run
    }
    task_ = nullptr;
  }

 private:
  void start_worker() {
    workers_++;
    const uint32_t first = go_.load(std::memory_order_acquire);
    std::thread([this, first] {
      uint32_t seen = first;
      while (true) {
        await_change(go_, seen, go_sleepers_);
        seen = go_.load(std::memory_order_acquire);
        refs_.fetch_add(1, std::memory_order_seq_cst);
        // only threads - 1 helpers take part (a pool grown for 4 threads serves a 2-thread call)
        if (open_.load(std::memory_order_seq_cst) && allowed_.fetch_sub(1, std::memory_order_acq_rel) > 0)
          (*task_)();
        refs_.fetch_sub(1, std::memory_order_seq_cst);
      }
    }).detach();  // lives as long as the process; it sleeps on a futex when idle
  }

  std::mutex mu_;
  size_t workers_ = 0;
  const std::function<void()>* task_ = nullptr;
  std::atomic<bool> open_{false};
  std::atomic<int> refs_{0}, allowed_{0};
  std::atomic<uint32_t> go_{0};
  std::atomic<int> go_sleepers_{0};
};

Pool* g_pool = nullptr;
std::mutex g_create_mu;
std::once_flag g_atfork_once;

}  // namespace

void set_spin_us(int64_t us) { g_spin_ns.store((us < 0 ? 0 : us) * 1000, std::memory_order_relaxed); }

void parallel_run(int threads, const std::function<void()>& task) {
  if (threads <= 1) {
    task();
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

std::atomic<bool> g_adaptive{[] {
  const char* s = std::getenv("SGL_CPU_ADAPTIVE");
  return s == nullptr || std::strtol(s, nullptr, 10) != 0;
}()};

void set_adaptive(bool on) { g_adaptive.store(on, std::memory_order_relaxed); }

void parallel_run_adaptive(int threads, AdaptiveSite& site, double work, const std::function<void()>& task) {
  if (threads <= 1) {
    task();
    return;
  }
  if (!g_adaptive.load(std::memory_order_relaxed)) {
    parallel_run(threads, task);
    return;
  }
  const int64_t c = site.calls++ % AdaptiveSite::kPeriod;
  if (c >= 2 * AdaptiveSite::kProbe) {  // exploit
    if (site.helpers) parallel_run(threads, task);
    else task();
    return;
  }
  const int arm = c < AdaptiveSite::kProbe ? 0 : 1;  // probe: alone first, then with the helpers
  if (c == 0) site.ns[0] = site.ns[1] = site.work[0] = site.work[1] = 0;
  const int64_t t0 = now_ns();
  if (arm == 1) parallel_run(threads, task);
  else task();
  if (c % AdaptiveSite::kProbe >= AdaptiveSite::kWarm) {
    site.ns[arm] += double(now_ns() - t0);
    site.work[arm] += work;
  }
  if (c == 2 * AdaptiveSite::kProbe - 1 && site.work[0] > 0 && site.work[1] > 0)
    site.helpers = site.ns[1] / site.work[1] < 0.9 * (site.ns[0] / site.work[0]);
}

}  // namespace sgl_cpu
