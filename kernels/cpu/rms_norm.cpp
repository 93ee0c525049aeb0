// RMSNorm rows on the CPU: out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * weight, fp32 (HF's LlamaRMSNorm in fp32).
// One call per norm instead of torch's 4 small ops, which each run cold after a decode step's weight stream.
// The sum of squares is accumulated in double (then the same value whatever the vector width), the scale
// applied as x * r * w in float: within a few ulp of the torch formula (tests/kernels/test_cpu_rms_norm.py).
#include <cmath>
#include <cstdint>
#include <stdexcept>

void rms_norm(std::uintptr_t x_addr, std::uintptr_t w_addr, std::uintptr_t out_addr, int64_t M, int64_t N, double eps) {
  if (M <= 0 || N <= 0) throw std::invalid_argument("bad rms_norm shape");
  const float* x = reinterpret_cast<const float*>(x_addr);
  const float* w = reinterpret_cast<const float*>(w_addr);
  float* out = reinterpret_cast<float*>(out_addr);
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * N;
    double ss = 0.0;
    for (int64_t j = 0; j < N; j++) ss += double(xr[j]) * double(xr[j]);
    const float r = float(1.0 / std::sqrt(ss / double(N) + eps));
    float* o = out + m * N;
    for (int64_t j = 0; j < N; j++) o[j] = (xr[j] * r) * w[j];
  }
}
