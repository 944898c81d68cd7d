// Token KL estimators and KL-shaped token rewards: the C++ CPU kernels.
//
// Per token, with d = logp - ref (float32) and r = -d = ref - logp:
//   k1 = d      abs = |d|      k2 = d^2 / 2      k3 = e^r - r - 1 = expm1(r) - r
// k3's log-ratio is clamped to [lo, hi] before the exp (hi <= 80 always, so e^r is finite) and
// its value to [-vb, vb] (verl's clamps when asked; lo = -inf, vb = inf otherwise). The gradient
// w.r.t. logp is that of the clamped expression, exactly as torch autograd differentiates
// rlkern.reference.kl: 0 where a clamp is active (torch.clamp passes the gradient on the closed
// interval), so it is finite for any finite input:
//   d k1 = 1   d abs = sign(d)   d k2 = d   d k3 = -expm1(r) [lo <= r <= hi] [|k3| <= vb]
// and the straight-through variants ("k3+") take k2's gradient d whatever their value.
// NaN in either input: the value is NaN for every estimator; the k2, k3 and straight-through
// gradients are NaN, k1's is 1 and abs's 0 (torch autograd's sign(NaN) = 0), on every backend.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/accumulate.h>

#include <algorithm>

#include "kl_penalty.h"
#include "dispatch.h"
#include "mask_stage.h"
#include "rlkern_codes.h"
#include "simd.h"

