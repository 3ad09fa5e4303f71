// Tile-level code of the causal conv1d kernels, written once against two small
// interfaces so that the same tiling, staging and index code runs on a GPU and,
// for testing, on a CPU:
//
//   Fr   (fragments): 16 x 16 x Fr::K matrix tiles, warp-collective on a GPU.
//          Fr::A, Fr::BCol, Fr::BRow, Fr::C; zero(c); load_a(a, p, ld) with
//          A(m,k) = p[m*ld + k]; load_b(b, p, ld) with B(k,n) = p[n*ld + k]
//          (BCol) or p[k*ld + n] (BRow); mma(c, a, b): C += A B;
//          store_col(p, c, ld): p[n*ld + m] = C(m,n); store_row: p[m*ld + n].
//        Back ends: WMMA tensor cores (bf16, fp16, TF32) and a CUDA-core one
//        (exact fp32, fp64) in causal_conv1d.cu; a plain C++ emulation of the
//        same shapes, rounding inputs to TF32 where the device does, in
//        causal_conv1d.cpp.
//   Ctx  (the block): tid/nthreads for cooperative loops, warp/nwarps and
//        kSlots (warp tiles one executor handles: 1 on a GPU, every warp's on
//        a CPU, which runs a block as one executor), sync(), copy(dst, src)
//        (global -> shared, zero when src is null; cp.async on a GPU),
//        commit() / wait_all() / wait_but_one() for the asynchronous copies.
//
// The convolution is an implicit GEMM. Forward: Y[t][o] = sum_{j,c} X[t + off_j][c] W_j[c][o]
// for a tile of BT time steps and BO output channels, with off_j = (j-(K-1))*d (tap j
// looks (K-1-j)*d steps back). x is staged in shared memory as [time][channel] rows,
// so each tap is a row offset into the same tile (no im2col copy); rows outside [0, T)
// are zeros (the causal padding is virtual). grad_x is the same kernel with the taps
// mirrored (off_j = j*d, weight w[o][c][K-1-j], reading grad_y, anti-causal).
// grad_w[o][c][k] = sum_{b,t} g[b,o,t] x[b,c,t+off_k] is a GEMM over (batch, time),
// split over blocks whose partial sums are added in a fixed order afterwards.
#pragma once

#include <cstdint>
#include <type_traits>

#include "causal_conv1d.h"

#if defined(__CUDACC__)
#define SATN_TILE __device__ __forceinline__
#else
#define SATN_TILE inline
#endif

