// Native CPU log-probs of a linear head: log softmax(hidden @ weight^T)[target].
//
// Same contract as caldpo/kernels/chunked.py on compacted inputs (no ignored
// targets). The logits are tiled into [rows, cols] blocks (rows over tokens,
// cols over the vocabulary); each block is one BLAS GEMM into a reused fp32
// buffer followed by ONE fused OpenMP pass over the block:
//   forward:  block max, sum exp(x - max) and the target logit per row, merged
//             across vocabulary blocks as an online logsumexp (in double);
//   backward: d = exp(x - lse) * (-g), plus g at the target column (the full
//             d = g * (onehot - softmax)), then grad_hidden += d @ W_block and
//             grad_weight[block] (+)= d^T @ hidden_rows, both GEMMs.
// Inputs of any floating dtype are upcast to fp32 (the weight one block at a
// time); accumulation is fp32 in partials of 64 columns, summed in double (the running
// logsumexp in double).
//
// Output heads beyond hidden @ weight^T (caldpo/kernels/head.py): each block's raw
// logits z become l = softcap(scale * (z + bias)) in the same row pass, with
// softcap(y) = cap * tanh(y / cap) when cap > 0; backward multiplies the logit
// gradient by dl/dz = scale * (1 - (l / cap)^2) and sums d's columns into grad_bias.
// Uses only the stable ATen API (at::mm_out / at::addmm_out / narrow / copy_).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Row kernels are compiled for several ISAs and picked at load time (ifunc), so
// the cached binary stays valid on any x86-64 CPU while using AVX2/AVX-512 when
// present. Clones are keyed on ISA features, not on "arch=" CPU models (those
// match only that exact CPU family and send newer CPUs to the slow baseline
// clone, about 10x slower here). Elsewhere: compiled once for the baseline ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CALDPO_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CALDPO_CLONES
#endif

// Helpers are force-inlined: the ISA clones below only vectorise loops whose body is fully inlined.
#define CALDPO_INLINE inline __attribute__((always_inline))

CALDPO_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

CALDPO_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// exp(x) in fp32 (Cephes expf polynomial, ~1 ulp) written so that the compiler
// vectorises it inside `omp simd` loops (libm expf does not vectorise without
// -ffast-math, which would also break NaN handling). NaN in -> NaN out; results
// below the smallest normal float flush to 0.
CALDPO_INLINE float exp_f32(float x) {
  const float lo = -87.0f, hi = 88.0f;
  const bool tiny = x < lo;
  x = x < lo ? lo : x;  // comparisons written so that NaN passes through
  x = x > hi ? hi : x;
  // Round x*log2(e) to an integer n with the 1.5*2^23 trick; n sits in the low mantissa bits.
  const float magic = 12582912.0f;
  const float t = x * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n from the integer in t's mantissa (integer ops only: defined for any t).
  const uint32_t scale = (float_to_bits(t) - float_to_bits(magic) + 127u) << 23;
  const float y = p * bits_to_float(scale);
  return tiny ? 0.0f : y;
}

// Columns per fp32 partial sum of exp(x - max). One fp32 accumulator over a whole vocabulary row
// loses every term below half its ulp, always downwards: on a real model's head (V = 49152, one
// accumulator) the logsumexp came out about 1e-4 low, 1e-4 nats per token. Partials of 64 terms
// added in double bound that bias by 64 half-ulps of a partial (about 4e-6 relative at worst).
constexpr int64_t kSumCols = 64;

// Forward row pass: max of x[0:n] and sum of exp(x - max) (fp32 partials, summed in double).
CALDPO_CLONES void row_max_sumexp(const float* x, int64_t n, float* out_max, double* out_sum) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  double s = 0.0;
  for (int64_t j0 = 0; j0 < n; j0 += kSumCols) {
    const int64_t j1 = std::min(n, j0 + kSumCols);
    float p = 0.0f;
#pragma omp simd reduction(+ : p)
    for (int64_t j = j0; j < j1; ++j) p += exp_f32(x[j] - m);
    s += p;
  }
  *out_max = m;
  *out_sum = s;
}

// Backward row pass, in place: x <- exp(x - shift) * scale.
CALDPO_CLONES void row_scaled_softmax(float* x, int64_t n, float shift, float scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] = exp_f32(x[j] - shift) * scale;
}

