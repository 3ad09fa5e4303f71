// CUDA kernels of the fused dilated causal conv1d: forward (+bias, +ReLU),
// grad_x, grad_w, grad_bias, for float16, bfloat16, float32 and float64.
// Products are accumulated in float (double for float64). Index arithmetic
// comes from causal_conv1d.h, which the CPU build tests.
//
// The gain over PyTorch's path is fusion: pad + conv + ReLU there are three
// trips through memory, here one. The kernels favour plain, checkable code.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "causal_conv1d.h"

namespace {

// Tiled convolution (forward and grad_x). A block of kThreads threads owns
// kTileT time steps x kTileP output rows; each thread keeps a kRegP x kRegT
// register tile, with its time steps kTileT/kRegT apart so that a warp reads
// consecutive shared-memory words (no bank conflicts).
constexpr int kTileT = 64;
constexpr int kTileP = 32;
constexpr int kRegT = 4;
constexpr int kRegP = 4;
constexpr int kLanesT = kTileT / kRegT;                  // 16 threads along time
constexpr int kThreads = kLanesT * (kTileP / kRegP);     // 128
constexpr int kMaxChunk = 16;                            // reduction channels staged at once
constexpr size_t kSmemBudget = 48 * 1024;                // no opt-in needed below this

// grad_w: a block owns a kWTile x kWTile tile of (o, c) for one tap, one
// thread per pair, and walks time kWTime steps at a time.
constexpr int kWTile = 16;
constexpr int kWTime = 64;
constexpr int kWThreads = kWTile * kWTile;
// At most this many time chunks per block before its partial sum is added
// atomically, so float32 partial sums stay short however long T is.
constexpr int64_t kWMaxChunksPerBlock = 64;

constexpr int kReduceThreads = 256;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// out[b,p,t] = act(bias[p] + sum_{q,k} W(p,q,k) * in[b,q,t -/+ lag(k)])
//   forward (kCausal):  p = o, q = c, W = w[o,c,k], reads the past.
//   grad_x (!kCausal):  p = c, q = o, W = w[q,p,k], reads the future (in = dL/dz).
// Per chunk of q, the block stages the input window with its halo (zeros
// outside [0, T)) and the weight slice in shared memory.
template <typename scalar_t, bool kCausal>
__global__ void __launch_bounds__(kThreads)
tiled_conv_kernel(const scalar_t* __restrict__ in, const scalar_t* __restrict__ w,
                  const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, int64_t P,
                  int64_t Q, int64_t T, int K, int d, int chunk, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int halo = static_cast<int>(satn::causal_halo(K, d));
  const int width = kTileT + halo;
  acc_t* in_s = reinterpret_cast<acc_t*>(smem_raw);  // (chunk, width)
  acc_t* w_s = in_s + chunk * width;                   // (chunk, K, kTileP)

  const int64_t t_tiles = ceil_div(T, kTileT);
  const int64_t b = blockIdx.x / t_tiles;
  const int64_t t0 = (blockIdx.x % t_tiles) * kTileT;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * kTileP;
  const int lane_t = threadIdx.x % kLanesT;
  const int row_p = (threadIdx.x / kLanesT) * kRegP;
  const int64_t window0 = kCausal ? t0 - halo : t0;  // time of staged element 0

  acc_t acc[kRegP][kRegT];
#pragma unroll
  for (int r = 0; r < kRegP; ++r)
#pragma unroll
    for (int j = 0; j < kRegT; ++j) acc[r][j] = acc_t(0);

  for (int64_t q0 = 0; q0 < Q; q0 += chunk) {
    const int nq = static_cast<int>(Q - q0 < chunk ? Q - q0 : chunk);
    for (int e = threadIdx.x; e < nq * width; e += kThreads) {
      const int qq = e / width;
      const int64_t t = window0 + (e - qq * width);
      in_s[e] = satn::time_in_range(t, T)
                    ? static_cast<acc_t>(in[satn::offset3(b, q0 + qq, t, Q, T)])
                    : acc_t(0);
    }
    for (int e = threadIdx.x; e < nq * K * kTileP; e += kThreads) {
      const int pp = e % kTileP;
      const int qk = e / kTileP;
      const int qq = qk / K, k = qk % K;
      const int64_t p = p0 + pp, q = q0 + qq;
      acc_t v = acc_t(0);
      if (p < P)
        v = static_cast<acc_t>(w[kCausal ? satn::offset3(p, q, k, Q, K)
                                         : satn::offset3(q, p, k, P, K)]);
      w_s[e] = v;  // e == (qq * K + k) * kTileP + pp
    }
    __syncthreads();

    for (int qq = 0; qq < nq; ++qq) {
      const acc_t* in_row = in_s + qq * width;
      for (int k = 0; k < K; ++k) {
        const acc_t* w_col = w_s + (qq * K + k) * kTileP + row_p;
        acc_t wv[kRegP], xv[kRegT];
#pragma unroll
        for (int r = 0; r < kRegP; ++r) wv[r] = w_col[r];
#pragma unroll
        for (int j = 0; j < kRegT; ++j) {
          const int i = lane_t + j * kLanesT;
          xv[j] = in_row[kCausal ? satn::causal_window_index(i, k, d)
                                 : satn::anticausal_window_index(i, k, K, d)];
        }
#pragma unroll
        for (int r = 0; r < kRegP; ++r)
#pragma unroll
          for (int j = 0; j < kRegT; ++j) acc[r][j] = satn::mul_add(acc[r][j], wv[r], xv[j]);
      }
    }
    __syncthreads();  // before the next chunk overwrites the tiles
  }

#pragma unroll
  for (int r = 0; r < kRegP; ++r) {
    const int64_t p = p0 + row_p + r;
    if (p >= P) continue;
    const acc_t bv = bias != nullptr ? static_cast<acc_t>(bias[p]) : acc_t(0);
#pragma unroll
    for (int j = 0; j < kRegT; ++j) {
      const int64_t t = t0 + lane_t + j * kLanesT;
      if (t < T)
        out[satn::offset3(b, p, t, P, T)] =
            static_cast<scalar_t>(satn::activate(acc[r][j] + bv, relu));
    }
  }
}

// Same operation, one thread per output, reading global memory: used when the
// receptive field is too long for a shared-memory window.
template <typename scalar_t, bool kCausal>
__global__ void direct_conv_kernel(const scalar_t* __restrict__ in,
                                   const scalar_t* __restrict__ w,
                                   const scalar_t* __restrict__ bias,
                                   scalar_t* __restrict__ out, int64_t B, int64_t P,
                                   int64_t Q, int64_t T, int64_t K, int64_t d, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = B * P * T;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx % T, p = (idx / T) % P, b = idx / (T * P);
    acc_t acc = bias != nullptr ? static_cast<acc_t>(bias[p]) : acc_t(0);
    for (int64_t q = 0; q < Q; ++q) {
      const scalar_t* in_row = in + satn::offset3(b, q, 0, Q, T);
      acc = kCausal ? satn::causal_point(acc, in_row, w + satn::offset3(p, q, 0, Q, K), t, K, d)
                    : satn::anticausal_point(acc, in_row, w + satn::offset3(q, p, 0, P, K), t, T,
                                             K, d);
    }
    out[idx] = static_cast<scalar_t>(satn::activate(acc, relu));
  }
}

