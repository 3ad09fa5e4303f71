// Python binding of the fused dilated causal conv1d, and its CPU implementation.
//
// The CPU implementation exists so that the arithmetic in causal_conv1d.h can be
// tested (gradcheck included) on machines without a GPU; PyTorch's own CPU
// convolution stays the default there. With SATN_WITH_CUDA defined, CUDA tensors
// go to the kernels in causal_conv1d.cu.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "causal_conv1d.h"

#ifdef SATN_WITH_CUDA
// Implemented in causal_conv1d.cu. Inputs arrive checked and contiguous; bias
// and y may be undefined tensors.
at::Tensor satn_causal_conv1d_forward_cuda(const at::Tensor& x, const at::Tensor& w,
                                           const at::Tensor& bias, int64_t dilation,
                                           bool relu);
std::vector<at::Tensor> satn_causal_conv1d_backward_cuda(const at::Tensor& grad_y,
                                                         const at::Tensor& x,
                                                         const at::Tensor& w,
                                                         const at::Tensor& y,
                                                         int64_t dilation, bool relu,
                                                         bool has_bias);
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
  } else {
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "causal_conv1d: on CPU ", name,
                " must be float32 or float64, got ", dt);
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
  // Kernels index windows with 32-bit ints; keep the receptive field in range.
  TORCH_CHECK((w.size(2) - 1) <= (std::numeric_limits<int32_t>::max() / 4) / dilation,
              "causal_conv1d: receptive field (kernel-1)*dilation+1 = ",
              (w.size(2) - 1) * dilation + 1, " is too large");
}

// ---------------------------------------------------------------- CPU path
// Each parallel chunk writes whole rows, so chunks never share an output.
// Rows are split into a boundary part, where taps can fall outside the
// sequence (the per-element functions of the header check), and an interior
// part where every tap is inside. The interior accumulates a whole row
// (L1-resident) one tap at a time: unit-stride loops that vectorise and
// stream x sequentially.

template <typename scalar_t>
void forward_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                 at::Tensor& y, int64_t d, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2), O = w.size(0), K = w.size(2);
  const int64_t halo = satn::causal_halo(K, d);
  const int64_t edge = std::min(halo, T);  // outputs [0, edge) see the zero padding
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();
  const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();

  at::parallel_for(0, B * O, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(T);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / O, o = row % O;
      std::fill(acc.begin(), acc.end(), bp ? static_cast<acc_t>(bp[o]) : acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* x_row = xp + satn::offset3(b, c, 0, C, T);
        const scalar_t* w_row = wp + satn::offset3(o, c, 0, C, K);
        for (int64_t t = 0; t < edge; ++t)
          acc[t] = satn::causal_point(acc[t], x_row, w_row, t, K, d);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t wk = w_row[k];
          for (int64_t t = halo; t < T; ++t)
            acc[t] = satn::mul_add(acc[t], wk, x_row[satn::tap_input_time(t, k, K, d)]);
        }
      }
      scalar_t* y_row = yp + satn::offset3(b, o, 0, O, T);
      for (int64_t t = 0; t < T; ++t) y_row[t] = static_cast<scalar_t>(satn::activate(acc[t], relu));
    }
  });
}

template <typename scalar_t>
at::Tensor relu_mask_cpu(const at::Tensor& grad_y, const at::Tensor& y) {
  at::Tensor g = at::empty_like(grad_y);
  const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
  const scalar_t* yp = y.data_ptr<scalar_t>();
  scalar_t* gp = g.data_ptr<scalar_t>();
  at::parallel_for(0, g.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) gp[i] = satn::relu_masked_grad(gyp[i], yp[i]);
  });
  return g;
}