// Head transform in place: x <- softcap(scale * (x + b)); b may be null, cap <= 0 means no cap.
CALDPO_CLONES void row_head(float* x, int64_t n, const float* b, float scale, float cap) {
  if (b != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] = (x[j] + b[j]) * scale;
  } else if (scale != 1.0f) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] *= scale;
  }
  if (cap > 0.0f)
    for (int64_t j = 0; j < n; ++j) x[j] = cap * std::tanh(x[j] / cap);
}

// Backward row pass over head logits l, in place: x <- -g * exp(l - shift) * scale * (1 - (l/cap)^2)
// (the factor (1 - (l/cap)^2) only when cap > 0); the onehot term is added by the caller.
CALDPO_CLONES void row_head_softmax_grad(float* x, int64_t n, float shift, float g, float scale, float cap) {
  const float a = -g * scale;
  if (cap > 0.0f) {
    const float inv = 1.0f / cap;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float t = x[j] * inv;
      x[j] = exp_f32(x[j] - shift) * a * (1.0f - t * t);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] = exp_f32(x[j] - shift) * a;
  }
}

// The head: optional bias (fp32 contiguous, or undefined), scale, cap (<= 0: none).
struct Head {
  at::Tensor bias;
  float scale = 1.0f, cap = 0.0f;
  bool plain() const { return !bias.defined() && scale == 1.0f && cap <= 0.0f; }
  const float* bias_at(int64_t c0) const { return bias.defined() ? bias.data_ptr<float>() + c0 : nullptr; }
};

Head make_head(const c10::optional<at::Tensor>& bias, int64_t v, double scale, double softcap) {
  Head hd;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == v, "caldpo_native: bias must be [V]");
    hd.bias = bias->to(at::kFloat).contiguous();
  }
  hd.scale = float(scale);
  hd.cap = softcap > 0.0 ? float(softcap) : 0.0f;
  return hd;
}

// Bytes of fp32 logits per block and the narrowest vocabulary block (GEMM width), when the
// caller passes 0 for them (caldpo/kernels/options.py passes its KernelOptions values).
constexpr int64_t kDefaultChunkBytes = int64_t(16) << 20;
constexpr int64_t kMinCols = 256;
// Most token rows per block: bounds the block when there are many tokens.
constexpr int64_t kMaxRows = 4096;

struct Tiling {
  int64_t rows, cols;
};

Tiling tiling(int64_t m, int64_t v, int64_t chunk_bytes, int64_t min_cols) {
  const int64_t budget = chunk_bytes > 0 ? chunk_bytes : kDefaultChunkBytes;
  const int64_t narrowest = min_cols > 0 ? min_cols : kMinCols;
  const int64_t rows = std::max<int64_t>(1, std::min(m, kMaxRows));
  const int64_t cols = std::max<int64_t>(1, std::min(v, std::max(narrowest, budget / (4 * rows))));
  return {rows, cols};
}

// Parallelise a row loop only when the block is big enough to pay for the fork.
inline bool worth_threads(int64_t rows, int64_t cols) { return rows > 1 && rows * cols >= 32768; }

// A contiguous [rows, cols] view on the front of `buf` (ragged blocks stay contiguous).
at::Tensor front(const at::Tensor& buf, int64_t rows, int64_t cols) {
  return buf.narrow(0, 0, rows * cols).view({rows, cols});
}

// fp32 weight rows [s, s+n): a view when already fp32, else cast into `wbuf`.
at::Tensor weight_rows(const at::Tensor& w, int64_t s, int64_t n, const at::Tensor& wbuf) {
  if (!wbuf.defined()) return w.narrow(0, s, n);
  at::Tensor out = front(wbuf, n, w.size(1));
  out.copy_(w.narrow(0, s, n));
  return out;
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "caldpo_native: CPU tensors only");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "caldpo_native: expected hidden [M,H] and weight [V,H]");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0),
              "caldpo_native: targets must be [M]");
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()) && at::isFloatingType(weight.scalar_type()),
              "caldpo_native: floating-point hidden and weight expected");
}

