// CUDA kernels of the fused dilated causal conv1d: the tile code of
// causal_conv1d_tiles.h with device fragments.
//
//   float16, bfloat16: WMMA tensor cores, 16x16x16, float32 accumulation
//   float32:           WMMA TF32 tensor cores, 16x16x8, when PyTorch would use TF32
//                      for a convolution (tf32=true); otherwise exact float32 on CUDA cores
//   float64:           CUDA cores
//
// Forward and grad_x: one implicit-GEMM kernel (64 time steps x 128 output channels
// per block, 8 warps of 32 x 32), grad_x with the taps mirrored and the ReLU mask
// applied while grad_y is staged; skipped when x needs no gradient. grad_w (and
// grad_bias in the same pass): a GEMM over (batch, time) split over blocks, whose
// partial sums a second kernel adds in a fixed order: no atomics, deterministic.
// Staging is double-buffered; 4- and 8-byte elements are copied with cp.async.

// The parts of ATen this file uses, not ATen/ATen.h: a fifth less compile time per architecture.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "causal_conv1d.h"
#include "causal_conv1d_tiles.h"

namespace {

using namespace satn::tiles;
namespace wmma = nvcuda::wmma;

// ---------------------------------------------------------------- fragments
template <typename T>
struct DeviceHalf;
template <>
struct DeviceHalf<at::Half> { using type = __half; };
template <>
struct DeviceHalf<at::BFloat16> { using type = __nv_bfloat16; };

// Tensor-core tiles of one element type E: wmma reads the operands from memory as Mem and
// multiplies them as Op, in 16 x 16 x K steps, accumulating in float32. With kTf32, loaded
// float32 operands are rounded to TF32 (what the tensor cores multiply); else used as loaded.
template <typename E, typename Op, typename Mem, int K_, bool kTf32>
struct WmmaFragments {
  using elem_t = E;
  using acc_t = float;
  static constexpr int M = 16, N = 16, K = K_;
  using A = wmma::fragment<wmma::matrix_a, M, N, K, Op, wmma::row_major>;
  using BCol = wmma::fragment<wmma::matrix_b, M, N, K, Op, wmma::col_major>;
  using BRow = wmma::fragment<wmma::matrix_b, M, N, K, Op, wmma::row_major>;
  using C = wmma::fragment<wmma::accumulator, M, N, K, float>;

  template <typename F>
  static __device__ __forceinline__ void round(F& f) {
    if constexpr (kTf32) {
#pragma unroll
      for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
    }
  }
  static __device__ __forceinline__ void zero(C& c) { wmma::fill_fragment(c, 0.0f); }
  static __device__ __forceinline__ void load_a(A& a, const E* p, int ld) {
    wmma::load_matrix_sync(a, reinterpret_cast<const Mem*>(p), ld);
    round(a);
  }
  template <typename B>
  static __device__ __forceinline__ void load_b(B& b, const E* p, int ld) {
    wmma::load_matrix_sync(b, reinterpret_cast<const Mem*>(p), ld);
    round(b);
  }
  template <typename B>
  static __device__ __forceinline__ void mma(C& c, const A& a, const B& b) {
    wmma::mma_sync(c, a, b, c);
  }
  static __device__ __forceinline__ void store_col(float* p, const C& c, int ld) {
    wmma::store_matrix_sync(p, c, ld, wmma::mem_col_major);
  }
  static __device__ __forceinline__ void store_row(float* p, const C& c, int ld) {
    wmma::store_matrix_sync(p, c, ld, wmma::mem_row_major);
  }
};

// bf16 / fp16 on tensor cores. at::Half / at::BFloat16 share the device types' layout.
template <typename E>
using WmmaHalfFragments = WmmaFragments<E, typename DeviceHalf<E>::type, typename DeviceHalf<E>::type, 16, false>;
// float32 operands rounded to TF32 on tensor cores, float32 accumulation.
using WmmaTf32Fragments = WmmaFragments<float, wmma::precision::tf32, float, 8, true>;

// Exact float32 / float64 on CUDA cores, with the same warp-level semantics: lane l
// holds C(l % 16, (l / 16) * 8 + j), j < 8; A and B are read from shared memory
// by the multiply (the fragments only remember where).
template <typename T, int Kf>
struct SimtFragments {
  using elem_t = T;
  using acc_t = T;
  static constexpr int M = 16, N = 16, K = Kf;
  struct A { const T* p; int ld; };
  struct BCol { const T* p; int ld; };
  struct BRow { const T* p; int ld; };
  struct C { T v[8]; };

