// Python binding of the fused dilated causal conv1d, and its CPU build.
//
// The CPU build runs the GPU kernels' tile code (causal_conv1d_tiles.h) with the
// fragments emulated in plain C++: the same block tiling, shared-memory staging,
// tap offsets, epilogue and split reduction, one block per task of
// at::parallel_for. It exists to test that code on machines without a GPU;
// PyTorch's own CPU convolution stays the default there. With SATN_WITH_CUDA
// defined, CUDA tensors go to the kernels in causal_conv1d.cu.
// ATen and torch's pybind11 casters only: torch/extension.h (the whole C++ frontend) would
// double the compile time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "causal_conv1d.h"
#include "causal_conv1d_tiles.h"

#ifdef SATN_WITH_CUDA
// Implemented in causal_conv1d.cu. Inputs arrive checked and contiguous; bias,
// y and the returned grad_x / grad_bias may be undefined tensors.
at::Tensor satn_causal_conv1d_forward_cuda(const at::Tensor& x, const at::Tensor& w,
                                           const at::Tensor& bias, int64_t dilation,
                                           bool relu, bool tf32);
std::vector<at::Tensor> satn_causal_conv1d_backward_cuda(const at::Tensor& grad_y,
                                                         const at::Tensor& x,
                                                         const at::Tensor& w,
                                                         const at::Tensor& y,
                                                         int64_t dilation, bool relu,
                                                         bool has_bias, bool need_x, bool tf32);
std::string satn_cuda_arch_list();
#endif

namespace {

bool has_cuda_part() {
#ifdef SATN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void check_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  if (t.is_cuda()) {
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                "causal_conv1d: on CUDA ", name,
                " must be float16, bfloat16, float32 or float64, got ", dt);
  } else {  // the emulation covers one 16-bit type: fp16 runs the same code as bf16
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16,
                "causal_conv1d: on CPU ", name, " must be bfloat16, float32 or float64, got ", dt);
  }
}

// Everything is checked against x: one device and one dtype for all tensors.
void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "causal_conv1d: ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "causal_conv1d: ", name, " has dtype ",
              t.scalar_type(), " but x has dtype ", x.scalar_type());
}

void check_common(const at::Tensor& x, const at::Tensor& w, int64_t dilation) {
  TORCH_CHECK(x.defined() && w.defined(), "causal_conv1d: x and weight are required");
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), "causal_conv1d: x must be on CPU or CUDA, got ",
              x.device());
  TORCH_CHECK(!x.is_cuda() || has_cuda_part(),
              "causal_conv1d: x is a CUDA tensor but this build of the extension has no "
              "CUDA part (build it with cuda=True)");
  check_dtype(x, "x");
  check_like_x(w, x, "weight");
  TORCH_CHECK(x.dim() == 3, "causal_conv1d: x must be 3-D (batch, channels, time), got ",
              x.dim(), "-D of shape ", x.sizes());
  TORCH_CHECK(w.dim() == 3,
              "causal_conv1d: weight must be 3-D (out_channels, in_channels, kernel), got ",
              w.dim(), "-D of shape ", w.sizes());
  TORCH_CHECK(w.size(1) == x.size(1), "causal_conv1d: weight expects ", w.size(1),
              " input channels but x has ", x.size(1));
  TORCH_CHECK(w.size(2) >= 1, "causal_conv1d: kernel size must be >= 1, got ", w.size(2));
  TORCH_CHECK(dilation >= 1, "causal_conv1d: dilation must be >= 1, got ", dilation);
  // Kernels index windows with 32-bit ints; keep the dilation (also for kernel size 1, where
  // it does not widen the receptive field) and the receptive field in range.
  TORCH_CHECK(dilation <= std::numeric_limits<int32_t>::max() / 4,
              "causal_conv1d: dilation must be <= ", std::numeric_limits<int32_t>::max() / 4,
              ", got ", dilation);
  TORCH_CHECK((w.size(2) - 1) <= (std::numeric_limits<int32_t>::max() / 4) / dilation,
              "causal_conv1d: receptive field (kernel-1)*dilation+1 = ",
              (w.size(2) - 1) * dilation + 1, " is too large");
}