template <typename scalar_t, bool kCausal>
void launch_conv(const scalar_t* in, const scalar_t* w, const scalar_t* bias, scalar_t* out,
                 int64_t B, int64_t P, int64_t Q, int64_t T, int64_t K, int64_t d, bool relu,
                 cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = kTileT + satn::causal_halo(K, d);
  const int64_t per_channel = (width + K * kTileP) * static_cast<int64_t>(sizeof(acc_t));
  const int64_t chunk = std::min<int64_t>({kMaxChunk, std::max<int64_t>(Q, 1),
                                           static_cast<int64_t>(kSmemBudget) / per_channel});
  const int64_t t_tiles = ceil_div(T, kTileT);
  const int64_t p_tiles = ceil_div(P, kTileP);
  if (chunk >= 1 && p_tiles <= 65535 && B * t_tiles <= std::numeric_limits<int32_t>::max()) {
    const dim3 grid(static_cast<unsigned>(B * t_tiles), static_cast<unsigned>(p_tiles));
    tiled_conv_kernel<scalar_t, kCausal><<<grid, kThreads, chunk * per_channel, stream>>>(
        in, w, bias, out, P, Q, T, static_cast<int>(K), static_cast<int>(d),
        static_cast<int>(chunk), relu);
  } else {
    const int64_t blocks = std::min<int64_t>(ceil_div(B * P * T, 256), 1 << 20);
    direct_conv_kernel<scalar_t, kCausal><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        in, w, bias, out, B, P, Q, T, K, d, relu);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
__global__ void relu_mask_kernel(const scalar_t* __restrict__ grad_y,
                                 const scalar_t* __restrict__ y, scalar_t* __restrict__ g,
                                 int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    g[i] = satn::relu_masked_grad(grad_y[i], y[i]);
}

// grad_w[o,c,k] += sum over this block's time chunks of g[b,o,t] * x[b,c,t-lag(k)].
// Blocks along grid.y split the (batch, time-chunk) range; their partial sums
// meet in gw (float, or double for float64) through atomicAdd.
template <typename scalar_t>
__global__ void __launch_bounds__(kWThreads)
grad_w_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
              at::opmath_type<scalar_t>* __restrict__ gw, int64_t B, int64_t C, int64_t O,
              int64_t T, int64_t K, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  // +1 column: threads of a warp read x_s at 16 different rows, same column.
  __shared__ acc_t g_s[kWTile][kWTime + 1];
  __shared__ acc_t x_s[kWTile][kWTime + 1];

  const int64_t c_tiles = ceil_div(C, kWTile);
  const int64_t tile = blockIdx.x / K;
  const int64_t k = blockIdx.x % K;
  const int64_t o0 = (tile / c_tiles) * kWTile;
  const int64_t c0 = (tile % c_tiles) * kWTile;
  const int oo = threadIdx.x / kWTile, cc = threadIdx.x % kWTile;
  const int64_t lag = satn::tap_lag(k, K, d);
  const int64_t t_chunks = ceil_div(T, kWTime);

  acc_t acc = acc_t(0);
  for (int64_t s = blockIdx.y; s < B * t_chunks; s += gridDim.y) {
    const int64_t b = s / t_chunks;
    const int64_t t0 = (s % t_chunks) * kWTime;
    if (t0 + kWTime <= lag) continue;  // every x term is padding (uniform over the block)
    for (int e = threadIdx.x; e < kWTile * kWTime; e += kWThreads) {
      const int r = e / kWTime, j = e % kWTime;
      const int64_t t = t0 + j;
      const int64_t o = o0 + r, c = c0 + r;
      g_s[r][j] = (o < O && t < T) ? static_cast<acc_t>(g[satn::offset3(b, o, t, O, T)])
                                   : acc_t(0);
      const int64_t ts = satn::tap_input_time(t, k, K, d);
      x_s[r][j] = (c < C && satn::time_in_range(ts, T))
                      ? static_cast<acc_t>(x[satn::offset3(b, c, ts, C, T)])
                      : acc_t(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < kWTime; ++j) acc = satn::mul_add(acc, g_s[oo][j], x_s[cc][j]);
    __syncthreads();
  }
  if (o0 + oo < O && c0 + cc < C) atomicAdd(gw + satn::offset3(o0 + oo, c0 + cc, k, C, K), acc);
}

// grad_bias[o] = sum_{b,t} g[b,o,t]: one block per o; per-thread strided sums,
// then a tree in shared memory.
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
grad_bias_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ gb, int64_t B,
                 int64_t O, int64_t T) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t part[kReduceThreads];
  const int64_t o = blockIdx.x;
  acc_t acc = acc_t(0);
  for (int64_t i = threadIdx.x; i < B * T; i += kReduceThreads)
    acc += static_cast<acc_t>(g[satn::offset3(i / T, o, i % T, O, T)]);
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kReduceThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) part[threadIdx.x] += part[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) gb[o] = static_cast<scalar_t>(part[0]);
}