std::vector<at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& weight,
                                const at::Tensor& targets, int64_t chunk_bytes,
                                const c10::optional<at::Tensor>& bias, double scale, double softcap,
                                int64_t min_cols) {
  check_inputs(hidden, weight, targets);
  torch::NoGradGuard no_grad;  // out= GEMMs refuse inputs that require grad
  const int64_t m = hidden.size(0), v = weight.size(0), hd = hidden.size(1);
  const Head head = make_head(bias, v, scale, softcap);
  const bool plain = head.plain();
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({m}, f32), lse = at::empty({m}, f32);
  if (m == 0) return {logp, lse};
  TORCH_CHECK(v > 0, "caldpo_native: empty vocabulary");

  const at::Tensor h = hidden.to(at::kFloat).contiguous();
  const at::Tensor w = weight.scalar_type() == at::kFloat ? weight.contiguous() : weight;
  const at::Tensor tg = targets.to(at::kLong).contiguous();
  const int64_t* tp = tg.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < v, "caldpo_native: target ", tp[i], " out of range [0, ", v, ")");

  const Tiling tl = tiling(m, v, chunk_bytes, min_cols);
  at::Tensor buf = at::empty({tl.rows * tl.cols}, f32);
  at::Tensor wbuf;
  if (w.scalar_type() != at::kFloat) wbuf = at::empty({tl.cols * hd}, f32);
  // Running per-token state across vocabulary blocks, in double.
  std::vector<double> run_max(m, -std::numeric_limits<double>::infinity()), run_sum(m, 0.0);
  std::vector<float> tgt_logit(m, 0.0f);
  const int nthreads = at::get_num_threads();

  for (int64_t r0 = 0; r0 < m; r0 += tl.rows) {
    const int64_t nr = std::min(tl.rows, m - r0);
    const at::Tensor hr = h.narrow(0, r0, nr);
    for (int64_t c0 = 0; c0 < v; c0 += tl.cols) {
      const int64_t nc = std::min(tl.cols, v - c0);
      at::Tensor blk = front(buf, nr, nc);
      at::mm_out(blk, hr, weight_rows(w, c0, nc, wbuf).t());
      float* bp = blk.data_ptr<float>();
#pragma omp parallel for num_threads(nthreads) schedule(static) if (worth_threads(nr, nc))
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t row = r0 + i;
        float* x = bp + i * nc;
        if (!plain) row_head(x, nc, head.bias_at(c0), head.scale, head.cap);
        float bm;
        double bs;
        row_max_sumexp(x, nc, &bm, &bs);
        const int64_t t = tp[row] - c0;
        if (t >= 0 && t < nc) tgt_logit[row] = x[t];
        // Online logsumexp merge; NaN propagates through either branch.
        const double om = run_max[row], nm = bm;
        if (nm > om) {
          run_sum[row] = run_sum[row] * std::exp(om - nm) + bs;
          run_max[row] = nm;
        } else {
          run_sum[row] += bs * std::exp(nm - om);
        }
      }
    }
  }
  float* lp = logp.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) {
    const double l = run_max[i] + std::log(run_sum[i]);
    lsep[i] = float(l);
    lp[i] = float(double(tgt_logit[i]) - l);
  }
  return {logp, lse};
}