  static __device__ __forceinline__ int row() { return threadIdx.x % M; }
  static __device__ __forceinline__ int col0() { return ((threadIdx.x / M) % 2) * (N / 2); }
  static __device__ __forceinline__ T b_at(const BCol& b, int k, int n) { return b.p[n * b.ld + k]; }
  static __device__ __forceinline__ T b_at(const BRow& b, int k, int n) { return b.p[k * b.ld + n]; }

  static __device__ __forceinline__ void zero(C& c) {
#pragma unroll
    for (int j = 0; j < 8; ++j) c.v[j] = T(0);
  }
  static __device__ __forceinline__ void load_a(A& a, const T* p, int ld) { a = A{p, ld}; }
  static __device__ __forceinline__ void load_b(BCol& b, const T* p, int ld) { b = BCol{p, ld}; }
  static __device__ __forceinline__ void load_b(BRow& b, const T* p, int ld) { b = BRow{p, ld}; }
  template <typename B>
  static __device__ __forceinline__ void mma(C& c, const A& a, const B& b) {
    const int m = row(), n0 = col0();
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const T av = a.p[m * a.ld + k];
#pragma unroll
      for (int j = 0; j < 8; ++j) c.v[j] = fma(av, b_at(b, k, n0 + j), c.v[j]);
    }
  }
  static __device__ __forceinline__ void store_col(T* p, const C& c, int ld) {
#pragma unroll
    for (int j = 0; j < 8; ++j) p[(col0() + j) * ld + row()] = c.v[j];
  }
  static __device__ __forceinline__ void store_row(T* p, const C& c, int ld) {
#pragma unroll
    for (int j = 0; j < 8; ++j) p[row() * ld + col0() + j] = c.v[j];
  }
};

// ---------------------------------------------------------------- the block
struct GpuBlock {
  static constexpr int kSlots = 1;
  int tid, nthreads, warp, nwarps;
  const void* any_global;  // a valid global address for zero-filling copies

  __device__ explicit GpuBlock(const void* g)
      : tid(threadIdx.x), nthreads(blockDim.x), warp(threadIdx.x / 32), nwarps(blockDim.x / 32),
        any_global(g) {}
  __device__ __forceinline__ void sync() { __syncthreads(); }
  __device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::); }
  __device__ __forceinline__ void wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
  __device__ __forceinline__ void wait_but_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

  // 4- and 8-byte elements: cp.async, reading nothing (and writing zero) for a null src.
  // 2-byte elements are below cp.async's smallest size: a plain load and store.
  template <typename T>
  __device__ __forceinline__ void copy(T* dst, const T* src) {
    if constexpr (sizeof(T) == 4 || sizeof(T) == 8) {
      const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
      const int n = src != nullptr ? static_cast<int>(sizeof(T)) : 0;
      const void* g = src != nullptr ? static_cast<const void*>(src) : any_global;
      if constexpr (sizeof(T) == 4)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(g), "r"(n));
      else
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(s), "l"(g), "r"(n));
    } else {
      *dst = src != nullptr ? *src : T(0.0f);
    }
  }
  template <typename T>
  __device__ __forceinline__ void put(T* dst, T v) { *dst = v; }
};

template <typename Fr, int KT>
__global__ void __launch_bounds__(kThreads) conv_kernel(const ConvArgs<typename Fr::elem_t> a) {
  extern __shared__ __align__(128) unsigned char smem[];
  GpuBlock ctx(a.w);
  const int64_t ttiles = div_up(a.T, kConvBT);
  conv_block<Fr, KT>(ctx, a, blockIdx.x / ttiles, (blockIdx.x % ttiles) * kConvBT,
                     static_cast<int64_t>(blockIdx.y) * kConvBO, smem);
}