namespace rlkern {
namespace {

struct KlParams {
  int64_t estimator;
  bool straight_through;
  float lo, hi, value_bound;
};

RLKERN_INLINE vfloat vabs(vfloat x) { return x < splat(0.f) ? -x : x; }
RLKERN_INLINE vfloat vclamp(vfloat x, float lo, float hi) {
  x = x < splat(lo) ? splat(lo) : x;
  return x > splat(hi) ? splat(hi) : x;
}

// The clamped k3 pieces for r = ref - logp: expm1(rc) (the gradient) and k3 = expm1(rc) - rc (the
// value, before the value clamp), rc = r clamped to [lo, hi], hi <= 80.
// For |rc| < 1/2 both come from the Taylor series expm1(x) = x + x^2 q(x), k3 = x^2 q(x),
// q(x) = 1/2! + x/3! + ... + x^7/9! (truncation < x^10/10! ~ 3e-10 relative there), because
// e^x - 1 - x cancels the low bits of a small x (k3 would keep only ~|x| / 2^-24 of its bits).
// Elsewhere e^x - 1 from vexp_nonpos's reduction, whose 2^n scaling stays a normal float for
// n + 127 in [1, 254], i.e. for every x in [-87.3, 88] (so also for x <= 80).
struct K3Parts {
  vfloat em1, value;
};
RLKERN_INLINE K3Parts k3_parts(vfloat r, float lo, float hi) {
  const vfloat x = vclamp(r, lo, hi);
  vfloat q = splat(1.f / 362880.f);
  q = q * x + splat(1.f / 40320.f);
  q = q * x + splat(1.f / 5040.f);
  q = q * x + splat(1.f / 720.f);
  q = q * x + splat(1.f / 120.f);
  q = q * x + splat(1.f / 24.f);
  q = q * x + splat(1.f / 6.f);
  q = q * x + splat(0.5f);
  const vfloat series = x * x * q;
  // vexp_nonpos clamps its argument from below with a compare that a NaN fails, so e^NaN would
  // come out as e^-87.3: NaN lanes are passed through explicitly (value and gradient NaN).
  const vint nan = x != x;
  const vfloat direct = nan ? x : vexp_nonpos(x) - splat(1.f);
  const vint small = vabs(x) < splat(0.5f);
  return {small ? x + series : direct, small ? series : direct - x};
}

// The estimator is a template argument and the bounds are locals, so each loop below is one
// straight-line body (no per-step switch, no bound reloads through a reference the stores may alias).
template <int64_t E>
RLKERN_INLINE vfloat kl_value(vfloat d, float lo, float hi, float vb) {
  if constexpr (E == kKlK1) return d;
  else if constexpr (E == kKlAbs) return vabs(d);
  else if constexpr (E == kKlK2) return splat(0.5f) * d * d;
  else return vclamp(k3_parts(-d, lo, hi).value, -vb, vb);
}

// d estimator / d logp; straight-through variants take k2's, d.
template <int64_t E, bool kStraightThrough>
RLKERN_INLINE vfloat kl_slope(vfloat d, float lo, float hi, float vb) {
  if constexpr (kStraightThrough || E == kKlK2) return d;
  else if constexpr (E == kKlK1) return splat(1.f);
  else if constexpr (E == kKlAbs) return d > splat(0.f) ? splat(1.f) : (d < splat(0.f) ? splat(-1.f) : splat(0.f));
  else {
    const vfloat r = -d;
    const K3Parts k = k3_parts(r, lo, hi);
    // 0 outside [lo, hi] and where |k3| > vb: "no clamp active" as 0/1 float flags (clamped == value),
    // multiplied in. An OR of integer compare masks here was scalarised by GCC (20x slower). em1 is
    // finite (rc <= 80), so a 0 flag gives 0; a NaN r makes em1 NaN, and NaN * 0 keeps it NaN.
    const vfloat keep_r = -__builtin_convertvector(vclamp(r, lo, hi) == r, vfloat);
    const vfloat keep_v = -__builtin_convertvector(vclamp(k.value, -vb, vb) == k.value, vfloat);
    return -k.em1 * keep_r * keep_v;
  }
}

// Full 16-lane steps, then one tail step: a per-step tail branch costs up to 3x in these loops.
template <typename T, int64_t E>
RLKERN_INLINE void kl_fwd_loop(int64_t b, int64_t e, const T* lp, const T* rf, float lo, float hi, float vb,
                               float* out) {
  const int64_t full = e - (e - b) % kLanes;
  for (int64_t i = b; i < full; i += kLanes) store16(out + i, kl_value<E>(load16(lp + i) - load16(rf + i), lo, hi, vb));
  if (full < e) {
    const int64_t n = e - full;
    const vfloat d = load_tail(lp + full, n, 0.f) - load_tail(rf + full, n, 0.f);
    store_tail(out + full, kl_value<E>(d, lo, hi, vb), n);
  }
}

// g_stride is 1 (a gradient per element) or 0 (one gradient for all: the backward of a sum).
template <typename T, int64_t E, bool kST>
RLKERN_INLINE void kl_bwd_loop(int64_t b, int64_t e, const float* g, int64_t g_stride, const T* lp, const T* rf,
                               float lo, float hi, float vb, T* grad) {
  const int64_t full = e - (e - b) % kLanes;
  if (g_stride == 0) {
    const vfloat gv = splat(g[0]);
    for (int64_t i = b; i < full; i += kLanes) {
      store16(grad + i, gv * kl_slope<E, kST>(load16(lp + i) - load16(rf + i), lo, hi, vb));
    }
  } else {
    for (int64_t i = b; i < full; i += kLanes) {
      store16(grad + i, load16(g + i) * kl_slope<E, kST>(load16(lp + i) - load16(rf + i), lo, hi, vb));
    }
  }
  if (full < e) {
    const int64_t n = e - full;
    const vfloat slope = kl_slope<E, kST>(load_tail(lp + full, n, 0.f) - load_tail(rf + full, n, 0.f), lo, hi, vb);
    const vfloat gv = g_stride == 0 ? splat(g[0]) : load_tail(g + full, n, 0.f);
    store_tail(grad + full, gv * slope, n);
  }
}

template <typename T>
RLKERN_INLINE void kl_fwd_range(int64_t b, int64_t e, const T* lp, const T* rf, const KlParams& p, float* out) {
  const float lo = p.lo, hi = p.hi, vb = p.value_bound;
  switch (p.estimator) {
    case kKlK1: return kl_fwd_loop<T, kKlK1>(b, e, lp, rf, lo, hi, vb, out);
    case kKlAbs: return kl_fwd_loop<T, kKlAbs>(b, e, lp, rf, lo, hi, vb, out);
    case kKlK2: return kl_fwd_loop<T, kKlK2>(b, e, lp, rf, lo, hi, vb, out);
    default: return kl_fwd_loop<T, kKlK3>(b, e, lp, rf, lo, hi, vb, out);
  }
}

template <typename T>
RLKERN_INLINE void kl_bwd_range(int64_t b, int64_t e, const float* g, int64_t gs, const T* lp, const T* rf,
                                const KlParams& p, T* grad) {
  const float lo = p.lo, hi = p.hi, vb = p.value_bound;
  if (p.straight_through || p.estimator == kKlK2) {
    return kl_bwd_loop<T, kKlK2, true>(b, e, g, gs, lp, rf, lo, hi, vb, grad);
  }
  switch (p.estimator) {
    case kKlK1: return kl_bwd_loop<T, kKlK1, false>(b, e, g, gs, lp, rf, lo, hi, vb, grad);
    case kKlAbs: return kl_bwd_loop<T, kKlAbs, false>(b, e, g, gs, lp, rf, lo, hi, vb, grad);
    default: return kl_bwd_loop<T, kKlK3, false>(b, e, g, gs, lp, rf, lo, hi, vb, grad);
  }
}

// Rewards for rows [b, e) of length T: -kl_coef * kl where mask, 0 elsewhere, plus the row's
// score at its last masked position. The mask (any dtype, nonzero = valid) is staged kChunk tokens at a
// time as float 1/0; the last valid index is tracked per lane as a float (exact: T < 2^24).
constexpr int64_t kChunk = 1024;

template <typename T, int64_t E>
RLKERN_INLINE void rewards_loop(int64_t b, int64_t e, int64_t len, const float* scores, const T* lp, const T* rf,
                                const char* mask, int64_t mask_bytes, MaskStager stage, float kl_coef, float lo,
                                float hi, float vb, float* out) {
  const vfloat coef = splat(kl_coef);
  const vfloat iota = {0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f};
  alignas(64) float valid[kChunk];
  for (int64_t row = b; row < e; ++row) {
    const int64_t o = row * len;
    vfloat last = splat(-1.f);
    for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
      const int64_t cn = std::min<int64_t>(kChunk, len - c0);
      stage(mask + (o + c0) * mask_bytes, cn, valid);
      for (int64_t t = 0; t < cn; t += kLanes) {
        const int64_t n = std::min<int64_t>(kLanes, cn - t), at = o + c0 + t;
        const vint v = load16(valid + t) != splat(0.f);
        const vfloat d = n == kLanes ? load16(lp + at) - load16(rf + at)
                                     : load_tail(lp + at, n, 0.f) - load_tail(rf + at, n, 0.f);
        const vfloat penalty = -(coef * kl_value<E>(d, lo, hi, vb));
        // A select, not a product: a non-finite KL on a padding token must not leak into its reward.
        const vfloat reward = v ? penalty : splat(0.f);
        last = v ? iota + static_cast<float>(c0 + t) : last;
        if (n == kLanes) store16(out + at, reward);
        else store_tail(out + at, reward, n);
      }
    }
    const float l = hmax(last);
    if (l >= 0.f) out[o + static_cast<int64_t>(l)] += scores[row];
  }
}

template <typename T>
RLKERN_INLINE void rewards_rows(int64_t b, int64_t e, int64_t len, const float* s, const T* lp, const T* rf,
                                const char* m, int64_t mb, MaskStager st, float c, const KlParams& p, float* out) {
  const float lo = p.lo, hi = p.hi, vb = p.value_bound;
  switch (p.estimator) {
    case kKlK1: return rewards_loop<T, kKlK1>(b, e, len, s, lp, rf, m, mb, st, c, lo, hi, vb, out);
    case kKlAbs: return rewards_loop<T, kKlAbs>(b, e, len, s, lp, rf, m, mb, st, c, lo, hi, vb, out);
    case kKlK2: return rewards_loop<T, kKlK2>(b, e, len, s, lp, rf, m, mb, st, c, lo, hi, vb, out);
    default: return rewards_loop<T, kKlK3>(b, e, len, s, lp, rf, m, mb, st, c, lo, hi, vb, out);
  }
}


#define RLKERN_KL_KERNELS(T, SUFFIX)                                                                         \
  RLKERN_AT_LEVELS(kl_fwd_##SUFFIX, (int64_t b, int64_t e, const T* lp, const T* rf, const KlParams& p, float* out), \
                   (b, e, lp, rf, p, out), (kl_fwd_range<T>(b, e, lp, rf, p, out)))                                 \
  RLKERN_AT_LEVELS(kl_bwd_##SUFFIX,                                                                                  \
                   (int64_t b, int64_t e, const float* g, int64_t gs, const T* lp, const T* rf, const KlParams& p,  \
                    T* grad),                                                                                       \
                   (b, e, g, gs, lp, rf, p, grad), (kl_bwd_range<T>(b, e, g, gs, lp, rf, p, grad)))                 \
  RLKERN_AT_LEVELS(rewards_##SUFFIX,                                                                                 \
                   (int64_t b, int64_t e, int64_t len, const float* s, const T* lp, const T* rf, const char* m,     \
                    int64_t mb, MaskStager st, float c, const KlParams& p, float* out),                            \
                   (b, e, len, s, lp, rf, m, mb, st, c, p, out),                                                    \
                   (rewards_rows<T>(b, e, len, s, lp, rf, m, mb, st, c, p, out)))
RLKERN_KL_KERNELS(float, f32)
RLKERN_KL_KERNELS(c10::BFloat16, bf16)
RLKERN_KL_KERNELS(c10::Half, f16)
#undef RLKERN_KL_KERNELS

#define RLKERN_KL_OVERLOADS(T, SUFFIX)                                                                         \
  void kl_fwd_any(int64_t b, int64_t e, const T* lp, const T* rf, const KlParams& p, float* out) {            \
    kl_fwd_##SUFFIX(b, e, lp, rf, p, out);                                                                    \
  }                                                                                                           \
  void kl_bwd_any(int64_t b, int64_t e, const float* g, int64_t gs, const T* lp, const T* rf, const KlParams& p, \
                  T* grad) {                                                                                  \
    kl_bwd_##SUFFIX(b, e, g, gs, lp, rf, p, grad);                                                            \
  }                                                                                                           \
  void rewards_any(int64_t b, int64_t e, int64_t len, const float* s, const T* lp, const T* rf,               \
                   const char* m, int64_t mb, MaskStager st, float c, const KlParams& p, float* out) {       \
    rewards_##SUFFIX(b, e, len, s, lp, rf, m, mb, st, c, p, out);                                             \
  }
RLKERN_KL_OVERLOADS(float, f32)
RLKERN_KL_OVERLOADS(c10::BFloat16, bf16)
RLKERN_KL_OVERLOADS(c10::Half, f16)
#undef RLKERN_KL_OVERLOADS

// Elements per parallel task: a multiple of 16 so every task but the last runs full vectors.
constexpr int64_t kGrain = 16384;

KlParams make_params(int64_t estimator, bool straight_through, double lo, double hi, double value_bound) {
  TORCH_CHECK(estimator >= kKlK1 && estimator <= kKlK3, "estimator code must be 0..3 (k1, abs, k2, k3), got ",
              estimator);
  TORCH_CHECK(hi <= 80.0 && lo <= hi && value_bound >= 0.0,
              "k3 clamp bounds must satisfy lo <= hi <= 80 and value_bound >= 0");
  return {estimator, straight_through, static_cast<float>(lo), static_cast<float>(hi),
          static_cast<float>(value_bound)};
}

void check_pair(const at::Tensor& logp, const at::Tensor& ref) {
  TORCH_CHECK(logp.is_contiguous() && ref.is_contiguous(), "logp and ref_logp must be contiguous");
  TORCH_CHECK(logp.sizes() == ref.sizes() && logp.scalar_type() == ref.scalar_type(),
              "logp and ref_logp must have one shape and one dtype");
}

}  // namespace