using namespace satn::tiles;

// ---------------------------------------------------------------- emulated fragments
// The device rounds float32 operands to TF32 (10-bit mantissa, to nearest, ties away
// from zero: cvt.rna.tf32.f32) before a TF32 MMA; bf16 / fp16 operands are exact and
// so are their products in float32.
struct NoRound {
  template <typename T>
  static T apply(T v) { return v; }
};
struct RoundTf32 {
  static float apply(float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    if ((u & 0x7f800000u) != 0x7f800000u) {  // finite: round the 13 dropped bits
      u += 0x1000u;
      u &= 0xffffe000u;
    }
    std::memcpy(&v, &u, sizeof v);
    return v;
  }
};

// Same shapes and semantics as the device fragments (16 x 16 x Kf, accumulation in
// acc_t); the layout inside a fragment is the only thing not reproduced.
template <typename E, typename Acc, int Kf, typename Round>
struct EmuFragments {
  using elem_t = E;
  using acc_t = Acc;
  static constexpr int M = 16, N = 16, K = Kf;
  struct A { Acc v[M][K]; };
  struct BCol { Acc v[K][N]; };
  struct BRow { Acc v[K][N]; };
  struct C { Acc v[M][N]; };

  static Acc in(E e) { return Round::apply(static_cast<Acc>(e)); }
  static void zero(C& c) {
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) c.v[m][n] = Acc(0);
  }
  static void load_a(A& a, const E* p, int ld) {
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < K; ++k) a.v[m][k] = in(p[m * ld + k]);
  }
  static void load_b(BCol& b, const E* p, int ld) {
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) b.v[k][n] = in(p[n * ld + k]);
  }
  static void load_b(BRow& b, const E* p, int ld) {
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) b.v[k][n] = in(p[k * ld + n]);
  }
  template <typename B>
  static void mma(C& c, const A& a, const B& b) {
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        Acc sum = c.v[m][n];
        for (int k = 0; k < K; ++k) sum += a.v[m][k] * b.v[k][n];
        c.v[m][n] = sum;
      }
  }
  static void store_col(Acc* p, const C& c, int ld) {
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) p[n * ld + m] = c.v[m][n];
  }
  static void store_row(Acc* p, const C& c, int ld) {
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) p[m * ld + n] = c.v[m][n];
  }
};

// A block run by one executor: the cooperative loops take every index, the warp
// loops every warp's tile, copies are immediate and barriers have nothing to wait for.
struct CpuBlock {
  static constexpr int kSlots = kWarps;
  int tid = 0, nthreads = 1, warp = 0, nwarps = 1;
  void sync() {}
  void commit() {}
  void wait_all() {}
  void wait_but_one() {}
  template <typename T>
  void copy(T* dst, const T* src) { *dst = src != nullptr ? *src : T(0.0f); }
  template <typename T>
  void put(T* dst, T v) { *dst = v; }
};

// The fragment back end the device would use for this dtype (and TF32 setting).
template <typename F>
void with_emulated_fragments(at::ScalarType st, bool tf32, F&& f) {
  switch (st) {
    case at::kFloat:
      if (tf32) f(EmuFragments<float, float, 8, RoundTf32>{});
      else f(EmuFragments<float, float, 8, NoRound>{});
      break;
    case at::kDouble: f(EmuFragments<double, double, 4, NoRound>{}); break;
    case at::kBFloat16: f(EmuFragments<at::BFloat16, float, 16, NoRound>{}); break;
    default: TORCH_CHECK(false, "causal_conv1d: unsupported dtype ", st);
  }
}

template <typename Fr, int KT>
void conv_cpu(const ConvArgs<typename Fr::elem_t>& a) {
  const int64_t ttiles = div_up(a.T, kConvBT), ptiles = div_up(a.P, kConvBO);
  const int64_t bytes = conv_smem_bytes<Fr, KT>(a.step, a.nbuf);
  at::parallel_for(0, a.B * ttiles * ptiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> smem(div_up(bytes, sizeof(double)));
    CpuBlock ctx;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t bt = blk / ptiles;
      conv_block<Fr, KT>(ctx, a, bt / ttiles, (bt % ttiles) * kConvBT, (blk % ptiles) * kConvBO,
                         reinterpret_cast<unsigned char*>(smem.data()));
    }
  });
}

