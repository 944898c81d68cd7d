// Token log-probs and entropy from logits in one streaming pass: the C++ CPU kernels.
//
// Forward, per row of V logits x and label y, with z = x / temperature:
//   lse = log sum_j exp(z_j)                      online (max, sum-exp) over blocks of the row
//   logp = z_y - lse                              0 where y == ignore_index
//   H = lse - sum_j p_j z_j = log S - T / S       S = sum e^{z-m}, T = sum e^{z-m} (z-m)
// Backward, with p = exp(z - lse), upstream grads g (log-prob) and h (entropy):
//   d z_j = g (1[j=y] - p_j) - h p_j (z_j - lse + H),   d x = d z / temperature.
// Only lse and H (fp32, one each per row) are saved between the two; nothing of size V.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "dispatch.h"
#include "simd.h"

namespace rlkern {
namespace {

// 2048 fp32 logits (8 KiB) per block: the block is read from memory once for its max, then again
// from L1 for the exponentials, so the whole row costs one pass over memory and one exp per logit.
constexpr int64_t kBlock = 2048;

struct RowGeometry {
  int64_t inner;     // rows per outer index: a row r lives at (r / inner) * stride_outer + (r % inner) * stride_inner
  int64_t stride_outer;
  int64_t stride_inner;
  int64_t vocab;
  template <typename T>
  T* row(T* base, int64_t r) const {
    return base + (r / inner) * stride_outer + (r % inner) * stride_inner;
  }
};

struct RowStats {
  float lse;
  float entropy;
};

// Adds e = 2^{d2} to vs and, for entropy, e * d2 to vt, where d2 = (z - m) log2(e) is clamped at
// -126 so that -inf logits add ~1e-38 (nothing a sum >= 1 can see) and e * d2 stays finite.
template <bool kEntropy>
RLKERN_INLINE void accumulate_exp2(vfloat xv, vfloat scale2, vfloat max2, vfloat& vs, vfloat& vt) {
  const vfloat d2 = vmax(xv * scale2 - max2, splat(kMinLog2));
  const vfloat e = vexp2_clamped(d2);
  vs += e;
  if constexpr (kEntropy) vt += e * d2;
}

template <typename T>
RLKERN_INLINE float block_max(const T* xb, int64_t len) {
  // Four accumulators: the max pass is bound by the latency of vmax, not by loads.
  const int64_t full = len - len % kLanes;
  vfloat m0 = splat(-kInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 * kLanes <= full; j += 4 * kLanes) {
    m0 = vmax(m0, load16(xb + j));
    m1 = vmax(m1, load16(xb + j + kLanes));
    m2 = vmax(m2, load16(xb + j + 2 * kLanes));
    m3 = vmax(m3, load16(xb + j + 3 * kLanes));
  }
  for (; j < full; j += kLanes) m0 = vmax(m0, load16(xb + j));
  if (full < len) m1 = vmax(m1, load_tail(xb + full, len - full, -kInf));
  return hmax(vmax(vmax(m0, m1), vmax(m2, m3)));
}

// The softmax statistics of one row, computed in log2 units (d2 = (z - m) log2 e) so each logit
// costs one fused multiply-subtract and one exp2:
//   S = sum 2^{d2},  T2 = sum 2^{d2} d2,  lse = ln2 (m2 + log2 S),  H = ln2 (log2 S - T2 / S).
template <typename T, bool kEntropy>
RLKERN_INLINE RowStats row_stats(const T* x, int64_t vocab, float inv_temp) {
  const float scale2_s = inv_temp * kLog2e;
  const vfloat scale2 = splat(scale2_s);
  float m2 = -kInf, S = 0.f, T2 = 0.f;
  for (int64_t j0 = 0; j0 < vocab; j0 += kBlock) {
    const int64_t len = std::min(kBlock, vocab - j0);
    const T* xb = x + j0;
    // Scaling by log2(e) / T > 0 is monotone, so max(x) * scale equals max(x * scale) exactly.
    const float new_max = block_max(xb, len) * scale2_s;
    if (new_max > m2) {
      if (S > 0.f) {  // rescale the running sums from the old max to the new one
        const float c = std::exp2(m2 - new_max);
        T2 = c * (T2 + (m2 - new_max) * S);
        S *= c;
      }
      m2 = new_max;
    }
    if (m2 == -kInf) continue;  // every logit so far is -inf (banned)
    const vfloat vmax2 = splat(m2);
    // Two independent accumulator pairs hide the latency of the vector adds.
    vfloat vs0 = splat(0.f), vt0 = splat(0.f), vs1 = splat(0.f), vt1 = splat(0.f);
    const int64_t full = len - len % kLanes;
    int64_t j = 0;
    for (; j + 2 * kLanes <= full; j += 2 * kLanes) {
      // Pull the next block toward L1 while this one is in the exp loop, so the memory stream and
      // the arithmetic overlap instead of alternating (the max pass of the next block then hits cache).
      __builtin_prefetch(xb + kBlock + j, 0, 3);
      __builtin_prefetch(xb + kBlock + j + kLanes, 0, 3);
      accumulate_exp2<kEntropy>(load16(xb + j), scale2, vmax2, vs0, vt0);
      accumulate_exp2<kEntropy>(load16(xb + j + kLanes), scale2, vmax2, vs1, vt1);
    }
    if (j < full) accumulate_exp2<kEntropy>(load16(xb + j), scale2, vmax2, vs0, vt0);
    if (full < len) accumulate_exp2<kEntropy>(load_tail(xb + full, len - full, -kInf), scale2, vmax2, vs1, vt1);
    S += hsum(vs0 + vs1);
    if constexpr (kEntropy) T2 += hsum(vt0 + vt1);
  }
  if (m2 == -kInf) return {-kInf, 0.f};  // a fully banned row: no distribution, entropy 0
  const float log2_s = std::log2(S);
  return {kLn2 * (m2 + log2_s), kEntropy ? kLn2 * (log2_s - T2 / S) : 0.f};
}

template <typename T>
RLKERN_INLINE void forward_rows(int64_t begin, int64_t end, const T* logits, const RowGeometry& g,
                                const int64_t* labels, int64_t ignore_index, float inv_temp,
                                bool want_entropy, float* logp, float* lse, float* ent) {
  for (int64_t r = begin; r < end; ++r) {
    const T* x = g.row(logits, r);
    const RowStats st = want_entropy ? row_stats<T, true>(x, g.vocab, inv_temp)
                                     : row_stats<T, false>(x, g.vocab, inv_temp);
    lse[r] = st.lse;
    if (want_entropy) ent[r] = st.entropy;
    if (labels != nullptr) {
      const int64_t y = labels[r];
      // A fully banned row (lse = -inf) has log-prob -inf for every label, never -inf - -inf = NaN.
      logp[r] = y == ignore_index ? 0.f : st.lse == -kInf ? -kInf : static_cast<float>(x[y]) * inv_temp - st.lse;
    }
  }
}

// Per-row constants of the backward in log2 units, with d2 = z log2 e - lse log2 e:
//   d x = p (a + b d2),  p = 2^{d2},  a = -(g + h H) / T,  b = -h ln2 / T
// which is d z = -p (g + h (z - lse + H)) scaled by 1/T, without the label's 1[j=y] g term.
struct GradCoefficients {
  vfloat scale2, lse2, a, b;
};

RLKERN_INLINE vfloat softmax_grad(vfloat xv, const GradCoefficients& c) {
  const vfloat d2 = xv * c.scale2 - c.lse2;
  const vfloat p = vexp2_clamped(vmax(d2, splat(kMinLog2)));
  // Below 2^-126 (and for -inf logits, where d2 is -inf) the gradient is exactly 0.
  return d2 > splat(kMinLog2) ? p * (c.a + c.b * d2) : splat(0.f);
}

template <typename T>
RLKERN_INLINE void backward_rows(int64_t begin, int64_t end, const T* logits, const RowGeometry& g,
                                 T* grad, const RowGeometry& gg, const int64_t* labels,
                                 int64_t ignore_index, float inv_temp, const float* grad_logp,
                                 const float* grad_ent, const float* lse, const float* ent) {
  for (int64_t r = begin; r < end; ++r) {
    const T* x = g.row(logits, r);
    T* dx = gg.row(grad, r);
    const int64_t y = labels != nullptr ? labels[r] : ignore_index;
    const bool has_label = y != ignore_index;
    const float gl = (grad_logp != nullptr && has_label) ? grad_logp[r] : 0.f;
    const float gh = grad_ent != nullptr ? grad_ent[r] : 0.f;
    const float row_lse = lse[r];
    const float row_h = ent != nullptr ? ent[r] : 0.f;
    // Read the label's logit before the loop: with inplace_backward dx aliases x.
    const float zy = has_label ? static_cast<float>(x[y]) * inv_temp : 0.f;
    if (row_lse == -kInf) {  // fully banned row: no gradient reaches it
      for (int64_t j = 0; j < g.vocab; ++j) dx[j] = T(0.f);
      continue;
    }
    const GradCoefficients c{splat(inv_temp * kLog2e), splat(row_lse * kLog2e), splat(-(gl + gh * row_h) * inv_temp),
                             splat(-gh * kLn2 * inv_temp)};
    const int64_t full = g.vocab - g.vocab % kLanes;
    for (int64_t j = 0; j < full; j += kLanes) store16(dx + j, softmax_grad(load16(x + j), c));
    if (full < g.vocab) {
      const int64_t n = g.vocab - full;
      store_tail(dx + full, softmax_grad(load_tail(x + full, n, -kInf), c), n);
    }
    if (has_label) {
      const float d = zy - row_lse;
      const float p = std::exp(d);
      const float entropy_term = p > 0.f ? gh * p * (d + row_h) : 0.f;
      dx[y] = T((gl * (1.f - p) - entropy_term) * inv_temp);
    }
  }
}

// One clone set per storage type, each covering a range of rows so the CPU-feature dispatch is
// paid once per thread chunk rather than once per row.
#define RLKERN_ROW_KERNELS(T, SUFFIX)                                                                  \
  RLKERN_CLONES void forward_rows_##SUFFIX(int64_t b, int64_t e, const T* x, const RowGeometry& g,    \
                                           const int64_t* y, int64_t ii, float it, bool we, float* lp, \
                                           float* lse, float* ent) {                                  \
    forward_rows<T>(b, e, x, g, y, ii, it, we, lp, lse, ent);                                         \
  }                                                                                                  \
  RLKERN_CLONES void backward_rows_##SUFFIX(int64_t b, int64_t e, const T* x, const RowGeometry& g,   \
                                            T* dx, const RowGeometry& gg, const int64_t* y, int64_t ii, \
                                            float it, const float* gl, const float* gh,               \
                                            const float* lse, const float* ent) {                     \
    backward_rows<T>(b, e, x, g, dx, gg, y, ii, it, gl, gh, lse, ent);                                \
  }