void kl_fwd(const at::Tensor& logp, const at::Tensor& ref, int64_t estimator, bool straight_through, double lo,
            double hi, double value_bound, at::Tensor out) {
  check_pair(logp, ref);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == logp.numel(),
              "out must be a contiguous float32 tensor like logp");
  const KlParams p = make_params(estimator, straight_through, lo, hi, value_bound);
  float* y = out.data_ptr<float>();
  dispatch_storage_type(logp.scalar_type(), "logp", [&](auto tag) {
    using T = decltype(tag);
    const T* lp = static_cast<const T*>(logp.data_ptr());
    const T* rf = static_cast<const T*>(ref.data_ptr());
    at::parallel_for(0, logp.numel(), kGrain, [&](int64_t b, int64_t e) { kl_fwd_any(b, e, lp, rf, p, y); });
  });
}

void kl_bwd(const at::Tensor& grad, const at::Tensor& logp, const at::Tensor& ref, int64_t estimator,
            bool straight_through, double lo, double hi, double value_bound, at::Tensor grad_logp) {
  check_pair(logp, ref);
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() &&
                  (grad.numel() == logp.numel() || grad.numel() == 1),
              "grad must be a contiguous float32 tensor like logp, or one element (the same for all)");
  const int64_t gs = grad.numel() == logp.numel() ? 1 : 0;
  TORCH_CHECK(grad_logp.scalar_type() == logp.scalar_type() && grad_logp.is_contiguous() &&
                  grad_logp.numel() == logp.numel(),
              "grad_logp must be a contiguous tensor like logp");
  const KlParams p = make_params(estimator, straight_through, lo, hi, value_bound);
  const float* g = grad.data_ptr<float>();
  dispatch_storage_type(logp.scalar_type(), "logp", [&](auto tag) {
    using T = decltype(tag);
    const T* lp = static_cast<const T*>(logp.data_ptr());
    const T* rf = static_cast<const T*>(ref.data_ptr());
    T* dx = static_cast<T*>(grad_logp.data_ptr());
    at::parallel_for(0, logp.numel(), kGrain, [&](int64_t b, int64_t e) { kl_bwd_any(b, e, g, gs, lp, rf, p, dx); });
  });
}