template <typename Fr>
void run_conv_cpu(const at::Tensor& in, const at::Tensor& ymask, const at::Tensor& w,
                  const at::Tensor& bias, at::Tensor& out, int64_t d, bool causal, bool relu) {
  ConvArgs<typename Fr::elem_t> a = conv_args<typename Fr::elem_t>(in, ymask, w, bias, out, d, causal, relu);
  a.nbuf = 2;
  with_taps(a.K, [&](auto kt) { conv_cpu<Fr, decltype(kt)::value>(a); });
}

template <typename Fr>
void run_grad_w_cpu(const at::Tensor& gy, const at::Tensor& ymask, const at::Tensor& x,
                    int64_t d, at::Tensor& grad_w, at::Tensor& grad_b) {
  using E = typename Fr::elem_t;
  using Acc = typename Fr::acc_t;
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2), O = gy.size(1);
  const int K = static_cast<int>(grad_w.size(2));
  const int64_t otiles = div_up(O, kGwBO), ctiles = std::max<int64_t>(1, div_up(C, kGwBC));
  GradWArgs<E, Acc> a;
  a.B = B, a.O = O, a.C = C, a.T = T, a.K = K, a.d = static_cast<int>(d);
  a.O_pad = otiles * kGwBO, a.C_pad = ctiles * kGwBC;
  a.step = tap_row_step(a.d, kGwBT), a.nbuf = 2;
  a.items = B * div_up(T, kGwBT);
  a.splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(a.items, div_up(a.items, 64))));
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<Acc>::value);
  at::Tensor partial_w = at::empty({a.splits, K, a.O_pad, a.C_pad}, acc_opts);
  at::Tensor partial_b = grad_b.defined() ? at::empty({a.splits, a.O_pad}, acc_opts) : at::Tensor();
  a.g = gy.data_ptr<E>(), a.ymask = ymask.defined() ? ymask.data_ptr<E>() : nullptr;
  a.x = x.data_ptr<E>();
  a.partial_w = partial_w.data_ptr<Acc>();
  a.partial_b = partial_b.defined() ? partial_b.data_ptr<Acc>() : nullptr;

  with_taps(K, [&](auto kt) {
    constexpr int KT = decltype(kt)::value;
    const int64_t groups = div_up(K, KT);
    const int64_t bytes = grad_w_smem_bytes<Fr, KT>(a.step, a.nbuf);
    at::parallel_for(0, a.splits * otiles * ctiles * groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> smem(div_up(bytes, sizeof(double)));
      CpuBlock ctx;
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t z = blk % (ctiles * groups), rest = blk / (ctiles * groups);
        grad_w_block<Fr, KT>(ctx, a, static_cast<int>(rest / otiles), (rest % otiles) * kGwBO,
                             (z / groups) * kGwBC, static_cast<int>(z % groups),
                             reinterpret_cast<unsigned char*>(smem.data()));
      }
    });
  });
  E* gw = grad_w.data_ptr<E>();
  at::parallel_for(0, grad_w.numel(), 1 << 12, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      gw[i] = reduce_grad_w<E>(a.partial_w, i, a.splits, O, C, K, a.O_pad, a.C_pad);
  });
  if (grad_b.defined()) {
    E* gb = grad_b.data_ptr<E>();
    for (int64_t o = 0; o < O; ++o) gb[o] = reduce_grad_b<E>(a.partial_b, o, a.splits, a.O_pad);
  }
}

}  // namespace

// ---------------------------------------------------------------- bindings

at::Tensor causal_conv1d_forward(const at::Tensor& x_in, const at::Tensor& w_in,
                                 const std::optional<at::Tensor>& bias_in, int64_t dilation,
                                 bool relu, bool tf32) {
  check_common(x_in, w_in, dilation);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    check_like_x(*bias_in, x, "bias");
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == w.size(0),
                "causal_conv1d: bias must have shape (", w.size(0), "), got ",
                bias_in->sizes());
    bias = bias_in->contiguous();
  }