template <typename Fr, int KT>
__global__ void __launch_bounds__(kThreads)
grad_w_kernel(const GradWArgs<typename Fr::elem_t, typename Fr::acc_t> a, int groups) {
  extern __shared__ __align__(128) unsigned char smem[];
  GpuBlock ctx(a.x);
  grad_w_block<Fr, KT>(ctx, a, blockIdx.x, static_cast<int64_t>(blockIdx.y) * kGwBO,
                       static_cast<int64_t>(blockIdx.z / groups) * kGwBC,
                       static_cast<int>(blockIdx.z % groups), smem);
}

template <typename E, typename Acc>
__global__ void reduce_kernel(const Acc* __restrict__ partial_w, const Acc* __restrict__ partial_b,
                              E* __restrict__ grad_w, E* __restrict__ grad_b, int splits, int64_t O,
                              int64_t C, int K, int64_t O_pad, int64_t C_pad) {
  const int64_t nw = O * C * K, n = nw > O ? nw : O;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < nw) grad_w[i] = satn::tiles::reduce_grad_w<E>(partial_w, i, splits, O, C, K, O_pad, C_pad);
    if (grad_b != nullptr && i < O) grad_b[i] = satn::tiles::reduce_grad_b<E>(partial_b, i, splits, O_pad);
  }
}

// ---------------------------------------------------------------- launchers
template <typename F>
void with_device_fragments(at::ScalarType st, bool tf32, F&& f) {
  switch (st) {
    case at::kFloat:
      if (tf32) f(WmmaTf32Fragments{});
      else f(SimtFragments<float, 8>{});
      break;
    case at::kDouble: f(SimtFragments<double, 4>{}); break;
    case at::kHalf: f(WmmaHalfFragments<at::Half>{}); break;
    case at::kBFloat16: f(WmmaHalfFragments<at::BFloat16>{}); break;
    default: TORCH_CHECK(false, "causal_conv1d: unsupported dtype ", st);
  }
}

// Double buffering when it fits the device's shared memory, else one buffer.
template <typename Kernel, typename Bytes>
int64_t prepare_smem(Kernel kernel, Bytes bytes_for, int& nbuf) {
  const int64_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  nbuf = bytes_for(2) <= limit ? 2 : 1;
  const int64_t bytes = bytes_for(nbuf);
  TORCH_CHECK(bytes <= limit, "causal_conv1d: a block needs ", bytes,
              " bytes of shared memory, the device allows ", limit);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  return bytes;
}

