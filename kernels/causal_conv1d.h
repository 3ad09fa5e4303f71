// Index arithmetic and element functions of the dilated causal conv1d, used by the
// tile code (causal_conv1d_tiles.h) that both the CUDA kernels (causal_conv1d.cu)
// and the CPU build (causal_conv1d.cpp) run.
//
//   z[b,o,t] = bias[o] + sum_{c,k} w[o,c,k] * x[b, c, t - (K-1-k)*d]   (x at t < 0 is 0)
//   y = relu(z) or z
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SATN_HD __host__ __device__ __forceinline__
#else
#define SATN_HD inline
#endif

namespace satn {

// Tap k looks (K-1-k)*d steps back: the last tap is the current step, so the
// kernel never sees the future.
SATN_HD int64_t tap_lag(int64_t k, int64_t K, int64_t d) { return (K - 1 - k) * d; }

// History an output needs besides its own step (receptive field minus one).
SATN_HD int64_t causal_halo(int64_t K, int64_t d) { return (K - 1) * d; }

// Input time read by output t through tap k; negative means zero padding.
SATN_HD int64_t tap_input_time(int64_t t, int64_t k, int64_t K, int64_t d) {
  return t - tap_lag(k, K, d);
}

SATN_HD bool time_in_range(int64_t t, int64_t T) { return t >= 0 && t < T; }

// Row-major offset of (i, j, l) in a contiguous array of shape (., J, L).
SATN_HD int64_t offset3(int64_t i, int64_t j, int64_t l, int64_t J, int64_t L) {
  return (i * J + j) * L + l;
}

// ReLU on the accumulator. Written as "z < 0" so that NaN passes through, as
// with torch.relu.
template <typename acc_t>
SATN_HD acc_t activate(acc_t z, bool relu) {
  return (relu && z < acc_t(0)) ? acc_t(0) : z;
}

// dL/dz from dL/dy for ReLU, from the saved output y (z is never stored). As in
// torch's threshold_backward, the gradient is dropped where y <= 0 and passed
// everywhere else, NaN included ("y > 0" would drop it where y is NaN).
template <typename g_t, typename y_t>
SATN_HD g_t relu_masked_grad(g_t g, y_t y) {
  return (y <= static_cast<y_t>(0.0f)) ? static_cast<g_t>(0.0f) : g;
}

}  // namespace satn