void token_rewards_fwd(const at::Tensor& scores, const at::Tensor& logp, const at::Tensor& ref,
                       const at::Tensor& mask, double kl_coef, int64_t estimator, double lo, double hi,
                       double value_bound, at::Tensor out) {
  check_pair(logp, ref);
  TORCH_CHECK(logp.dim() >= 1, "logp must be a [..., T] tensor");
  const int64_t len = logp.size(-1), rows = c10::multiply_integers(logp.sizes().slice(0, logp.dim() - 1));
  TORCH_CHECK(len < (int64_t{1} << 24), "token_rewards: T must be < 2^24, got ", len);
  TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.is_contiguous() && scores.numel() == rows,
              "scores must be a contiguous float32 tensor with one entry per row");
  TORCH_CHECK(mask.is_contiguous() && mask.sizes() == logp.sizes(), "mask must be a contiguous tensor like logp");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == logp.sizes(),
              "out must be a contiguous float32 tensor like logp");
  if (logp.numel() == 0) return;
  const KlParams p = make_params(estimator, false, lo, hi, value_bound);
  const float* s = scores.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const float c = static_cast<float>(kl_coef);
  const char* m = static_cast<const char*>(mask.const_data_ptr());
  const int64_t mb = mask.element_size();
  MaskStager st = nullptr;
  dispatch_mask_type(mask.scalar_type(), "mask", [&](auto mtag) { st = mask_stager<decltype(mtag)>(); });
  dispatch_storage_type(logp.scalar_type(), "logp", [&](auto tag) {
    using T = decltype(tag);
    const T* lp = static_cast<const T*>(logp.data_ptr());
    const T* rf = static_cast<const T*>(ref.data_ptr());
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(len, 1));
    at::parallel_for(0, rows, grain,
                     [&](int64_t b, int64_t e) { rewards_any(b, e, len, s, lp, rf, m, mb, st, c, p, y); });
  });
}

}  // namespace rlkern