// Gradients of sum(grad * logp) w.r.t. hidden [M,H] and weight [V,H], both fp32;
// an unneeded one comes back as an empty tensor.
std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& hidden,
                                 const at::Tensor& weight, const at::Tensor& targets,
                                 const at::Tensor& lse, bool need_hidden, bool need_weight,
                                 int64_t chunk_bytes, const c10::optional<at::Tensor>& bias,
                                 double scale, double softcap, bool need_bias, int64_t min_cols) {
  check_inputs(hidden, weight, targets);
  torch::NoGradGuard no_grad;
  const int64_t m = hidden.size(0), v = weight.size(0), hd = hidden.size(1);
  TORCH_CHECK(grad.numel() == m && lse.numel() == m, "caldpo_native: grad and lse must be [M]");
  const Head head = make_head(bias, v, scale, softcap);
  const bool plain = head.plain();
  need_bias = need_bias && head.bias.defined();
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor grad_h = need_hidden ? at::empty({m, hd}, f32) : at::empty({0}, f32);
  at::Tensor grad_w = need_weight ? at::empty({v, hd}, f32) : at::empty({0}, f32);
  at::Tensor grad_b = need_bias ? at::zeros({v}, f32) : at::empty({0}, f32);
  if (m == 0 || !(need_hidden || need_weight || need_bias)) {
    if (need_hidden) grad_h.zero_();
    if (need_weight) grad_w.zero_();
    return {grad_h, grad_w, grad_b};
  }
  TORCH_CHECK(v > 0, "caldpo_native: empty vocabulary");

  const at::Tensor h = hidden.to(at::kFloat).contiguous();
  const at::Tensor w = weight.scalar_type() == at::kFloat ? weight.contiguous() : weight;
  const at::Tensor tg = targets.to(at::kLong).contiguous();
  const at::Tensor g = grad.to(at::kFloat).contiguous().view({m});
  const at::Tensor ls = lse.to(at::kFloat).contiguous().view({m});
  const int64_t* tp = tg.data_ptr<int64_t>();
  const float* gp = g.data_ptr<float>();
  const float* lp = ls.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < v, "caldpo_native: target ", tp[i], " out of range [0, ", v, ")");

  const Tiling tl = tiling(m, v, chunk_bytes, min_cols);
  at::Tensor buf = at::empty({tl.rows * tl.cols}, f32);
  at::Tensor wbuf;
  if (w.scalar_type() != at::kFloat) wbuf = at::empty({tl.cols * hd}, f32);
  const int nthreads = at::get_num_threads();

  for (int64_t r0 = 0; r0 < m; r0 += tl.rows) {
    const int64_t nr = std::min(tl.rows, m - r0);
    const at::Tensor hr = h.narrow(0, r0, nr);
    at::Tensor ghr = need_hidden ? grad_h.narrow(0, r0, nr) : at::Tensor();
    for (int64_t c0 = 0; c0 < v; c0 += tl.cols) {
      const int64_t nc = std::min(tl.cols, v - c0);
      const at::Tensor wc = weight_rows(w, c0, nc, wbuf);
      at::Tensor blk = front(buf, nr, nc);
      at::mm_out(blk, hr, wc.t());
      float* bp = blk.data_ptr<float>();
#pragma omp parallel for num_threads(nthreads) schedule(static) if (worth_threads(nr, nc))
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t row = r0 + i;
        float* x = bp + i * nc;
        const int64_t t = tp[row] - c0;
        if (plain) {
          row_scaled_softmax(x, nc, lp[row], -gp[row]);
          if (t >= 0 && t < nc) x[t] += gp[row];
        } else {
          row_head(x, nc, head.bias_at(c0), head.scale, head.cap);
          // The target's onehot term, scaled by dl/dz at the target: read l before the pass overwrites it.
          float onehot = 0.0f;
          if (t >= 0 && t < nc) {
            const float u = head.cap > 0.0f ? x[t] / head.cap : 0.0f;
            onehot = gp[row] * head.scale * (1.0f - u * u);
          }
          row_head_softmax_grad(x, nc, lp[row], gp[row], head.scale, head.cap);
          if (t >= 0 && t < nc) x[t] += onehot;
        }
      }
      if (need_bias) {
        at::Tensor gbc = grad_b.narrow(0, c0, nc);
        gbc.add_(blk.sum(0));
      }
      if (need_hidden) {
        // First vocabulary block writes, later ones accumulate (beta = 1).
        if (c0 == 0) at::mm_out(ghr, blk, wc);
        else at::addmm_out(ghr, ghr, blk, wc);
      }
      if (need_weight) {
        at::Tensor gwc = grad_w.narrow(0, c0, nc);
        if (r0 == 0) at::mm_out(gwc, blk.t(), hr);
        else at::addmm_out(gwc, gwc, blk.t(), hr);
      }
    }
  }
  return {grad_h, grad_w, grad_b};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "caldpo native CPU log-probs of a linear head (chunked GEMM + fused row passes)";
  mod.def("forward", &forward, "(logp [M] fp32, lse [M] fp32)", py::arg("hidden"), py::arg("weight"),
          py::arg("targets"), py::arg("chunk_bytes") = 0, py::arg("bias") = py::none(),
          py::arg("scale") = 1.0, py::arg("softcap") = 0.0, py::arg("min_cols") = 0);
  mod.def("backward", &backward, "(grad_hidden [M,H] fp32, grad_weight [V,H] fp32, grad_bias [V] fp32)",
          py::arg("grad"), py::arg("hidden"), py::arg("weight"), py::arg("targets"), py::arg("lse"),
          py::arg("need_hidden"), py::arg("need_weight"), py::arg("chunk_bytes") = 0,
          py::arg("bias") = py::none(), py::arg("scale") = 1.0, py::arg("softcap") = 0.0,
          py::arg("need_bias") = false, py::arg("min_cols") = 0);
}
