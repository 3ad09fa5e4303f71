// Index and accumulation arithmetic of the dilated causal conv1d, shared by the
// CPU implementation (causal_conv1d.cpp) and the CUDA kernels (causal_conv1d.cu),
// so that the CPU build, which runs anywhere, tests the same arithmetic.
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

// Output time that reads input s through tap k; >= T means no such output.
// grad_x runs the convolution in this direction (anti-causal).
SATN_HD int64_t tap_output_time(int64_t s, int64_t k, int64_t K, int64_t d) {
  return s + tap_lag(k, K, d);
}

SATN_HD bool time_in_range(int64_t t, int64_t T) { return t >= 0 && t < T; }

// First tap whose input time is >= 0 for output t >= 0. Later taps look less
// far back, so every tap from here on is in range.
SATN_HD int64_t first_causal_tap(int64_t t, int64_t K, int64_t d) {
  const int64_t k = K - 1 - t / d;
  return k > 0 ? k : 0;
}

// First tap whose output time is < T for input s < T (same reasoning, mirrored).
SATN_HD int64_t first_anticausal_tap(int64_t s, int64_t T, int64_t K, int64_t d) {
  const int64_t k = K - 1 - (T - 1 - s) / d;
  return k > 0 ? k : 0;
}

// Row-major offset of (i, j, l) in a contiguous array of shape (., J, L).
SATN_HD int64_t offset3(int64_t i, int64_t j, int64_t l, int64_t J, int64_t L) {
  return (i * J + j) * L + l;
}

// Shared-memory windows of the tiled kernels. The forward stages times
// [t0 - halo, t0 + tile), so output t0 + i reads element i + k*d through tap k.
// grad_x stages times [s0, s0 + tile + halo), so input s0 + i receives from
// element i + lag of tap k.
SATN_HD int64_t causal_window_index(int64_t i, int64_t k, int64_t d) { return i + k * d; }
SATN_HD int64_t anticausal_window_index(int64_t i, int64_t k, int64_t K, int64_t d) {
  return i + tap_lag(k, K, d);
}

// One multiply-add in the accumulation type (float for half/bfloat16/float,
// double for double): inputs are widened before the product, never after.
template <typename acc_t, typename a_t, typename b_t>
SATN_HD acc_t mul_add(acc_t acc, a_t a, b_t b) {
  return acc + static_cast<acc_t>(a) * static_cast<acc_t>(b);
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

// Contribution of one (o, c) pair to output t, over the taps that land at
// t >= 0. Used near the start of the sequence and where no tile fits.
template <typename acc_t, typename x_t, typename w_t>
SATN_HD acc_t causal_point(acc_t acc, const x_t* x_row, const w_t* w_row, int64_t t,
                           int64_t K, int64_t d) {
  for (int64_t k = first_causal_tap(t, K, d); k < K; ++k)
    acc = mul_add(acc, w_row[k], x_row[tap_input_time(t, k, K, d)]);
  return acc;
}

// grad_x counterpart: what input s of channel c receives from output channel o
// through all taps whose output time is < T.
template <typename acc_t, typename g_t, typename w_t>
SATN_HD acc_t anticausal_point(acc_t acc, const g_t* g_row, const w_t* w_row, int64_t s,
                               int64_t T, int64_t K, int64_t d) {
  for (int64_t k = first_anticausal_tap(s, T, K, d); k < K; ++k)
    acc = mul_add(acc, w_row[k], g_row[tap_output_time(s, k, K, d)]);
  return acc;
}

// grad_w term of one batch row: sum over t of g[t] * x[t - lag(k)], for the
// times whose input is inside the sequence. Eight interleaved partial sums let
// a CPU compiler vectorise the loop without reassociating floating point.
template <typename acc_t, typename g_t, typename x_t>
SATN_HD acc_t lagged_dot(acc_t acc, const g_t* g_row, const x_t* x_row, int64_t k,
                         int64_t T, int64_t K, int64_t d) {
  constexpr int kLanes = 8;
  acc_t part[kLanes] = {};
  int64_t t = tap_lag(k, K, d);
  for (; t + kLanes <= T; t += kLanes)
    for (int j = 0; j < kLanes; ++j)
      part[j] = mul_add(part[j], g_row[t + j], x_row[tap_input_time(t + j, k, K, d)]);
  for (; t < T; ++t) part[0] = mul_add(part[0], g_row[t], x_row[tap_input_time(t, k, K, d)]);
  for (int j = 0; j < kLanes; ++j) acc += part[j];
  return acc;
}

}  // namespace satn