template <typename Fr>
void run_conv(const at::Tensor& in, const at::Tensor& ymask, const at::Tensor& w,
              const at::Tensor& bias, at::Tensor& out, int64_t d, bool causal, bool relu) {
  ConvArgs<typename Fr::elem_t> a = conv_args<typename Fr::elem_t>(in, ymask, w, bias, out, d, causal, relu);
  const int64_t ttiles = div_up(a.T, kConvBT), ptiles = div_up(a.P, kConvBO);
  TORCH_CHECK(a.B * ttiles <= std::numeric_limits<int32_t>::max() && ptiles <= 65535,
              "causal_conv1d: input too large for one launch");
  with_taps(a.K, [&](auto kt) {
    constexpr int KT = decltype(kt)::value;
    const int64_t bytes = prepare_smem(conv_kernel<Fr, KT>,
                                       [&](int nb) { return conv_smem_bytes<Fr, KT>(a.step, nb); }, a.nbuf);
    const dim3 grid(static_cast<unsigned>(a.B * ttiles), static_cast<unsigned>(ptiles));
    conv_kernel<Fr, KT><<<grid, kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename Fr>
void run_grad_w(const at::Tensor& gy, const at::Tensor& ymask, const at::Tensor& x, int64_t d,
                at::Tensor& grad_w, at::Tensor& grad_b) {
  using E = typename Fr::elem_t;
  using Acc = typename Fr::acc_t;
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2), O = gy.size(1);
  const int K = static_cast<int>(grad_w.size(2));
  const int64_t otiles = div_up(O, kGwBO), ctiles = std::max<int64_t>(1, div_up(C, kGwBC));
  GradWArgs<E, Acc> a;
  a.B = B, a.O = O, a.C = C, a.T = T, a.K = K, a.d = static_cast<int>(d);
  a.O_pad = otiles * kGwBO, a.C_pad = ctiles * kGwBC;
  a.step = tap_row_step(a.d, kGwBT);
  a.items = B * div_up(T, kGwBT);
  a.g = gy.data_ptr<E>(), a.ymask = ymask.defined() ? ymask.data_ptr<E>() : nullptr;
  a.x = x.data_ptr<E>();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  with_taps(K, [&](auto kt) {
    constexpr int KT = decltype(kt)::value;
    const int64_t groups = div_up(K, KT);
    // Enough blocks for two waves, at most 64 items summed per block in float32.
    const int64_t base = otiles * ctiles * groups;
    int64_t splits = std::max(div_up(a.items, 64), div_up(2LL * sms, base));
    a.splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({splits, a.items, 65535})));
    TORCH_CHECK(otiles <= 65535 && ctiles * groups <= 65535, "causal_conv1d: weight too large");
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<Acc>::value);
    at::Tensor partial_w = at::empty({a.splits, K, a.O_pad, a.C_pad}, acc_opts);
    at::Tensor partial_b = grad_b.defined() ? at::empty({a.splits, a.O_pad}, acc_opts) : at::Tensor();
    a.partial_w = partial_w.data_ptr<Acc>();
    a.partial_b = partial_b.defined() ? partial_b.data_ptr<Acc>() : nullptr;
    const int64_t bytes = prepare_smem(grad_w_kernel<Fr, KT>,
                                       [&](int nb) { return grad_w_smem_bytes<Fr, KT>(a.step, nb); }, a.nbuf);
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(otiles),
                    static_cast<unsigned>(ctiles * groups));
    grad_w_kernel<Fr, KT><<<grid, kThreads, bytes, stream>>>(a, static_cast<int>(groups));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t n = std::max<int64_t>(grad_w.numel(), O);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(div_up(n, 256), 4096));
    reduce_kernel<E, Acc><<<std::max(blocks, 1u), 256, 0, stream>>>(
        a.partial_w, a.partial_b, grad_w.data_ptr<E>(), grad_b.defined() ? grad_b.data_ptr<E>() : nullptr,
        a.splits, O, C, K, a.O_pad, a.C_pad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor satn_causal_conv1d_forward_cuda(const at::Tensor& x, const at::Tensor& w,
                                           const at::Tensor& bias, int64_t dilation, bool relu,
                                           bool tf32) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({x.size(0), w.size(0), x.size(2)}, x.options());
  if (y.numel() == 0) return y;
  with_device_fragments(x.scalar_type(), tf32, [&](auto fr) {
    run_conv<decltype(fr)>(x, at::Tensor(), w, bias, y, dilation, true, relu);
  });
  return y;
}

std::vector<at::Tensor> satn_causal_conv1d_backward_cuda(const at::Tensor& grad_y,
                                                         const at::Tensor& x,
                                                         const at::Tensor& w,
                                                         const at::Tensor& y,
                                                         int64_t dilation, bool relu,
                                                         bool has_bias, bool need_x, bool tf32) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = need_x ? at::empty_like(x) : at::Tensor();
  at::Tensor grad_w = at::empty_like(w);
  at::Tensor grad_b = has_bias ? at::empty({w.size(0)}, w.options()) : at::Tensor();
  with_device_fragments(x.scalar_type(), tf32, [&](auto fr) {
    using Fr = decltype(fr);
    if (need_x && x.numel() > 0) run_conv<Fr>(grad_y, y, w, at::Tensor(), grad_x, dilation, false, false);
    if (w.numel() > 0 || has_bias) run_grad_w<Fr>(grad_y, y, x, dilation, grad_w, grad_b);
  });
  return {grad_x, grad_w, grad_b};
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