RLKERN_ROW_KERNELS(float, f32)
RLKERN_ROW_KERNELS(c10::BFloat16, bf16)
RLKERN_ROW_KERNELS(c10::Half, f16)
#undef RLKERN_ROW_KERNELS

void forward_dispatch(int64_t b, int64_t e, const float* x, const RowGeometry& g, const int64_t* y,
                      int64_t ii, float it, bool we, float* lp, float* lse, float* ent) {
  forward_rows_f32(b, e, x, g, y, ii, it, we, lp, lse, ent);
}
void forward_dispatch(int64_t b, int64_t e, const c10::BFloat16* x, const RowGeometry& g,
                      const int64_t* y, int64_t ii, float it, bool we, float* lp, float* lse, float* ent) {
  forward_rows_bf16(b, e, x, g, y, ii, it, we, lp, lse, ent);
}
void forward_dispatch(int64_t b, int64_t e, const c10::Half* x, const RowGeometry& g, const int64_t* y,
                      int64_t ii, float it, bool we, float* lp, float* lse, float* ent) {
  forward_rows_f16(b, e, x, g, y, ii, it, we, lp, lse, ent);
}
void backward_dispatch(int64_t b, int64_t e, const float* x, const RowGeometry& g, float* dx,
                       const RowGeometry& gg, const int64_t* y, int64_t ii, float it, const float* gl,
                       const float* gh, const float* lse, const float* ent) {
  backward_rows_f32(b, e, x, g, dx, gg, y, ii, it, gl, gh, lse, ent);
}
void backward_dispatch(int64_t b, int64_t e, const c10::BFloat16* x, const RowGeometry& g,
                       c10::BFloat16* dx, const RowGeometry& gg, const int64_t* y, int64_t ii, float it,
                       const float* gl, const float* gh, const float* lse, const float* ent) {
  backward_rows_bf16(b, e, x, g, dx, gg, y, ii, it, gl, gh, lse, ent);
}
void backward_dispatch(int64_t b, int64_t e, const c10::Half* x, const RowGeometry& g, c10::Half* dx,
                       const RowGeometry& gg, const int64_t* y, int64_t ii, float it, const float* gl,
                       const float* gh, const float* lse, const float* ent) {
  backward_rows_f16(b, e, x, g, dx, gg, y, ii, it, gl, gh, lse, ent);
}