// g is dL/dz (ReLU mask already applied).
template <typename scalar_t>
void backward_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w, int64_t d,
                  at::Tensor& grad_x, at::Tensor& grad_w, at::Tensor& grad_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), C = x.size(1), T = x.size(2), O = w.size(0), K = w.size(2);
  const int64_t halo = satn::causal_halo(K, d);
  // Inputs [0, interior) feed an output through every tap.
  const int64_t interior = std::max<int64_t>(T - halo, 0);
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = w.data_ptr<scalar_t>();

  // grad_x[b,c,s] = sum_{o,k} w[o,c,k] * g[b,o,s+lag(k)]: the forward loop
  // mirrored in time, with the boundary at the end of the sequence.
  scalar_t* gxp = grad_x.data_ptr<scalar_t>();
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(T);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / C, c = row % C;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t o = 0; o < O; ++o) {
        const scalar_t* g_row = gp + satn::offset3(b, o, 0, O, T);
        const scalar_t* w_row = wp + satn::offset3(o, c, 0, C, K);
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t wk = w_row[k];
          for (int64_t s = 0; s < interior; ++s)
            acc[s] = satn::mul_add(acc[s], wk, g_row[satn::tap_output_time(s, k, K, d)]);
        }
        for (int64_t s = interior; s < T; ++s)
          acc[s] = satn::anticausal_point(acc[s], g_row, w_row, s, T, K, d);
      }
      scalar_t* gx_row = gxp + satn::offset3(b, c, 0, C, T);
      for (int64_t s = 0; s < T; ++s) gx_row[s] = static_cast<scalar_t>(acc[s]);
    }
  });

  // grad_w[o,c,k] = sum_{b,t} g[b,o,t] * x[b,c,t-lag(k)]; one partial sum per
  // batch row keeps the float32 sums short for long sequences.
  scalar_t* gwp = grad_w.data_ptr<scalar_t>();
  at::parallel_for(0, O * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t oc = begin; oc < end; ++oc) {
      const int64_t o = oc / C, c = oc % C;
      for (int64_t k = 0; k < K; ++k) {
        acc_t total = 0;
        for (int64_t b = 0; b < B; ++b)
          total += satn::lagged_dot(acc_t(0), gp + satn::offset3(b, o, 0, O, T),
                                    xp + satn::offset3(b, c, 0, C, T), k, T, K, d);
        gwp[satn::offset3(o, c, k, C, K)] = static_cast<scalar_t>(total);
      }
    }
  });

  if (grad_b.defined()) {
    scalar_t* gbp = grad_b.data_ptr<scalar_t>();
    at::parallel_for(0, O, 1, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) {
        acc_t total = 0;
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* g_row = gp + satn::offset3(b, o, 0, O, T);
          acc_t part = 0;
          for (int64_t t = 0; t < T; ++t) part += static_cast<acc_t>(g_row[t]);
          total += part;
        }
        gbp[o] = static_cast<scalar_t>(total);
      }
    });
  }
}

}  // namespace

// ---------------------------------------------------------------- bindings

at::Tensor causal_conv1d_forward(const at::Tensor& x_in, const at::Tensor& w_in,
                                 const std::optional<at::Tensor>& bias_in, int64_t dilation,
                                 bool relu) {
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
  if (x.is_cuda()) return satn_causal_conv1d_forward_cuda(x, w, bias, dilation, relu);
#endif
  at::Tensor y = at::empty({x.size(0), w.size(0), x.size(2)}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_forward_cpu", [&] {
    forward_cpu<scalar_t>(x, w, bias, y, dilation, relu);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv1d_backward(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& w_in,
    const std::optional<at::Tensor>& y_in, int64_t dilation, bool relu, bool has_bias) {
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
    auto grads = satn_causal_conv1d_backward_cuda(grad_y, x, w, y, dilation, relu, has_bias);
    return {grads[0], grads[1], grads[2]};
  }
#endif
  at::Tensor grad_x = at::zeros_like(x);
  at::Tensor grad_w = at::zeros_like(w);
  at::Tensor grad_b = has_bias ? at::zeros({w.size(0)}, w.options()) : at::Tensor();
  if (grad_y.numel() == 0) return {grad_x, grad_w, grad_b};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv1d_backward_cpu", [&] {
    const at::Tensor g = relu ? relu_mask_cpu<scalar_t>(grad_y, y) : grad_y;
    backward_cpu<scalar_t>(g, x, w, dilation, grad_x, grad_w, grad_b);
  });
  return {grad_x, grad_w, grad_b};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused dilated causal conv1d (+bias, +ReLU) for SATN";
  m.def("forward", &causal_conv1d_forward,
        "y = act(bias + causal dilated conv1d(x, weight)); x (B,C,T), weight (O,C,K)",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("dilation") = 1,
        py::arg("relu") = false);
  m.def("backward", &causal_conv1d_backward,
        "(grad_x, grad_weight, grad_bias or None) from grad_y and the saved x, weight, y",
        py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("y") = py::none(),
        py::arg("dilation") = 1, py::arg("relu") = false, py::arg("has_bias") = false);
  m.def("has_cuda", &has_cuda_part, "whether the CUDA kernels were compiled in");
  m.def("cuda_archs", []() -> std::string {
#ifdef SATN_WITH_CUDA
    return satn_cuda_arch_list();
#else
    return "";
#endif
  }, "compute capabilities the CUDA kernels were compiled for, e.g. '800,900'");
}