namespace satn {
namespace tiles {

constexpr int kThreads = 256;  // 8 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kRowBytes = 64;  // bytes of one staged row of reduction channels

// Convolution block: BT time steps x BO output channels; warps 2 (time) x 4 (channels),
// each 32 x 32 = 2 x 2 fragments.
constexpr int kConvBT = 64;
constexpr int kConvBO = 128;
constexpr int kEpiPad = 4;  // epilogue tile row padding (keeps 16-byte alignment)

// grad_w block: 64 output x 64 input channels, all taps of a group, 16 time steps per
// stage; warps 2 (out) x 4 (in), each 32 x 16 = 2 fragments per tap.
constexpr int kGwBO = 64;
constexpr int kGwBC = 64;
constexpr int kGwBT = 16;

SATN_HD int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row spacing of consecutive taps in a staged window. With d below the tile length
// the taps' windows overlap and share rows (spacing d); with longer dilations each tap
// gets its own bt rows (spacing bt), so shared memory never grows with d.
SATN_HD int tap_row_step(int d, int bt) { return d < bt ? d : bt; }

// Rows staged for n taps of a tile of bt steps.
SATN_HD int window_rows(int ntaps, int step, int bt) { return bt + (ntaps - 1) * step; }

// Time, relative to the tile start plus the offset of the group's first tap, of
// staged row r: row jj*step + i holds what tap jj reads for tile row i.
SATN_HD int64_t staged_time(int r, int step, int d) {
  return static_cast<int64_t>(r / step) * d + r % step;
}

// Time offset of tap j: causal (forward, grad_w) looks back, anti-causal (grad_x) ahead.
SATN_HD int64_t tap_offset(int j, int K, int d, bool causal) {
  return causal ? -static_cast<int64_t>(K - 1 - j) * d : static_cast<int64_t>(j) * d;
}

// Cooperative staging order: groups of 8 consecutive rows (times, contiguous in global
// memory) per channel, so 8 neighbouring threads read one 32-byte sector.
SATN_HD void staging_coords(int e, int cols, int& r, int& col) {
  const int rest = e >> 3;
  col = rest % cols;
  r = (rest / cols) * 8 + (e & 7);
}

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// Writes n <= 4 consecutive outputs; one vector store when the run is whole and aligned.
template <typename T, typename acc_t>
SATN_TILE void store_run(T* dst, const acc_t* v, int n, bool vector) {
  if (vector) {
    Vec4<T> p;
#pragma unroll
    for (int i = 0; i < 4; ++i) p.v[i] = static_cast<T>(v[i]);
    *reinterpret_cast<Vec4<T>*>(dst) = p;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (i < n) dst[i] = static_cast<T>(v[i]);
  }
}

// ------------------------------------------------------------------ convolution
// out[b,p,t] = act(bias[p] + sum_{q,j} W(p,q,j) in[b,q,t + off_j])
//   forward: p = o, q = c, in = x, W = w[o][c][j]
//   grad_x:  p = c, q = o, in = grad_y masked by ReLU'(y), W = w[q][p][K-1-j]
template <typename scalar_t>
struct ConvArgs {
  const scalar_t* in;     // (B, Q, T)
  const scalar_t* ymask;  // (B, Q, T): saved y whose ReLU mask applies to in, or null
  const scalar_t* w;      // (O, C, K) as stored
  const scalar_t* bias;   // (P,) or null
  scalar_t* out;          // (B, P, T)
  int64_t B, P, Q, T;
  int K, d;
  bool causal, relu;
  int step, nbuf;  // tap_row_step(d, kConvBT); shared-memory stages (1 or 2)
};

// ConvArgs of one call, from the tensors (at::Tensor on both back ends; host code only, so this
// header needs no ATen). ymask and bias may be undefined; nbuf is left to the back end.
template <typename scalar_t, typename Tensor>
ConvArgs<scalar_t> conv_args(const Tensor& in, const Tensor& ymask, const Tensor& w, const Tensor& bias,
                             Tensor& out, int64_t d, bool causal, bool relu) {
  ConvArgs<scalar_t> a;
  a.in = in.template data_ptr<scalar_t>();
  a.ymask = ymask.defined() ? ymask.template data_ptr<scalar_t>() : nullptr;
  a.w = w.template data_ptr<scalar_t>();
  a.bias = bias.defined() ? bias.template data_ptr<scalar_t>() : nullptr;
  a.out = out.template data_ptr<scalar_t>();
  a.B = in.size(0), a.Q = in.size(1), a.T = in.size(2), a.P = out.size(1);
  a.K = static_cast<int>(w.size(2)), a.d = static_cast<int>(d);
  a.causal = causal, a.relu = relu;
  a.step = tap_row_step(a.d, kConvBT), a.nbuf = 1;
  return a;
}

template <typename Fr>
struct ConvShape {
  using elem_t = typename Fr::elem_t;
  static constexpr int kChunk = kRowBytes / static_cast<int>(sizeof(elem_t));  // channels per stage
  static_assert(kChunk % Fr::K == 0, "a stage holds whole fragments");
};

// Shared memory of one convolution block, in bytes.
template <typename Fr, int KT>
SATN_HD int64_t conv_smem_bytes(int step, int nbuf) {
  using elem_t = typename Fr::elem_t;
  using acc_t = typename Fr::acc_t;
  const int64_t stage = (window_rows(KT, step, kConvBT) + static_cast<int64_t>(KT) * kConvBO) *
                        ConvShape<Fr>::kChunk * static_cast<int64_t>(sizeof(elem_t));
  const int64_t epilogue = static_cast<int64_t>(kConvBO) * (kConvBT + kEpiPad) * sizeof(acc_t);
  return nbuf * stage > epilogue ? nbuf * stage : epilogue;
}

// Stage s of a block: channel chunk s / ngroups, tap group s % ngroups.
template <typename Fr, int KT, typename Ctx>
SATN_TILE void conv_stage(Ctx& ctx, const ConvArgs<typename Fr::elem_t>& a, int64_t b,
                          int64_t t0, int64_t p0, int s, int ngroups,
                          typename Fr::elem_t* xs, typename Fr::elem_t* ws) {
  using elem_t = typename Fr::elem_t;
  constexpr int Cc = ConvShape<Fr>::kChunk;
  const int64_t q0 = static_cast<int64_t>(s / ngroups) * Cc;
  const int j0 = (s % ngroups) * KT;
  const int ntaps = a.K - j0 < KT ? a.K - j0 : KT;
  const int rows = window_rows(ntaps, a.step, kConvBT);
  const int64_t base = t0 + tap_offset(j0, a.K, a.d, a.causal);

  const int n_in = static_cast<int>(div_up(rows, 8)) * 8 * Cc;
  for (int e = ctx.tid; e < n_in; e += ctx.nthreads) {
    int r, cc;
    staging_coords(e, Cc, r, cc);
    if (r >= rows) continue;
    const int64_t q = q0 + cc;
    const int64_t t = base + staged_time(r, a.step, a.d);
    const bool inside = q < a.Q && time_in_range(t, a.T);
    const int64_t at = inside ? offset3(b, q, t, a.Q, a.T) : 0;
    elem_t* dst = xs + r * Cc + cc;
    if (a.ymask != nullptr)
      ctx.put(dst, inside ? relu_masked_grad(a.in[at], a.ymask[at]) : elem_t(0.0f));
    else
      ctx.copy(dst, inside ? a.in + at : nullptr);
  }
  const int n_w = ntaps * kConvBO * Cc;
  for (int e = ctx.tid; e < n_w; e += ctx.nthreads) {
    const int cc = e % Cc;
    const int pp = (e / Cc) % kConvBO;
    const int jj = e / (Cc * kConvBO);
    const int64_t p = p0 + pp, q = q0 + cc;
    const int j = j0 + jj;
    const elem_t* src = nullptr;
    if (p < a.P && q < a.Q)
      src = a.w + (a.causal ? offset3(p, q, j, a.Q, a.K) : offset3(q, p, a.K - 1 - j, a.P, a.K));
    ctx.copy(ws + e, src);  // ws[jj][pp][cc]
  }
}

template <typename Fr, int KT, typename Ctx>
SATN_TILE void conv_block(Ctx& ctx, const ConvArgs<typename Fr::elem_t>& a, int64_t b,
                          int64_t t0, int64_t p0, unsigned char* smem) {
  using elem_t = typename Fr::elem_t;
  using acc_t = typename Fr::acc_t;
  constexpr int Cc = ConvShape<Fr>::kChunk;
  constexpr int kM = kConvBT / 2 / 16, kN = kConvBO / 4 / 16;  // fragments per warp: 2 x 2
  const int ngroups = static_cast<int>(div_up(a.K, KT));
  const int nstages = static_cast<int>(div_up(a.Q, Cc)) * ngroups;
  const int x_elems = window_rows(KT, a.step, kConvBT) * Cc;
  const int stage_elems = x_elems + KT * kConvBO * Cc;
  elem_t* buf = reinterpret_cast<elem_t*>(smem);

  typename Fr::C acc[Ctx::kSlots][kM][kN];
#pragma unroll
  for (int sl = 0; sl < Ctx::kSlots; ++sl)
#pragma unroll
    for (int mi = 0; mi < kM; ++mi)
#pragma unroll
      for (int ni = 0; ni < kN; ++ni) Fr::zero(acc[sl][mi][ni]);

  conv_stage<Fr, KT>(ctx, a, b, t0, p0, 0, ngroups, buf, buf + x_elems);
  ctx.commit();
  for (int s = 0; s < nstages; ++s) {
    const bool prefetch = a.nbuf == 2 && s + 1 < nstages;
    if (prefetch) {
      elem_t* nb = buf + ((s + 1) & 1) * stage_elems;
      conv_stage<Fr, KT>(ctx, a, b, t0, p0, s + 1, ngroups, nb, nb + x_elems);
      ctx.commit();
      ctx.wait_but_one();
    } else {
      ctx.wait_all();
    }
    ctx.sync();
    const elem_t* xs = buf + (a.nbuf == 2 ? (s & 1) * stage_elems : 0);
    const elem_t* ws = xs + x_elems;
    const int j0 = (s % ngroups) * KT;
    const int ntaps = a.K - j0 < KT ? a.K - j0 : KT;
#pragma unroll
    for (int sl = 0; sl < Ctx::kSlots; ++sl) {
      const int warp = ctx.warp + sl * ctx.nwarps;
      const int wm = warp % 2, wn = warp / 2;
      if (p0 + wn * (kN * 16) >= a.P) continue;  // no output channel in this warp's tile
#pragma unroll
      for (int kk = 0; kk < Cc; kk += Fr::K) {
#pragma unroll
        for (int jj = 0; jj < KT; ++jj) {
          if (jj >= ntaps) continue;
          typename Fr::A fa[kM];
#pragma unroll
          for (int mi = 0; mi < kM; ++mi)
            Fr::load_a(fa[mi], xs + (wm * kM * 16 + mi * 16 + jj * a.step) * Cc + kk, Cc);
#pragma unroll
          for (int ni = 0; ni < kN; ++ni) {
            typename Fr::BCol fb;
            Fr::load_b(fb, ws + (jj * kConvBO + wn * kN * 16 + ni * 16) * Cc + kk, Cc);
#pragma unroll
            for (int mi = 0; mi < kM; ++mi) Fr::mma(acc[sl][mi][ni], fa[mi], fb);
          }
        }
      }
    }
    ctx.sync();
    if (a.nbuf == 1 && s + 1 < nstages) {
      conv_stage<Fr, KT>(ctx, a, b, t0, p0, s + 1, ngroups, buf, buf + x_elems);
      ctx.commit();
    }
  }

  // Epilogue: accumulators -> shared [channel][time] -> bias, ReLU, convert, store.
  ctx.wait_all();  // (nothing in flight unless there was no stage at all)
  ctx.sync();
  constexpr int ld = kConvBT + kEpiPad;
  acc_t* out_s = reinterpret_cast<acc_t*>(smem);
#pragma unroll
  for (int sl = 0; sl < Ctx::kSlots; ++sl) {
    const int warp = ctx.warp + sl * ctx.nwarps;
    const int wm = warp % 2, wn = warp / 2;
    if (p0 + wn * (kN * 16) >= a.P) continue;
#pragma unroll
    for (int mi = 0; mi < kM; ++mi)
#pragma unroll
      for (int ni = 0; ni < kN; ++ni)
        Fr::store_col(out_s + (wn * kN * 16 + ni * 16) * ld + wm * kM * 16 + mi * 16,
                      acc[sl][mi][ni], ld);
  }
  ctx.sync();
  constexpr int kRuns = kConvBT / 4;
  for (int e = ctx.tid; e < kConvBO * kRuns; e += ctx.nthreads) {
    const int pp = e / kRuns, i = (e % kRuns) * 4;
    const int64_t p = p0 + pp, t = t0 + i;
    if (p >= a.P || t >= a.T) continue;
    const acc_t bv = a.bias != nullptr ? static_cast<acc_t>(a.bias[p]) : acc_t(0);
    acc_t v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = activate(out_s[pp * ld + i + u] + bv, a.relu);
    const int64_t at = offset3(b, p, t, a.P, a.T);
    const int n = a.T - t < 4 ? static_cast<int>(a.T - t) : 4;
    store_run(a.out + at, v, n, n == 4 && at % 4 == 0);
  }
}

// ------------------------------------------------------------------ grad_w
// Block (split, o tile, c tile x tap group) adds up its share of the (batch, time-tile)
// items: partial_w[split][k][o][c] (padded to whole tiles) and, for the blocks of the
// first c tile and tap group, partial_b[split][o]. The ReLU mask is applied while g is
// staged; every padded element is written once, so nothing is zero-filled.
template <typename scalar_t, typename acc_t>
struct GradWArgs {
  const scalar_t* g;      // (B, O, T) grad_y
  const scalar_t* ymask;  // (B, O, T) saved y (ReLU) or null
  const scalar_t* x;      // (B, C, T)
  acc_t* partial_w;       // (splits, K, O_pad, C_pad)
  acc_t* partial_b;       // (splits, O_pad) or null
  int64_t B, O, C, T, O_pad, C_pad;
  int K, d, step, nbuf, splits;
  int64_t items;  // B * ceil(T / kGwBT)
};

template <typename Fr, int KT>
SATN_HD int64_t grad_w_smem_bytes(int step, int nbuf) {
  using elem_t = typename Fr::elem_t;
  using acc_t = typename Fr::acc_t;
  const int64_t stage = (static_cast<int64_t>(kGwBO) * kGwBT +
                         static_cast<int64_t>(window_rows(KT, step, kGwBT)) * kGwBC) *
                        static_cast<int64_t>(sizeof(elem_t));
  return nbuf * stage + kGwBO * static_cast<int64_t>(sizeof(acc_t));
}

template <typename Fr, int KT, typename Ctx>
SATN_TILE void grad_w_stage(Ctx& ctx, const GradWArgs<typename Fr::elem_t, typename Fr::acc_t>& a,
                            int64_t item, int64_t o0, int64_t c0, int j0, int ntaps,
                            typename Fr::elem_t* gs, typename Fr::elem_t* xs) {
  using elem_t = typename Fr::elem_t;
  const int64_t ttiles = div_up(a.T, kGwBT);
  const int64_t b = item / ttiles, t0 = (item % ttiles) * kGwBT;
  for (int e = ctx.tid; e < kGwBO * kGwBT; e += ctx.nthreads) {  // gs[o][t]
    const int oo = e / kGwBT, i = e % kGwBT;
    const int64_t o = o0 + oo, t = t0 + i;
    const bool inside = o < a.O && t < a.T;
    const int64_t at = inside ? offset3(b, o, t, a.O, a.T) : 0;
    if (a.ymask != nullptr)
      ctx.put(gs + e, inside ? relu_masked_grad(a.g[at], a.ymask[at]) : elem_t(0.0f));
    else
      ctx.copy(gs + e, inside ? a.g + at : nullptr);
  }
  const int rows = window_rows(ntaps, a.step, kGwBT);
  const int64_t base = t0 + tap_offset(j0, a.K, a.d, true);
  const int n_x = static_cast<int>(div_up(rows, 8)) * 8 * kGwBC;
  for (int e = ctx.tid; e < n_x; e += ctx.nthreads) {  // xs[row][c]
    int r, cc;
    staging_coords(e, kGwBC, r, cc);
    if (r >= rows) continue;
    const int64_t c = c0 + cc, t = base + staged_time(r, a.step, a.d);
    const bool inside = c < a.C && time_in_range(t, a.T);
    ctx.copy(xs + r * kGwBC + cc, inside ? a.x + offset3(b, c, t, a.C, a.T) : nullptr);
  }
}

template <typename Fr, int KT, typename Ctx>
SATN_TILE void grad_w_block(Ctx& ctx, const GradWArgs<typename Fr::elem_t, typename Fr::acc_t>& a,
                            int split, int64_t o0, int64_t c0, int group, unsigned char* smem) {
  using elem_t = typename Fr::elem_t;
  using acc_t = typename Fr::acc_t;
  constexpr int kM = 2;  // 2 fragments of 16 output channels per warp, 16 input channels
  const int j0 = group * KT;
  const int ntaps = a.K - j0 < KT ? a.K - j0 : KT;
  const bool with_bias = a.partial_b != nullptr && c0 == 0 && group == 0;
  const int64_t first = a.items * split / a.splits, last = a.items * (split + 1) / a.splits;
  const int g_elems = kGwBO * kGwBT;
  const int stage_elems = g_elems + window_rows(KT, a.step, kGwBT) * kGwBC;
  elem_t* buf = reinterpret_cast<elem_t*>(smem);
  acc_t* bias_s = reinterpret_cast<acc_t*>(smem + static_cast<int64_t>(a.nbuf) * stage_elems * sizeof(elem_t));
  for (int o = ctx.tid; o < kGwBO; o += ctx.nthreads) bias_s[o] = acc_t(0);

  typename Fr::C acc[Ctx::kSlots][KT][kM];
#pragma unroll
  for (int sl = 0; sl < Ctx::kSlots; ++sl)
#pragma unroll
    for (int jj = 0; jj < KT; ++jj)
#pragma unroll
      for (int mi = 0; mi < kM; ++mi) Fr::zero(acc[sl][jj][mi]);

  if (first < last) {
    grad_w_stage<Fr, KT>(ctx, a, first, o0, c0, j0, ntaps, buf, buf + g_elems);
    ctx.commit();
  }
  for (int64_t it = first; it < last; ++it) {
    const int s = static_cast<int>(it - first);
    const bool prefetch = a.nbuf == 2 && it + 1 < last;
    if (prefetch) {
      elem_t* nb = buf + ((s + 1) & 1) * stage_elems;
      grad_w_stage<Fr, KT>(ctx, a, it + 1, o0, c0, j0, ntaps, nb, nb + g_elems);
      ctx.commit();
      ctx.wait_but_one();
    } else {
      ctx.wait_all();
    }
    ctx.sync();
    const elem_t* gs = buf + (a.nbuf == 2 ? (s & 1) * stage_elems : 0);
    const elem_t* xs = gs + g_elems;
    if (with_bias)  // each output channel is summed by one thread, in time order
      for (int o = ctx.tid; o < kGwBO; o += ctx.nthreads) {
        acc_t sum = bias_s[o];
        for (int i = 0; i < kGwBT; ++i) sum += static_cast<acc_t>(gs[o * kGwBT + i]);
        bias_s[o] = sum;
      }
#pragma unroll
    for (int sl = 0; sl < Ctx::kSlots; ++sl) {
      const int warp = ctx.warp + sl * ctx.nwarps;
      const int wo = warp % 2, wc = warp / 2;
#pragma unroll
      for (int kk = 0; kk < kGwBT; kk += Fr::K) {
        typename Fr::A fa[kM];
#pragma unroll
        for (int mi = 0; mi < kM; ++mi)
          Fr::load_a(fa[mi], gs + (wo * kM * 16 + mi * 16) * kGwBT + kk, kGwBT);
#pragma unroll
        for (int jj = 0; jj < KT; ++jj) {
          if (jj >= ntaps) continue;
          typename Fr::BRow fb;
          Fr::load_b(fb, xs + (kk + jj * a.step) * kGwBC + wc * 16, kGwBC);
#pragma unroll
          for (int mi = 0; mi < kM; ++mi) Fr::mma(acc[sl][jj][mi], fa[mi], fb);
        }
      }
    }
    ctx.sync();
    if (a.nbuf == 1 && it + 1 < last) {
      grad_w_stage<Fr, KT>(ctx, a, it + 1, o0, c0, j0, ntaps, buf, buf + g_elems);
      ctx.commit();
    }
  }

#pragma unroll
  for (int sl = 0; sl < Ctx::kSlots; ++sl) {
    const int warp = ctx.warp + sl * ctx.nwarps;
    const int wo = warp % 2, wc = warp / 2;
#pragma unroll
    for (int jj = 0; jj < KT; ++jj) {
      if (jj >= ntaps) continue;
#pragma unroll
      for (int mi = 0; mi < kM; ++mi)
        Fr::store_row(a.partial_w + ((static_cast<int64_t>(split) * a.K + j0 + jj) * a.O_pad + o0 +
                                     wo * kM * 16 + mi * 16) * a.C_pad + c0 + wc * 16,
                      acc[sl][jj][mi], static_cast<int>(a.C_pad));
    }
  }
  if (with_bias)
    for (int o = ctx.tid; o < kGwBO; o += ctx.nthreads)
      a.partial_b[static_cast<int64_t>(split) * a.O_pad + o0 + o] = bias_s[o];
}

// The second level of the grad_w reduction: partial sums added in split order
// (deterministic, no atomics); element i of grad_w (O, C, K) or of grad_bias (O,).
template <typename scalar_t, typename acc_t>
SATN_HD scalar_t reduce_grad_w(const acc_t* partial_w, int64_t i, int splits, int64_t O, int64_t C,
                               int K, int64_t O_pad, int64_t C_pad) {
  const int64_t k = i % K, c = (i / K) % C, o = i / (K * C);
  acc_t sum = acc_t(0);
  for (int s = 0; s < splits; ++s) sum += partial_w[((static_cast<int64_t>(s) * K + k) * O_pad + o) * C_pad + c];
  return static_cast<scalar_t>(sum);
}

template <typename scalar_t, typename acc_t>
SATN_HD scalar_t reduce_grad_b(const acc_t* partial_b, int64_t o, int splits, int64_t O_pad) {
  acc_t sum = acc_t(0);
  for (int s = 0; s < splits; ++s) sum += partial_b[static_cast<int64_t>(s) * O_pad + o];
  return static_cast<scalar_t>(sum);
}

// Taps per block on the host side of both builds: K itself for K = 1..5, else groups of 4.
template <typename F>
void with_taps(int K, F&& f) {
  switch (K) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

}  // namespace tiles
}  // namespace satn