RowGeometry geometry_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be a 3-d [outer, inner, V] view, got ", t.dim(), " dims");
  TORCH_CHECK(t.size(2) == 0 || t.stride(2) == 1, name, " must be contiguous in its last dim");
  return {std::max<int64_t>(t.size(1), 1), t.stride(0), t.stride(1), t.size(2)};
}

const int64_t* checked_labels(const at::Tensor& labels, int64_t rows, int64_t vocab, int64_t ignore_index) {
  if (!labels.defined() || labels.numel() == 0) return nullptr;
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() && labels.numel() == rows,
              "labels must be a contiguous int64 tensor with one entry per row (", rows, " rows)");
  const int64_t* y = labels.data_ptr<int64_t>();
  // The kernel reads x[y]: an out-of-range label is an index error here, never an out-of-bounds read.
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_INDEX(y[r] == ignore_index || (y[r] >= 0 && y[r] < vocab), "labels must lie in [0, ", vocab,
                      ") or equal ignore_index=", ignore_index, "; got ", y[r], " at flat position ", r);
  }
  return y;
}

int64_t rows_per_task(int64_t vocab) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1)); }

// A per-row float32 vector, or nullptr when the tensor is empty (meaning "not present").
float* f32_rows(const at::Tensor& t, int64_t rows, const char* name) {
  if (!t.defined() || t.numel() == 0) return nullptr;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == rows, name,
              " must be a contiguous float32 tensor with one entry per row (", rows, " rows)");
  return t.data_ptr<float>();
}

