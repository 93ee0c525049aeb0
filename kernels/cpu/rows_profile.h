// Per-phase timers of decode_rows.cpp, compiled in only with -DSGL_ROWS_PROFILE
// (`python -m sgl.kernels.cpu.build --profile-rows`; rebuild without it after): at process exit, stderr gets the
// mean microseconds per layer that the caller (slot 0) and the helpers (slot 1) spent in each phase's own prep,
// its work and its wait for the others, and their entry lag (layer 0's start to the thread's arrival). What
// "Verify rows at 2 threads" in the README measured. Without the flag the macros are empty.
#pragma once

#ifdef SGL_ROWS_PROFILE
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>

namespace {

struct RowsProfile {
  static constexpr int kSlots = 2, kMarks = 3;  // prep, work, wait
  static constexpr int kMaxPhases = 8;
  std::atomic<int64_t> ns[kSlots][kMaxPhases][kMarks] = {}, entry[kSlots] = {}, layers{0}, calls{0};
  const char* names[kMaxPhases] = {};
  static int64_t now() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  ~RowsProfile() {
    if (layers == 0) return;
    const double L = double(layers.load()) * 1e3;
    std::fprintf(stderr, "decode_rows profile: %lld calls, %lld layers; us per layer, caller | helpers: prep work wait\n",
                 (long long)calls.load(), (long long)layers.load());
    for (int p = 0; p < kMaxPhases && names[p] != nullptr; p++)
      std::fprintf(stderr, "  %-5s %7.2f %7.2f %7.2f | %7.2f %7.2f %7.2f\n", names[p], ns[0][p][0] / L, ns[0][p][1] / L,
                   ns[0][p][2] / L, ns[1][p][0] / L, ns[1][p][1] / L, ns[1][p][2] / L);
    const double C = double(calls.load()) * 1e3;
    std::fprintf(stderr, "  entry per call %7.2f | %7.2f\n", entry[0] / C, entry[1] / C);
  }
};
RowsProfile g_rows_profile;

}  // namespace

// A thread's clock inside one layer: PROF_MARK(slot, phase, mark) adds the time since the previous mark.
#define PROF_DECL int64_t prof_t = RowsProfile::now()
#define PROF_MARK(slot, phase, mark)                                                \
  do {                                                                              \
    const int64_t prof_n = RowsProfile::now();                                      \
    g_rows_profile.ns[slot][phase][mark].fetch_add(prof_n - prof_t, std::memory_order_relaxed); \
    prof_t = prof_n;                                                                \
  } while (0)
#else
#define PROF_DECL
#define PROF_MARK(slot, phase, mark)
#endif