int num_sms() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

}  // namespace

at::Tensor satn_causal_conv1d_forward_cuda(const at::Tensor& x, const at::Tensor& w,
                                           const at::Tensor& bias, int64_t dilation,
                                           bool relu) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2), O = w.size(0), K = w.size(2);
  at::Tensor y = at::empty({B, O, T}, x.options());
  if (y.numel() == 0) return y;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "satn_causal_conv1d_forward_cuda", [&] {
    launch_conv<scalar_t, true>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
                                y.data_ptr<scalar_t>(), B, O, C, T, K, dilation, relu, stream);
  });
  return y;
}

std::vector<at::Tensor> satn_causal_conv1d_backward_cuda(const at::Tensor& grad_y,
                                                         const at::Tensor& x,
                                                         const at::Tensor& w,
                                                         const at::Tensor& y,
                                                         int64_t dilation, bool relu,
                                                         bool has_bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  // grad_w adds partial sums with float atomics: the order, and so the rounding, varies.
  at::globalContext().alertNotDeterministic("satn causal_conv1d backward (CUDA grad_w)");
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2), O = w.size(0), K = w.size(2);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_x = at::zeros_like(x);
  at::Tensor gw_acc = at::zeros({O, C, K}, w.options().dtype(acc_type));
  at::Tensor grad_b = has_bias ? at::zeros({O}, w.options()) : at::Tensor();
  if (grad_y.numel() == 0) return {grad_x, gw_acc.to(w.scalar_type()), grad_b};

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // dL/dz is materialised once: reading grad_y and y in each of the three
  // kernels below would cost the same traffic and complicate them.
  at::Tensor g = relu ? at::empty_like(grad_y) : grad_y;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "satn_causal_conv1d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (relu) {
      const int64_t n = g.numel();
      const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 1 << 20);
      relu_mask_kernel<scalar_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
          grad_y.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const scalar_t* gp = g.data_ptr<scalar_t>();

    if (x.numel() > 0)
      launch_conv<scalar_t, false>(gp, w.data_ptr<scalar_t>(), nullptr,
                                   grad_x.data_ptr<scalar_t>(), B, C, O, T, K, dilation,
                                   false, stream);

    if (C > 0) {
      const int64_t tiles = ceil_div(O, kWTile) * ceil_div(C, kWTile) * K;
      const int64_t chunks = B * ceil_div(T, kWTime);
      // Enough blocks to fill the GPU, and no block summing too many chunks.
      int64_t splits = std::max(ceil_div(4LL * num_sms(), tiles),
                                ceil_div(chunks, kWMaxChunksPerBlock));
      splits = std::max<int64_t>(1, std::min<int64_t>({splits, chunks, 65535}));
      TORCH_CHECK(tiles <= std::numeric_limits<int32_t>::max(),
                  "causal_conv1d: weight too large for the grad_w kernel");
      const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
      grad_w_kernel<scalar_t><<<grid, kWThreads, 0, stream>>>(
          gp, x.data_ptr<scalar_t>(), gw_acc.data_ptr<acc_t>(), B, C, O, T, K, dilation);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    if (has_bias) {
      grad_bias_kernel<scalar_t><<<static_cast<unsigned>(O), kReduceThreads, 0, stream>>>(
          gp, grad_b.data_ptr<scalar_t>(), B, O, T);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, gw_acc.to(w.scalar_type()), grad_b};
}

// Variadic because the list contains commas.
#define SATN_STRINGIFY_(...) #__VA_ARGS__
#define SATN_STRINGIFY(...) SATN_STRINGIFY_(__VA_ARGS__)

// nvcc lists the targeted virtual architectures (e.g. 800,900) in this macro.
std::string satn_cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return SATN_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}