// Writes per-row lse, and logp / entropy when those outputs are non-empty (an empty logp means
// "no labels", an empty ent means "no entropy"). The caller allocates the outputs.
void logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels, double inv_temp, int64_t ignore_index,
                  at::Tensor logp, at::Tensor lse, at::Tensor ent) {
  const RowGeometry g = geometry_of(logits, "logits");
  const int64_t rows = logits.size(0) * logits.size(1);
  TORCH_CHECK(g.vocab > 0, "logits must have a non-empty vocabulary dimension");
  float* lp_ptr = f32_rows(logp, rows, "logp");
  float* lse_ptr = f32_rows(lse, rows, "lse");
  float* ent_ptr = f32_rows(ent, rows, "entropy");
  if (rows == 0) return;
  TORCH_CHECK(lse_ptr != nullptr, "lse must have one entry per row");
  const int64_t* y = lp_ptr != nullptr ? checked_labels(labels, rows, g.vocab, ignore_index) : nullptr;
  TORCH_CHECK(lp_ptr == nullptr || y != nullptr, "logp needs labels");
  const float it = static_cast<float>(inv_temp);
  const bool want_entropy = ent_ptr != nullptr;
  dispatch_storage_type(logits.scalar_type(), "logits", [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(logits.data_ptr());
    at::parallel_for(0, rows, rows_per_task(g.vocab), [&](int64_t b, int64_t e) {
      forward_dispatch(b, e, x, g, y, ignore_index, it, want_entropy, lp_ptr, lse_ptr, ent_ptr);
    });
  });
}

void logprobs_bwd(const at::Tensor& grad_logp, const at::Tensor& grad_ent, const at::Tensor& logits,
                  const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& ent, double inv_temp,
                  int64_t ignore_index, at::Tensor grad_logits) {
  const RowGeometry g = geometry_of(logits, "logits");
  const RowGeometry gg = geometry_of(grad_logits, "grad_logits");
  const int64_t rows = logits.size(0) * logits.size(1);
  TORCH_CHECK(grad_logits.size(0) * grad_logits.size(1) == rows && gg.vocab == g.vocab &&
                  grad_logits.scalar_type() == logits.scalar_type(),
              "grad_logits must match logits in rows, vocabulary and dtype");
  const float* gl = f32_rows(grad_logp, rows, "grad_logp");
  const float* gh = f32_rows(grad_ent, rows, "grad_entropy");
  const float* lse_ptr = f32_rows(lse, rows, "lse");
  const float* ent_ptr = f32_rows(ent, rows, "entropy");
  TORCH_CHECK(lse_ptr != nullptr || rows == 0, "lse is required");
  TORCH_CHECK(gh == nullptr || ent_ptr != nullptr, "the entropy gradient needs the saved entropy");
  const int64_t* y = checked_labels(labels, rows, g.vocab, ignore_index);
  const float it = static_cast<float>(inv_temp);
  dispatch_storage_type(logits.scalar_type(), "logits", [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(logits.data_ptr());
    T* dx = static_cast<T*>(grad_logits.data_ptr());
    at::parallel_for(0, rows, rows_per_task(g.vocab), [&](int64_t b, int64_t e) {
      backward_dispatch(b, e, x, g, dx, gg, y, ignore_index, it, gl, gh, lse_ptr, ent_ptr);
    });
  });
}

}  // namespace
}  // namespace rlkern

TORCH_LIBRARY_FRAGMENT(rlkern_C, m) {
  m.def("logprobs_fwd(Tensor logits, Tensor labels, float inv_temp, int ignore_index, Tensor(a!) logp,"
        " Tensor(b!) lse, Tensor(c!) ent) -> ()");
  m.def("logprobs_bwd(Tensor grad_logp, Tensor grad_ent, Tensor logits, Tensor labels, Tensor lse, Tensor ent,"
        " float inv_temp, int ignore_index, Tensor(a!) grad_logits) -> ()");
}

TORCH_LIBRARY_IMPL(rlkern_C, CPU, m) {
  m.impl("logprobs_fwd", &rlkern::logprobs_fwd);
  m.impl("logprobs_bwd", &rlkern::logprobs_bwd);
}