#ifdef SATN_WITH_CUDA
  if (x.is_cuda()) return satn_causal_conv1d_forward_cuda(x, w, bias, dilation, relu, tf32);
#endif
  at::Tensor y = at::empty({x.size(0), w.size(0), x.size(2)}, x.options());
  if (y.numel() == 0) return y;
  with_emulated_fragments(x.scalar_type(), tf32, [&](auto fr) {
    run_conv_cpu<decltype(fr)>(x, at::Tensor(), w, bias, y, dilation, true, relu);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_backward(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& w_in,
    const std::optional<at::Tensor>& y_in, int64_t dilation, bool relu, bool has_bias,
    bool need_x, bool tf32) {
  check_common(x_in, w_in, dilation);
  const std::vector<int64_t> y_shape = {x_in.size(0), w_in.size(0), x_in.size(2)};
  TORCH_CHECK(grad_y_in.defined(), "causal_conv1d: grad_y is required");
  check_like_x(grad_y_in, x_in, "grad_y");
  TORCH_CHECK(grad_y_in.sizes() == at::IntArrayRef(y_shape), "causal_conv1d: grad_y must have shape ",
              at::IntArrayRef(y_shape), ", got ", grad_y_in.sizes());
  at::Tensor y;
  if (relu) {
    TORCH_CHECK(y_in.has_value() && y_in->defined(),
                "causal_conv1d: backward through ReLU needs the saved output y");
    check_like_x(*y_in, x_in, "y");
    TORCH_CHECK(y_in->sizes() == at::IntArrayRef(y_shape), "causal_conv1d: y must have shape ",
                at::IntArrayRef(y_shape), ", got ", y_in->sizes());
    y = y_in->contiguous();
  }
  const at::Tensor grad_y = grad_y_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w = w_in.contiguous();

#ifdef SATN_WITH_CUDA
  if (x.is_cuda()) {
    auto grads = satn_causal_conv1d_backward_cuda(grad_y, x, w, y, dilation, relu, has_bias,
                                                  need_x, tf32);
    return {grads[0], grads[1], grads[2]};
  }
#endif
  at::Tensor grad_x = need_x ? at::empty_like(x) : at::Tensor();
  at::Tensor grad_w = at::empty_like(w);
  at::Tensor grad_b = has_bias ? at::empty({w.size(0)}, w.options()) : at::Tensor();
  with_emulated_fragments(x.scalar_type(), tf32, [&](auto fr) {
    using Fr = decltype(fr);
    if (need_x && x.numel() > 0)
      run_conv_cpu<Fr>(grad_y, y, w, at::Tensor(), grad_x, dilation, false, false);
    if (w.numel() > 0 || has_bias) run_grad_w_cpu<Fr>(grad_y, y, x, dilation, grad_w, grad_b);
  });
  return {grad_x, grad_w, grad_b};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused dilated causal conv1d (+bias, +ReLU) for SATN";
  m.def("forward", &causal_conv1d_forward,
        "y = act(bias + causal dilated conv1d(x, weight)); x (B,C,T), weight (O,C,K); "
        "tf32: float32 products on TF32, as PyTorch's convolution with TF32 allowed",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("dilation") = 1,
        py::arg("relu") = false, py::arg("tf32") = false);
  m.def("backward", &causal_conv1d_backward,
        "(grad_x or None, grad_weight, grad_bias or None) from grad_y and the saved x, weight, y",
        py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("y") = py::none(),
        py::arg("dilation") = 1, py::arg("relu") = false, py::arg("has_bias") = false,
        py::arg("need_x") = true, py::arg("tf32") = false);
  m.def("has_cuda", &has_cuda_part, "whether the CUDA kernels were compiled in");
  m.def("cuda_archs", []() -> std::string {
#ifdef SATN_WITH_CUDA
    return satn_cuda_arch_list();
#else
    return "";
#endif
  }, "compute capabilities the CUDA kernels were compiled for, e.g. '800,900'");
}
