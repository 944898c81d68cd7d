// PPO / GRPO policy losses and the clipped value loss: the C++ CPU kernels.
//
// One row is one sequence of T tokens. Per valid token (mask = 1), with A the advantage:
//   policy / grpo:  r = exp(clamp(logp - old, -20, 20)),  lo = 1 - clip_low, hi = 1 + clip_high
//                   l = max(-A r, -A clamp(r, lo, hi))                  PPO-clip (clip-higher bounds)
//                   l = min(l, -A c) where A < 0                        dual clip (c = +inf: off)
//                   l *= w                                              optional per-token weight
//                   grpo: l += beta * k3,  k3 = e^d - d - 1,  d = clamp(ref - logp, -20, 20)
//                         (after the weight: TRL masks / IS-weights the surrogate, not the KL)
//                   grpo_bc: l += beta * k3 * r  (TRL's use_bias_correction_kl: the KL term
//                            importance-weighted by the unclipped ratio; kind 3)
//   value:          l = 1/2 max((v - R)^2, (clamp(v, v_old - clip, v_old + clip) - R)^2)
// Variants of the policy / grpo surrogate (template parameter V, rlkern/codes.py LOSS_VARIANTS; issue 13):
//   ppo        the PPO-clip above, with r -> min(r, delta) in the unclipped branch (TRL's delta)
//   cispo      l = -sg(clamp(r, lo, hi)) A logp            verl core_algos.py::compute_policy_loss_cispo
//   cispo_cap  l = -sg(min(r, cap)) A logp, cap = clip_high  TRL grpo_trainer.py::_compute_loss "cispo"
//   sapo       l = -sigmoid(tau (r - 1)) 4 / tau A         verl compute_policy_loss_sapo, TRL "sapo"
//   gpg        l = -A logp                                 verl compute_policy_loss_gpg
//   vespo      l = -sg(phi_b) A logp                       TRL _compute_loss "vespo", get_gamma_weights:
//              log w_b = clamp(sum_valid clamp(logp - old, -20, 20) + row_in_b, log 1e-8, 20) (row_in:
//              TRL's vLLM IS log-ratios summed in Python), phi = exp(lam + k log w - lam w) (k, lam by
//              A >= 0; NaN / inf -> 0); the kClipHigh stat sums phi (TRL's vespo/phi_seq_mean)
//   gmpo       verl compute_policy_loss_geo_mean: m_t = min(d, hi) (A > 0), max(d, -lo) (A < 0), 0
//              (A = 0), d = logp - old unclamped; loss_b = -adv_b exp(sum_valid m / (n_b + 1e-8))
//              exp(row_in_b), adv_b = sum_valid A / (n_b + 1e-8) (row_in: the rollout weights' log
//              geometric mean); flags d clipped with A > 0 (kClipped) / A < 0 (kDualFlag)
//   dro        l = -A logp + beta / 2 (logp - old)^2       verl compute_policy_loss_dro (unclamped)
// vespo and gmpo read their row first (row_extra), like the sequence levels.
// Ratio levels (runtime, per launch): token: r per token as above; sequence: r_b = exp(clamp(s_b, -20,
// 20)), s_b the masked row mean of logp - old (TRL importance_sampling_level="sequence"; the gradient
// flows through the mean, so each valid token also gets G_b = (1 / n_b) sum_t d l_t / d log r_b);
// sequence_token: r_b = exp(min(s_b, 10)) with d r / d logp_t = r_b (verl compute_policy_loss_gspo).
// loss = sum_rows scale_b * sum_{t valid} l_bt, where scale_b = (per_row_mean ? 1 / max(n_b, 1) : 1) / D and
// D is a constant (B, T, B * L, a global token count) or a count this pass finds (valid tokens, or
// rows with a valid token), at least 1. Masked-out positions are never read into a result: padding
// may hold anything, even NaN.
//
// NaN (issue 9), as rlkern.reference: a NaN in any input of a valid token makes that token's loss and
// its gradient NaN, and so the loss; every clamp and max / min here propagates NaN as torch.clamp /
// torch.maximum do (a plain `a > b ? a : b` returns the non-NaN operand). A clip / dual flag of a
// token whose clipped surrogate is NaN counts as NaN, so the clip fractions are NaN too; approx_kl
// and k3 are NaN through their own values. Masked-out tokens never contribute, NaN or not.
//
// Forward: one pass over the rows writes per-row partial sums (loss, count, and the clip counters and KL
// sums the kind reports: `reports`); a serial loop in a fixed order then combines them in double, so the result does not depend on
// the thread count. It saves scale_b per row. Backward: one pass writes
//   d logp_bt = grad * scale_b * w_bt * d l_bt / d logp_bt      (0 at masked positions)
// where max/min/clamp ties split the gradient exactly as torch.maximum / torch.minimum / torch.clamp
// do, so the kernel and the plain-PyTorch reference agree on every subgradient.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <type_traits>
#include <vector>

#include "losses.h"
#include "dispatch.h"
#include "mask_stage.h"
#include "outputs.h"
#include "rlkern_codes.h"
#include "simd.h"

namespace rlkern {
namespace {

// Per-row partial sums written by the forward pass, in this order.
enum Partial : int { kLossSum, kCount, kClipped, kClipHigh, kClipLow, kDualFlag, kNegLogRatio, kK3, kProbeOk,
                     kPartials };
// The stats vector returned to Python (kLossStats entries, rlkern/codes.py): every counter and KL sum
// divided by the valid-token count: clipped, clip_high, clip_low, dual, approx_kl (mean -log r), k3 mean;
// then clip_high + clip_low in float32 (grpo's clip_ratio, TRL's region share: the two are disjoint)
// and 0.
static_assert(kLossStats == 8, "rlkern/codes.py LOSS_STATS must match the stats the kernels write");

// The mask (any dtype, nonzero = valid; csrc/mask_stage.h) is staged kChunk tokens at a time as float
// 0/1: it multiplies the 0/1 flags and drives keep().
constexpr int64_t kChunk = 1024;

// One past the last block (kLanes tokens) of a staged chunk that holds a valid token; the blocks
// after it are all padding. RLHF batches are right-padded to their longest sequence (a quarter to a
// half of the tokens are padding), so every pass below stops there: no load and no arithmetic for
// those tokens. Bit for bit the same sums: a padding token adds keep(., 0) = +0.0, which changes no
// sum that starts at +0.0 (such a sum is never -0.0), and the backward writes its +0.0 directly.
RLKERN_INLINE int64_t live_end(const float* valid, int64_t n) {
  int64_t end = (n + kLanes - 1) / kLanes * kLanes;  // the stager zero-fills up to here
  while (end > 0) {
    uint64_t words[kLanes / 2];  // two floats each; 0 is +0.0 or -0.0 (mask16 negates), 1.0f is not
    std::memcpy(words, valid + end - kLanes, sizeof(words));
    uint64_t any = 0;
    for (const uint64_t w : words) any |= w;
    if ((any & 0x7fffffff7fffffffULL) != 0) break;
    end -= kLanes;
  }
  return end;
}

// The backward's gradient for the padding after live_end: +0.0, as keep() gives it.
template <typename T>
RLKERN_INLINE void zero_padding(T* out, int64_t live, int64_t n) {
  if (live < n) std::fill(out + live, out + n, T(0.f));
}

// e^x for the clamped log-ratios, x in [-20, 20] or NaN: simd.h's vexp_nonpos is exact on this whole
// range (its only clamp, at ln(FLT_MIN), never acts, and for x <= 88 the 2^n it builds is still a
// normal float), but turns a NaN x into e^-87.3. Where the NaN must come through, a caller adds
// x - x (0 for the finite x here, NaN for NaN).
// torch.maximum / torch.minimum: NaN if either operand is NaN (both compares fail, and a + b is NaN).
RLKERN_INLINE vfloat vmax_nan(vfloat a, vfloat b) { return a < b ? b : (b <= a ? a : a + b); }
RLKERN_INLINE vfloat vmin_nan(vfloat a, vfloat b) { return b < a ? b : (a <= b ? a : a + b); }
// torch.clamp: NaN if x or a bound is NaN.
RLKERN_INLINE vfloat clampv(vfloat x, vfloat lo, vfloat hi) { return vmin_nan(vmax_nan(x, lo), hi); }
// torch.clamp with bounds that are never NaN (constants): `x < lo` and `hi < x` are false for a NaN
// x, which passes through as in torch.clamp; one vmaxps and one vminps instead of clampv's ten.
RLKERN_INLINE vfloat clamp_const(vfloat x, vfloat lo, vfloat hi) {
  x = x < lo ? lo : x;
  return hi < x ? hi : x;
}

// 0/1 flags from comparisons: the all-ones lanes of the comparison ANDed with the bits of 1.0f (a
// compare and one masked move). Not `a > b ? 1 : 0`: GCC 12 folds products and selects of such
// ternaries into one ?: on a combined (&) mask, which it then scalarises inside a target_clones
// function (16 vcomiss per use instead of one vcmpps); a bitwise AND is not a select it can merge.
// Flags are combined by multiplying, and "x passes through clamp" is tested as clamp(x) == x.
RLKERN_INLINE vfloat flag_bits(vint m) {
  m &= vint{} + 0x3f800000;  // 1.0f
  vfloat out;
  std::memcpy(&out, &m, sizeof(out));
  return out;
}
RLKERN_INLINE vfloat gt(vfloat a, vfloat b) { return flag_bits(a > b); }
RLKERN_INLINE vfloat eq(vfloat a, vfloat b) { return flag_bits(a == b); }
// x where the 0/1 flag f is 1, else y: a select on a computed float, which GCC cannot fold.
RLKERN_INLINE vfloat pick(vfloat f, vfloat x, vfloat y) { return f > splat(0.5f) ? x : y; }
// x where valid (0/1) is 1, else +0.0, by clearing the bits: NaN / inf in padding never survive,
// and a bitwise AND is not a select GCC could merge with the ones inside x.
RLKERN_INLINE vfloat keep(vfloat x, vfloat valid) {
  vint bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= -__builtin_convertvector(valid, vint);  // 1 -> all ones, 0 -> 0
  vfloat out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// torch.maximum(a, b)'s backward share for a: 1 where a > b, 1/2 where a == b, 0 where a < b.
RLKERN_INLINE vfloat max_share(vfloat a, vfloat b) { return gt(a, b) + splat(0.5f) * eq(a, b); }

// The constants of one launch. cap: cispo_cap's absolute bound on r (TRL's epsilon_high, passed as
// clip_high); delta: ppo's bound on the unclipped branch (TRL's args.delta; +inf: off); sapo's
// temperatures and 4 / tau for A > 0 (pos) and A <= 0 (neg).
struct Consts {
  vfloat lo, hi, dual, beta, clip, cap, delta, tau_pos, tau_neg, four_pos, four_neg;
  vfloat log_lo;  // gmpo: -clip_low, the lower bound of the log-ratio (the upper one is cap = clip_high)
  float k_pos, lam_pos, k_neg, lam_neg;  // vespo's gamma weights (lambdas already clamped to >= 1e-4)
  // The grpo kinds: a ref_logp was passed. Without one (beta = 0) there is no KL term: k3 and its
  // gradients are skipped (a runtime branch on a launch constant), not computed as 0.
  bool ref = true;
};

// The row values of the variants that sweep their row before the tokens (row_extra): vespo's phi
// for A >= 0 and A < 0; gmpo's row loss and its gradient per unit of a token's clipped log-ratio.
struct RowExtra {
  float phi_pos = 0.f, phi_neg = 0.f, gm_loss = 0.f, gm_coef = 0.f;
};

// gmpo's sign-aware clip of d = logp - old (verl: sgn(A) min(sgn(A) d, sgn(A) clamp(d, -lo, hi))):
// min(d, hi) where A > 0, max(d, -lo) where A < 0, 0 d where A == 0, NaN where A is. dm: d m / d d
// (torch.minimum's tie shares add up to 1 inside the bounds); clipped: d outside [-lo, hi].
RLKERN_INLINE vfloat gmpo_m(vfloat d, vfloat a, const Consts& c, vfloat& dm, vfloat& clipped) {
  const vfloat pos = gt(a, splat(0.f)), neg = gt(splat(0.f), a);
  const vfloat above = gt(d, c.cap), below = gt(c.log_lo, d);
  const vfloat m_pos = c.cap < d ? c.cap : d, m_neg = d < c.log_lo ? c.log_lo : d;  // NaN d stays NaN
  dm = pos * (splat(1.f) - above) + neg * (splat(1.f) - below);
  clipped = above + below;
  return pick(pos, m_pos, pick(neg, m_neg, pick(eq(a, a), splat(0.f) * d, a)));
}

// The importance ratio of one block of tokens: lr = log r (clamped), ratio = r, pass = 1 where the
// gradient flows through lr into logp at this token (token level: lr not clamped; sequence_token:
// the row's s_b <= 10; sequence: 0, the gradient goes through the row mean instead, see RowRatio).
struct Ratio {
  vfloat lr, ratio, pass, neg_log_ratio;
};

struct TokenTerms {
  vfloat loss;   // l without the KL term (weights not applied)
  vfloat dgrad;  // d l / d x at a fixed ratio (cispo, gpg: l reads logp itself; ppo, sapo: 0)
  vfloat rgrad;  // d l / d log r (ppo, sapo; 0 for the detached ratios of cispo and gpg)
  vfloat clipped, clip_high, clip_low, dual;  // 0/1 flags, read from `probe`'s comparisons
  vfloat probe;  // NaN where the flags are (a comparison with NaN is false: it would count as unclipped)
  vfloat neg_log_ratio, k3;  // k3: the KL term per token (times r for grpo_bc); 0 for policy / value
  vfloat kl_d, kl_r;         // d k3 / d logp at a fixed ratio, and d k3 / d log r (grpo_bc's k3 r)
};

// A NaN token's gradient is NaN: g where l is a number, else l (NaN).
RLKERN_INLINE vfloat nan_grad(vfloat l, vfloat g) { return pick(eq(l, l), g, l); }

// 1 / (1 + e^-z) and 1 - that, stable for any z (e = e^-|z| <= 1); NaN z gives NaN through z - z.
RLKERN_INLINE void sigmoid2(vfloat z, vfloat& s, vfloat& one_minus_s) {
  const vfloat e = vexp_nonpos(vmin_nan(z, -z)) + (z - z);
  const vfloat inv = splat(1.f) / (splat(1.f) + e);
  const vfloat pos = gt(z, splat(0.f)) + eq(z, splat(0.f));  // z >= 0
  s = pick(pos, inv, e * inv);
  one_minus_s = pick(pos, e * inv, inv);
}

// x = logp, y = old_logp, a = advantage, z = ref_logp, q = the block's importance ratio.
// kDual: the dual clip is on (c finite); off, the loss is clip1 itself, as rlkern.reference does
// without dual_clip (no min with -A * inf). V: the per-token surrogate (rlkern/codes.py LOSS_VARIANTS).
template <bool kRef, bool kBiasCorrected, bool kDual, int64_t V>
RLKERN_INLINE TokenTerms policy_terms(vfloat x, vfloat y, vfloat a, vfloat z, const Ratio& q, const Consts& c,
                                      const RowExtra& e) {
  TokenTerms t;
  const vfloat ratio = q.ratio;
  const vfloat neg_a = -a;
  t.dgrad = t.rgrad = t.clipped = t.clip_high = t.clip_low = t.dual = splat(0.f);
  if constexpr (V == kVariantPpo) {
    // verl core_algos.py::compute_policy_loss_vanilla; TRL grpo_trainer.py::_compute_loss with
    // `coef_1 = torch.clamp(coef_1, max=self.args.delta)` in the unclipped branch (delta = +inf: off).
    const vfloat r1 = c.delta < ratio ? c.delta : ratio;  // torch.clamp(max=): a NaN ratio stays NaN
    const vfloat r1_pass = splat(1.f) - gt(ratio, c.delta);
    const vfloat rc = clamp_const(ratio, c.lo, c.hi);  // the ratio bounds are finite (checked)
    const vfloat rc_pass = eq(rc, ratio);
    const vfloat pg1 = neg_a * r1, pg2 = neg_a * rc;
    const vfloat a1 = max_share(pg1, pg2);
    // torch.maximum: pg1 and pg2 are NaN together (ratio >= e^-20 and rc >= 1 - clip_low are > 0, so
    // an infinite A gives +-inf in both, never 0 * inf), and a plain max returns a NaN pg1.
    const vfloat clip1 = pg1 < pg2 ? pg2 : pg1;
    const vfloat d_clip1 = neg_a * (a1 * r1_pass + (splat(1.f) - a1) * rc_pass);  // d clip1 / d ratio
    if constexpr (kDual) {
      // Dual clip: for A < 0, min(clip1, -A c).
      const vfloat pg3 = neg_a * c.dual;
      const vfloat neg = gt(splat(0.f), a);
      const vfloat b1 = max_share(pg3, clip1);  // torch.minimum share of clip1 = share of pg3 in a max
      t.dual = gt(clip1, pg3) * neg;
      t.loss = pick(t.dual, pg3, clip1);  // = where(A < 0, min(pg3, clip1), clip1); NaN clip1 -> NaN
      t.rgrad = pick(neg, d_clip1 * b1, d_clip1) * ratio;
    } else {
      t.loss = clip1;
      t.rgrad = d_clip1 * ratio;
    }
    t.clipped = gt(pg2, pg1);
    t.clip_high = gt(r1, c.hi) * gt(a, splat(0.f));
    t.clip_low = gt(c.lo, r1) * gt(splat(0.f), a);
    t.probe = clip1;
  } else if constexpr (V == kVariantCispo || V == kVariantCispoCap) {
    // cispo: verl compute_policy_loss_cispo, -sg(clamp(r, 1 - lo, 1 + hi)) A logp, clip flag r != clip(r);
    // cispo_cap: TRL _compute_loss loss_type="cispo", -sg(clamp(r, max=epsilon_high)) A logp, flag
    // (coef_1 > epsilon_high) & (A > 0) (TRL's cispo_clip_ratio).
    vfloat w;
    if constexpr (V == kVariantCispo) {
      w = clamp_const(ratio, c.lo, c.hi);
      t.clipped = splat(1.f) - eq(w, ratio);
    } else {
      w = c.cap < ratio ? c.cap : ratio;
      t.clipped = t.clip_high = gt(ratio, c.cap) * gt(a, splat(0.f));
    }
    const vfloat coef = -w * a;
    t.loss = coef * x;
    t.dgrad = coef;
    t.probe = t.loss;
  } else if constexpr (V == kVariantSapo) {
    // verl compute_policy_loss_sapo == TRL loss_type="sapo": -sigmoid(tau (r - 1)) 4 / tau A, tau =
    // tau_pos where A > 0 else tau_neg; d / d log r = -A 4 s (1 - s) r.
    const vfloat pos = gt(a, splat(0.f));
    const vfloat tau = pick(pos, c.tau_pos, c.tau_neg);
    vfloat s, s1;
    sigmoid2(tau * (ratio - splat(1.f)), s, s1);
    t.loss = -(s * pick(pos, c.four_pos, c.four_neg)) * a;
    t.rgrad = neg_a * splat(4.f) * s * s1 * ratio;
    t.probe = t.loss;
  } else if constexpr (V == kVariantVespo) {
    // TRL _compute_loss loss_type="vespo": -phi_seq A logp, phi detached (get_gamma_weights). The
    // clip_high slot carries phi itself for the vespo/phi_seq_mean stat (never NaN: nan_to_num).
    const vfloat phi = pick(gt(a, splat(0.f)) + eq(a, splat(0.f)), splat(e.phi_pos), splat(e.phi_neg));  // A >= 0
    const vfloat coef = -phi * a;
    t.loss = coef * x;
    t.dgrad = coef;
    t.clip_high = phi;
    t.probe = phi;
  } else if constexpr (V == kVariantGmpo) {
    // verl compute_policy_loss_geo_mean: the row's loss is set after the row (forward_rows); per token
    // d loss_b / d logp_t = loss_b / (n_b + 1e-8) * d m_t / d logp_t.
    vfloat dm, clipped;
    const vfloat m = gmpo_m(x - y, a, c, dm, clipped);
    t.loss = splat(0.f);
    t.dgrad = splat(e.gm_coef) * dm;
    t.clipped = clipped * gt(a, splat(0.f));
    t.dual = clipped * gt(splat(0.f), a);
    t.probe = m;
  } else if constexpr (V == kVariantDro) {
    // verl compute_policy_loss_dro: -(logp A - beta / 2 (logp - old)^2), the log-ratio unclamped.
    const vfloat d = x - y;
    t.loss = x * neg_a + splat(0.5f) * c.beta * d * d;
    t.dgrad = neg_a + c.beta * d;
    t.probe = t.loss;
  } else {
    static_assert(V == kVariantGpg, "unknown variant");
    // verl compute_policy_loss_gpg: -logp A.
    t.loss = x * neg_a;
    t.dgrad = neg_a;
    t.probe = t.loss;
  }
  // gmpo: a NaN token's gradient is NaN through the row coefficient (its m makes the row sum NaN).
  if constexpr (V != kVariantGmpo) t.dgrad = nan_grad(t.loss, t.dgrad);  // rgrad: routed by the level
  // verl's geo_mean and dro report the unclamped log-ratio as ppo_kl (the token level clamps it).
  if constexpr (V == kVariantGmpo || V == kVariantDro) t.neg_log_ratio = y - x;
  else t.neg_log_ratio = q.neg_log_ratio;
  t.k3 = t.kl_d = t.kl_r = splat(0.f);
  if constexpr (kRef) {
    if (!c.ref) return t;
    const vfloat d_raw = z - x;
    const vfloat d = clamp_const(d_raw, splat(-20.f), splat(20.f));
    const vfloat d_pass = eq(d, d_raw);
    const vfloat ed = vexp_nonpos(d);  // k3 is NaN through d; d_k3 through d - d
    t.k3 = ed - d - splat(1.f);
    // d k3 / d logp = -(e^d - 1) d d/d logp
    const vfloat d_k3 = (splat(1.f) - ed) * d_pass + (d - d);
    if constexpr (kBiasCorrected) {
      // k3 r: d/d logp = d_k3 r (here) + k3 r d log r / d logp (routed by the ratio level). The k3
      // stat reports the corrected term, as TRL's `kl` metric does.
      t.kl_d = d_k3 * ratio;
      t.kl_r = t.k3 * ratio;
      t.k3 = t.k3 * ratio;
    } else {
      t.kl_d = d_k3;
    }
  }
  return t;
}

// x = v, y = v_old, a = returns.
RLKERN_INLINE TokenTerms value_terms(vfloat v, vfloat v_old, vfloat ret, const Consts& c) {
  TokenTerms t;
  const vfloat lo = v_old - c.clip, hi = v_old + c.clip;
  const vfloat vc = clampv(v, lo, hi);
  const vfloat vc_pass = eq(vc, v);
  const vfloat e1 = v - ret, e2 = vc - ret;
  const vfloat l1 = e1 * e1, l2 = e2 * e2;
  const vfloat a1 = max_share(l1, l2);
  t.loss = splat(0.5f) * vmax_nan(l1, l2);
  // 1/2 d(e^2) = e de. The clamp's pass is a select, as in torch.clamp's backward: an infinite old
  // value or return must give 0 there, not 0 * inf = NaN. A NaN token's gradient is NaN.
  t.dgrad = nan_grad(t.loss, a1 * e1 + pick(vc_pass, (splat(1.f) - a1) * e2, splat(0.f)));
  t.rgrad = splat(0.f);
  t.clipped = gt(l2, l1);
  t.probe = t.loss;
  t.clip_high = t.clip_low = t.dual = splat(0.f);
  t.neg_log_ratio = t.k3 = t.kl_d = t.kl_r = splat(0.f);
  return t;
}

template <typename T>
struct Rows {
  const T* x;
  const T* y;
  const T* a;  // advantages / returns: [B, T], or [B] when a_per_row
  const T* z;  // ref_logp or nullptr
  const T* w;  // weights or nullptr
  const float* row_in;  // vespo / gmpo: a float32 log-weight per row, or nullptr
  const char* mask;  // any mask dtype, staged by `stage`
  int64_t mask_bytes;
  MaskStager stage;
  int64_t len;
  bool a_per_row;
  int64_t level;  // rlkern/codes.py RATIO_LEVELS
};

template <typename T>
struct Block {
  vfloat x, y, a, z, w;
  vfloat valid;  // 0/1, set by the caller from the staged mask
};

// A free function, not a lambda: lambdas called from a target_clones function are not cloned.
template <typename T>
RLKERN_INLINE vfloat load_at(const T* p, int64_t off, int64_t n) {
  return n == kLanes ? load16(p + off) : load_tail(p + off, n, 0.f);
}

template <typename T>
RLKERN_INLINE Block<T> load_block(const Rows<T>& r, int64_t b, int64_t t0, int64_t n) {
  const int64_t off = b * r.len + t0;
  Block<T> k;
  k.x = load_at(r.x, off, n);
  k.y = load_at(r.y, off, n);
  k.a = r.a_per_row ? splat(static_cast<float>(r.a[b])) : load_at(r.a, off, n);
  // No ref (the grpo kinds with beta = 0, TRL loading no reference model): not read (Consts::ref).
  k.z = r.z != nullptr ? load_at(r.z, off, n) : splat(0.f);
  k.w = r.w != nullptr ? load_at(r.w, off, n) : splat(1.f);
  return k;
}

// The row's importance ratio at the sequence levels (the first sweep of a row): s_b = sum of
// logp - old over valid tokens / max(n_b, 1), the log-ratio the tokens use (sequence: clamped to
// +-20, TRL's importance_sampling_level="sequence" after rlkern's usual clamp; sequence_token:
// min(s_b, 10), verl compute_policy_loss_gspo), its e^, and whether the clamp lets the gradient pass.
struct RowRatio {
  float mean, lr, ratio, pass, count, sum;  // sum: of logp - old over the valid tokens
  bool through_mean;  // sequence: the gradient flows through the mean (or the row is NaN)
};

RLKERN_INLINE RowRatio row_from_mean(float s, float count, int64_t level, float sum = 0.f) {
  RowRatio q;
  q.mean = s;
  q.count = count;
  q.sum = sum;
  if (level == kLevelSequence) {
    q.lr = std::isnan(s) ? s : std::clamp(s, -20.f, 20.f);
    q.pass = 0.f;  // the gradient goes through the mean: forward_rows' G_b
    q.through_mean = !(s < -20.f || s > 20.f);  // torch.clamp's backward (NaN: NaN flows)
  } else {
    q.lr = s > 10.f ? 10.f : s;  // torch.clamp(max=10.0): NaN stays NaN
    q.pass = s <= 10.f ? 1.f : 0.f;
    q.through_mean = false;
  }
  q.ratio = std::exp(q.lr);
  return q;
}

template <typename T>
RLKERN_INLINE RowRatio row_ratio(const Rows<T>& r, int64_t b, float* valid) {
  vfloat acc = splat(0.f), n = splat(0.f);
  for (int64_t c0 = 0; c0 < r.len; c0 += kChunk) {
    const int64_t cn = std::min<int64_t>(kChunk, r.len - c0);
    r.stage(r.mask + (b * r.len + c0) * r.mask_bytes, cn, valid);
    const int64_t live = live_end(valid, cn);
    for (int64_t t = 0; t < live; t += kLanes) {
      const int64_t m = std::min<int64_t>(kLanes, cn - t), off = b * r.len + c0 + t;
      const vfloat v = load16(valid + t);
      acc += keep(load_at(r.x, off, m) - load_at(r.y, off, m), v);
      n += v;
    }
  }
  const float count = hsum(n), sum = hsum(acc);
  return row_from_mean(sum / std::max(count, 1.f), count, r.level, sum);
}

// The ratio of one block: per token at the token level, the row's otherwise.
RLKERN_INLINE Ratio block_ratio(vfloat x, vfloat y, int64_t level, const RowRatio& row) {
  Ratio q;
  if (level == kLevelToken) {
    const vfloat lr_raw = x - y;
    q.lr = clamp_const(lr_raw, splat(-20.f), splat(20.f));
    q.pass = eq(q.lr, lr_raw);
    q.ratio = vexp_nonpos(q.lr) + (q.lr - q.lr);
    q.neg_log_ratio = -q.lr;
  } else {
    q.lr = splat(row.lr);
    q.pass = splat(row.pass);
    q.ratio = splat(row.ratio);
    q.neg_log_ratio = y - x;  // verl gspo's ppo_kl: the unclamped token log-ratio
  }
  return q;
}

template <int64_t K, int64_t V, bool kDual>
RLKERN_INLINE TokenTerms terms(vfloat x, vfloat y, vfloat a, vfloat z, const Ratio& q, const Consts& c,
                               const RowExtra& e) {
  if constexpr (K == kLossValue) return value_terms(x, y, a, c);
  else return policy_terms<K == kLossGrpo || K == kLossGrpoBc, K == kLossGrpoBc, kDual, V>(x, y, a, z, q, c, e);
}

// The variants whose tokens need their row's values first (RowExtra).
template <int64_t V>
constexpr bool kRowExtra = V == kVariantVespo || V == kVariantGmpo;

// vespo: phi = exp(lam + k log w - lam w), NaN and +-inf -> 0 (TRL's nan_to_num(0, 0, 0)).
RLKERN_INLINE float vespo_phi(float log_w, float k, float lam) {
  const float phi = std::exp(lam + k * log_w - lam * std::exp(log_w));
  return std::isfinite(phi) ? phi : 0.f;
}

// The first sweep of a vespo / gmpo row (TRL get_gamma_weights; verl compute_policy_loss_geo_mean).
template <int64_t V, typename T>
RLKERN_INLINE RowExtra row_extra(const Rows<T>& r, int64_t b, float* valid, const Consts& c) {
  vfloat acc = splat(0.f), acc_a = splat(0.f), n = splat(0.f);
  for (int64_t c0 = 0; c0 < r.len; c0 += kChunk) {
    const int64_t cn = std::min<int64_t>(kChunk, r.len - c0);
    r.stage(r.mask + (b * r.len + c0) * r.mask_bytes, cn, valid);
    const int64_t live = live_end(valid, cn);
    for (int64_t t = 0; t < live; t += kLanes) {
      const Block<T> k = load_block(r, b, c0 + t, std::min<int64_t>(kLanes, cn - t));
      const vfloat v = load16(valid + t);
      if constexpr (V == kVariantVespo) {
        acc += keep(clamp_const(k.x - k.y, splat(-20.f), splat(20.f)), v);
      } else {
        vfloat dm, clipped;
        acc += keep(gmpo_m(k.x - k.y, k.a, c, dm, clipped), v);
        acc_a += keep(k.a, v);
        n += v;
      }
    }
  }
  const float in = r.row_in != nullptr ? r.row_in[b] : 0.f;
  RowExtra e;
  if constexpr (V == kVariantVespo) {
    const float s = hsum(acc) + in;
    const float lo = static_cast<float>(std::log(1e-8));  // TRL: math.log(1e-8), a float32 bound
    const float log_w = std::isnan(s) ? s : std::clamp(s, lo, 20.f);
    e.phi_pos = vespo_phi(log_w, c.k_pos, c.lam_pos);
    e.phi_neg = vespo_phi(log_w, c.k_neg, c.lam_neg);
  } else {
    const float len = hsum(n) + 1e-8f;
    e.gm_loss = -(hsum(acc_a) / len) * std::exp(hsum(acc) / len) * (r.row_in != nullptr ? std::exp(in) : 1.f);
    e.gm_coef = e.gm_loss / len;
  }
  return e;
}

// A token's gradient w * d l / d x + beta * d k3 / d x, except (at the sequence level) the part through
// the row mean, which is the same for every token of the row (RowGrad). torch.clamp's backward selects
// (0 where the clamp is active), so an infinite A times a clamped log-ratio gives 0 there, not 0 * inf.
template <int64_t K, int64_t V>
RLKERN_INLINE vfloat token_grad(const TokenTerms& t, vfloat w, vfloat pass, const Consts& c) {
  vfloat g;
  if constexpr (K == kLossValue || V == kVariantCispo || V == kVariantCispoCap || V == kVariantGpg ||
                V == kVariantVespo || V == kVariantGmpo || V == kVariantDro)
    g = w * t.dgrad;
  else g = w * nan_grad(t.loss, pick(pass, t.rgrad, splat(0.f)));
  if constexpr (K == kLossGrpoBc) return c.ref ? g + c.beta * (t.kl_d + t.kl_r * pass) : g;
  else if constexpr (K == kLossGrpo) return c.ref ? g + c.beta * t.kl_d : g;
  else return g;
}

// d loss / d log r_b of one block, summed over a row at the sequence level (0 for the others).
template <int64_t K, int64_t V>
RLKERN_INLINE vfloat ratio_grad(const TokenTerms& t, vfloat w, const Consts& c) {
  vfloat g = splat(0.f);
  if constexpr (K != kLossValue && (V == kVariantPpo || V == kVariantSapo)) g = w * nan_grad(t.loss, t.rgrad);
  if constexpr (K == kLossGrpoBc)
    if (c.ref) g = g + c.beta * t.kl_r;
  return g;
}

// The per-row partial sums kind K reports (rlkern/ops/losses.py reads only these stats; the others
// are written as 0): policy: clip fraction, dual-clip fraction (with the dual clip), approx_kl;
// grpo: clip_low / clip_high, approx_kl, k3; value: clip fraction. A flag that is not summed is
// never computed (the token terms are inlined and its value is dead code), and neither is one the
// variant never sets (policy_terms: sapo, gpg and dro clip nothing; only ppo has clip_low).
template <int64_t K, int64_t V, bool kDual>
constexpr bool reports(int p) {
  const bool grpo = K == kLossGrpo || K == kLossGrpoBc;
  switch (p) {
    case kLossSum: case kCount: return true;
    case kClipped: return !grpo && V != kVariantSapo && V != kVariantGpg && V != kVariantDro;
    case kClipHigh: return grpo && V != kVariantSapo;
    case kClipLow: return grpo && V == kVariantPpo;
    case kK3: return grpo;
    case kDualFlag: return K == kLossPolicy && (kDual || V == kVariantGmpo);
    case kNegLogRatio: return K != kLossValue;
    default: return false;
  }
}

// Row-constant rows: at the sequence level with per-row advantages, no weights and no KL term (no ref),
// the ppo / sapo surrogate reads a token only through the row's ratio r_b, so every valid token of
// the row has the same loss, flags and gradient. The row's sums are n_b times one token's, from the
// one sweep that found s_b (row_ratio): one read of logp, old and the mask instead of two. The
// per-token gradient is all in G_b (no part per token: the ratio's own pass is 0 at this level), so
// rlkern/ops/losses.py saves nothing and the backward writes grad * scale_b * G_b at valid tokens.
template <int64_t K, int64_t V, typename T>
RLKERN_INLINE bool row_constant(const Rows<T>& r) {
  if constexpr (K == kLossValue || (V != kVariantPpo && V != kVariantSapo)) return false;
  else return r.level == kLevelSequence && r.a_per_row && r.w == nullptr && r.z == nullptr;
}

RLKERN_INLINE float lane0(vfloat v) { return v[0]; }

template <int64_t K, int64_t V, bool kDual, typename T>
RLKERN_INLINE void row_constant_sums(const Rows<T>& r, int64_t b, const RowRatio& row, const Consts& c,
                                     float* p, float* aux) {
  Ratio q;
  q.lr = splat(row.lr);
  q.pass = splat(0.f);
  q.ratio = splat(row.ratio);
  q.neg_log_ratio = splat(0.f);
  // x = y = z = 0: the surrogate does not read them at this level, and there is no KL term.
  const vfloat zero = splat(0.f);
  const TokenTerms t = terms<K, V, kDual>(zero, zero, splat(static_cast<float>(r.a[b])), zero, q, c, RowExtra{});
  const float n = row.count, loss = lane0(t.loss);
  for (int i = 0; i < kPartials; ++i) p[i] = 0.f;
  p[kCount] = n;
  if (n > 0) {
    p[kLossSum] = n * loss;
    p[kProbeOk] = lane0(t.probe) == lane0(t.probe) ? n : 0.f;
    if constexpr (reports<K, V, kDual>(kClipped)) p[kClipped] = n * lane0(t.clipped);
    if constexpr (reports<K, V, kDual>(kClipHigh)) p[kClipHigh] = n * lane0(t.clip_high);
    if constexpr (reports<K, V, kDual>(kClipLow)) p[kClipLow] = n * lane0(t.clip_low);
    if constexpr (reports<K, V, kDual>(kDualFlag)) p[kDualFlag] = n * lane0(t.dual);
    if (p[kProbeOk] != n)
      for (int i : {kClipped, kClipHigh, kClipLow, kDualFlag}) p[i] = std::numeric_limits<float>::quiet_NaN();
  }
  p[kNegLogRatio] = -row.sum;  // verl gspo's ppo_kl: the unclamped token log-ratios, summed
  // G_b = pass_b * d l / d log r_b (the mean over n_b tokens of one value); NaN where the loss is, as
  // the per-token part it stands in for would be.
  const float rg = lane0(ratio_grad<K, V>(t, splat(1.f), c));
  aux[2 * b] = row.mean;
  aux[2 * b + 1] = loss != loss ? loss : (row.through_mean && n > 0 ? rg : 0.f);
}

// With kSave the forward also writes each token's unscaled gradient (token_grad, float32, unmasked; not
// written after a chunk's live_end, which the backward never reads) into `saved`, so that the backward
// is one elementwise pass (backward_saved) instead of a second
// evaluation of every token's terms. The product order is the backward's, so the result is bitwise the
// same. At the sequence levels a first sweep of the row finds its ratio (row_ratio), and `aux` gets
// (log r_b, the row-mean gradient G_b = pass_b / n_b * sum_t d loss_t / d log r_b) per row.
template <typename T, int64_t K, int64_t V, bool kDual, bool kSave>
RLKERN_INLINE void forward_rows(int64_t begin, int64_t end, const Rows<T>& r, const Consts& c, float* partial,
                                float* saved, float* aux) {
  alignas(64) float valid[kChunk];
  for (int64_t b = begin; b < end; ++b) {
    RowRatio row{0.f, 0.f, 1.f, 0.f, 0.f, 0.f, false};
    if (r.level != kLevelToken) row = row_ratio(r, b, valid);
    if (row_constant<K, V>(r)) {
      row_constant_sums<K, V, kDual>(r, b, row, c, partial + b * kPartials, aux);
      // Their per-token part is 0 (rlkern/ops/losses.py saves nothing for them; a direct caller may).
      if constexpr (kSave) std::fill(saved + b * r.len, saved + (b + 1) * r.len, 0.f);
      continue;
    }
    RowExtra e;
    if constexpr (kRowExtra<V>) e = row_extra<V>(r, b, valid, c);
    vfloat acc[kPartials];
    for (auto& v : acc) v = splat(0.f);
    vfloat acc_rg = splat(0.f);
    for (int64_t c0 = 0; c0 < r.len; c0 += kChunk) {
      const int64_t cn = std::min<int64_t>(kChunk, r.len - c0);
      r.stage(r.mask + (b * r.len + c0) * r.mask_bytes, cn, valid);
      const int64_t live = live_end(valid, cn);
      for (int64_t t = 0; t < live; t += kLanes) {
        Block<T> k = load_block(r, b, c0 + t, std::min<int64_t>(kLanes, cn - t));
        k.valid = load16(valid + t);
        const Ratio q = block_ratio(k.x, k.y, r.level, row);
        const TokenTerms tt = terms<K, V, kDual>(k.x, k.y, k.a, k.z, q, c, e);
        // Selects, not products with the mask: 0 * NaN from padding would poison the sums (the flags
        // too are NaN where a token's surrogate is).
        const vfloat v = k.valid;
        // k.w is 1 without weights; the KL term: the grpo kinds with a ref only.
        vfloat weighted = tt.loss * k.w;
        if constexpr (K == kLossGrpo || K == kLossGrpoBc)
          if (c.ref) weighted = weighted + c.beta * tt.k3;
        if constexpr (kSave) {
          const int64_t n = std::min<int64_t>(kLanes, cn - t), at = b * r.len + c0 + t;
          const vfloat gx = token_grad<K, V>(tt, k.w, q.pass, c);
          if (n == kLanes) store16(saved + at, gx);
          else store_tail(saved + at, gx, n);
        }
        if (r.level == kLevelSequence) acc_rg += keep(ratio_grad<K, V>(tt, k.w, c), v);
        acc[kLossSum] += keep(weighted, v);
        acc[kCount] += v;
        if constexpr (reports<K, V, kDual>(kClipped)) acc[kClipped] += keep(tt.clipped, v);
        if constexpr (reports<K, V, kDual>(kClipHigh)) acc[kClipHigh] += keep(tt.clip_high, v);
        if constexpr (reports<K, V, kDual>(kClipLow)) acc[kClipLow] += keep(tt.clip_low, v);
        if constexpr (reports<K, V, kDual>(kDualFlag)) acc[kDualFlag] += keep(tt.dual, v);
        if constexpr (reports<K, V, kDual>(kNegLogRatio)) acc[kNegLogRatio] += keep(tt.neg_log_ratio, v);
        if constexpr (reports<K, V, kDual>(kK3))
          if (c.ref) acc[kK3] += keep(tt.k3, v);
        acc[kProbeOk] += keep(eq(tt.probe, tt.probe), v);
      }
    }
    float* p = partial + b * kPartials;
    for (int i = 0; i < kPartials; ++i) p[i] = hsum(acc[i]);
    // A valid token whose flags' probe is NaN makes the row's flag sums NaN (as a NaN flag would).
    if (p[kProbeOk] != p[kCount])
      for (int i : {kClipped, kClipHigh, kClipLow, kDualFlag}) p[i] = std::numeric_limits<float>::quiet_NaN();
    if constexpr (V == kVariantGmpo) p[kLossSum] = e.gm_loss;  // the row's loss (its tokens' are 0)
    // vespo, per-row advantages: TRL averages phi over all rows, an all-padding one included.
    if constexpr (V == kVariantVespo)
      if (r.a_per_row && p[kCount] == 0) p[kClipHigh] = static_cast<float>(r.a[b]) >= 0 ? e.phi_pos : e.phi_neg;
    // (s_b, G_b); torch.clamp's backward: G_b = 0 where the row's clamp is active (a select, never
    // 0 * inf). Zeros at the token level: every output is written.
    aux[2 * b] = r.level != kLevelToken ? row.mean : 0.f;
    aux[2 * b + 1] = row.through_mean && row.count > 0 ? hsum(acc_rg) / row.count : 0.f;
  }
}

template <typename T, int64_t K, int64_t V, bool kDual>
RLKERN_INLINE void backward_rows(int64_t begin, int64_t end, const Rows<T>& r, const Consts& c, float grad,
                                 const float* scale, const float* aux, T* out) {
  alignas(64) float valid[kChunk];
  for (int64_t b = begin; b < end; ++b) {
    const vfloat g = splat(grad * scale[b]);
    RowRatio row{0.f, 0.f, 1.f, 0.f, 0.f, 0.f, false};
    vfloat row_add = splat(0.f);
    if (r.level != kLevelToken) {
      row = row_from_mean(aux[2 * b], 0.f, r.level);
      row_add = splat(aux[2 * b + 1]);
    }
    RowExtra e;
    if constexpr (kRowExtra<V>) e = row_extra<V>(r, b, valid, c);
    for (int64_t c0 = 0; c0 < r.len; c0 += kChunk) {
      const int64_t cn = std::min<int64_t>(kChunk, r.len - c0);
      r.stage(r.mask + (b * r.len + c0) * r.mask_bytes, cn, valid);
      const int64_t live = live_end(valid, cn);
      for (int64_t t = 0; t < live; t += kLanes) {
        const int64_t n = std::min<int64_t>(kLanes, cn - t), t0 = c0 + t;
        const Block<T> k = load_block(r, b, t0, n);
        const Ratio q = block_ratio(k.x, k.y, r.level, row);
        const TokenTerms tt = terms<K, V, kDual>(k.x, k.y, k.a, k.z, q, c, e);
        const vfloat d = keep(g * (token_grad<K, V>(tt, k.w, q.pass, c) + row_add), load16(valid + t));
        if (n == kLanes) store16(out + b * r.len + t0, d);
        else store_tail(out + b * r.len + t0, d, n);
      }
      zero_padding(out + b * r.len + c0, live, cn);
    }
  }
}

// The backward from the forward's saved per-token gradients: d x = keep(grad * scale_b * (saved +
// add_b), mask), add_b the row-mean gradient of the sequence level (aux[2 b + 1]; absent: 0). No
// saved: the row-constant rows (row_constant_sums), whose per-token part is 0.
template <typename T>
RLKERN_INLINE void backward_saved_rows(int64_t begin, int64_t end, int64_t len, const float* saved, const char* mask,
                                       int64_t mask_bytes, MaskStager stage, float grad, const float* scale,
                                       const float* aux, T* out) {
  alignas(64) float valid[kChunk];
  for (int64_t b = begin; b < end; ++b) {
    const vfloat g = splat(grad * scale[b]);
    const bool add = aux != nullptr, has_saved = saved != nullptr;
    const vfloat row_add = splat(add ? aux[2 * b + 1] : 0.f);
    for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
      const int64_t cn = std::min<int64_t>(kChunk, len - c0);
      stage(mask + (b * len + c0) * mask_bytes, cn, valid);
      const int64_t live = live_end(valid, cn);
      for (int64_t t = 0; t < live; t += kLanes) {
        const int64_t n = std::min<int64_t>(kLanes, cn - t), at = b * len + c0 + t;
        vfloat x = splat(0.f);
        if (has_saved) x = n == kLanes ? load16(saved + at) : load_tail(saved + at, n, 0.f);
        if (add) x = x + row_add;
        const vfloat d = keep(g * x, load16(valid + t));
        if (n == kLanes) store16(out + at, d);
        else store_tail(out + at, d, n);
      }
      zero_padding(out + b * len + c0, live, cn);
    }
  }
}
#define RLKERN_SAVED_KERNEL(T, SUFFIX)                                                                     \
  RLKERN_CLONES void backward_saved_##SUFFIX(int64_t b, int64_t e, int64_t len, const float* sv, const char* m, \
                                             int64_t mb, MaskStager st, float g, const float* s,            \
                                             const float* ax, T* out) {                                     \
    backward_saved_rows<T>(b, e, len, sv, m, mb, st, g, s, ax, out);                                       \
  }                                                                                                       \
  void backward_saved_any(int64_t b, int64_t e, int64_t len, const float* sv, const char* m, int64_t mb,   \
                          MaskStager st, float g, const float* s, const float* ax, T* out) {               \
    backward_saved_##SUFFIX(b, e, len, sv, m, mb, st, g, s, ax, out);                                      \
  }
RLKERN_SAVED_KERNEL(float, f32)
RLKERN_SAVED_KERNEL(c10::BFloat16, bf16)
RLKERN_SAVED_KERNEL(c10::Half, f16)
#undef RLKERN_SAVED_KERNEL

// One clone set per (storage type, kind, variant, dual clip on/off), each covering a range of rows so
// the CPU-feature dispatch is paid once per thread chunk. The dual clip exists for the policy kind's
// ppo variant only; the ratio level is a runtime switch (one branch per row and block).
#define RLKERN_LOSS_KERNELS(T, SUFFIX, K, V, D)                                                            \
  RLKERN_CLONES void forward_##SUFFIX##_##K##_##V##_##D(int64_t b, int64_t e, const Rows<T>& r,           \
                                                        const Consts& c, float* partial, float* saved,     \
                                                        float* aux) {                                      \
    if (saved != nullptr) forward_rows<T, K, V, D, true>(b, e, r, c, partial, saved, aux);                 \
    else forward_rows<T, K, V, D, false>(b, e, r, c, partial, nullptr, aux);                               \
  }                                                                                                       \
  RLKERN_CLONES void backward_##SUFFIX##_##K##_##V##_##D(int64_t b, int64_t e, const Rows<T>& r,          \
                                                         const Consts& c, float g, const float* s,         \
                                                         const float* aux, T* out) {                       \
    backward_rows<T, K, V, D>(b, e, r, c, g, s, aux, out);                                                \
  }                                                                                                       \
  void forward_kind(int64_t b, int64_t e, const Rows<T>& r, const Consts& c, float* p, float* sv, float* ax, \
                    std::integral_constant<int64_t, K>, std::integral_constant<int64_t, V>,                \
                    std::bool_constant<D>) {                                                               \
    forward_##SUFFIX##_##K##_##V##_##D(b, e, r, c, p, sv, ax);                                             \
  }                                                                                                       \
  void backward_kind(int64_t b, int64_t e, const Rows<T>& r, const Consts& c, float g, const float* s,    \
                     const float* ax, T* out, std::integral_constant<int64_t, K>,                          \
                     std::integral_constant<int64_t, V>, std::bool_constant<D>) {                          \
    backward_##SUFFIX##_##K##_##V##_##D(b, e, r, c, g, s, ax, out);                                        \
  }
#define RLKERN_LOSS_KINDS(T, SUFFIX)                                          \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossPolicy, kVariantPpo, false)             \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossPolicy, kVariantPpo, true)              \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossPolicy, kVariantCispo, false)           \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossPolicy, kVariantCispoCap, false)        \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossPolicy, kVariantSapo, false)            \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossPolicy, kVariantGpg, false)             \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossPolicy, kVariantGmpo, false)            \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossPolicy, kVariantDro, false)             \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossGrpo, kVariantPpo, false)               \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossGrpo, kVariantCispoCap, false)          \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossGrpo, kVariantSapo, false)              \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossGrpo, kVariantVespo, false)             \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossGrpoBc, kVariantPpo, false)             \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossGrpoBc, kVariantCispoCap, false)        \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossGrpoBc, kVariantSapo, false)            \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossGrpoBc, kVariantVespo, false)           \
  RLKERN_LOSS_KERNELS(T, SUFFIX, kLossValue, kVariantPpo, false)
RLKERN_LOSS_KINDS(float, f32)
RLKERN_LOSS_KINDS(c10::BFloat16, bf16)
RLKERN_LOSS_KINDS(c10::Half, f16)
#undef RLKERN_LOSS_KINDS
#undef RLKERN_LOSS_KERNELS

// Calls f(integral_constant<kind>, integral_constant<variant>, bool_constant<dual clip on>) for the
// combinations compiled above: policy: ppo, cispo, cispo_cap, sapo, gpg, gmpo, dro (the dual clip with
// ppo only); grpo / grpo_bc: ppo, cispo_cap (TRL's cispo), sapo, vespo; value: ppo only.
template <typename F>
void dispatch_kind(int64_t kind, int64_t variant, double dual_clip, F&& f) {
  using std::bool_constant;
  const bool dual = dual_clip != std::numeric_limits<double>::infinity();
  TORCH_CHECK((kind == kLossPolicy && variant == kVariantPpo) || !dual,
              "dual_clip applies to the policy kind's ppo variant only (the others take +inf), got ", dual_clip);
  auto kv = [&](auto k, auto v) { f(k, v, bool_constant<false>{}); };
  using P = std::integral_constant<int64_t, kVariantPpo>;
  using CI = std::integral_constant<int64_t, kVariantCispo>;
  using CC = std::integral_constant<int64_t, kVariantCispoCap>;
  using S = std::integral_constant<int64_t, kVariantSapo>;
  using G = std::integral_constant<int64_t, kVariantGpg>;
  using VE = std::integral_constant<int64_t, kVariantVespo>;
  using GM = std::integral_constant<int64_t, kVariantGmpo>;
  using DR = std::integral_constant<int64_t, kVariantDro>;
  // all: the policy kind, which also has cispo, gpg, gmpo and dro; the grpo kinds have vespo (a
  // compile-time flag, so no kind instantiates the other's).
  auto variants = [&](auto k, auto all) {
    switch (variant) {
      case kVariantPpo: kv(k, P{}); return;
      case kVariantCispoCap: kv(k, CC{}); return;
      case kVariantSapo: kv(k, S{}); return;
      case kVariantCispo:
        if constexpr (decltype(all)::value) { kv(k, CI{}); return; }
        break;
      case kVariantGpg:
        if constexpr (decltype(all)::value) { kv(k, G{}); return; }
        break;
      case kVariantGmpo:
        if constexpr (decltype(all)::value) { kv(k, GM{}); return; }
        break;
      case kVariantDro:
        if constexpr (decltype(all)::value) { kv(k, DR{}); return; }
        break;
      case kVariantVespo:
        if constexpr (!decltype(all)::value) { kv(k, VE{}); return; }
        break;
      default: break;
    }
    TORCH_CHECK(false, "variant ", variant, " is not compiled for kind ", kind,
                " (policy: 0-4, 6 gmpo, 7 dro; grpo, grpo_bc: 0 ppo, 2 cispo_cap, 3 sapo, 5 vespo; value: 0)");
  };
  switch (kind) {
    case kLossPolicy:
      if (dual) f(std::integral_constant<int64_t, kLossPolicy>{}, P{}, bool_constant<true>{});
      else variants(std::integral_constant<int64_t, kLossPolicy>{}, std::true_type{});
      break;
    case kLossGrpo: variants(std::integral_constant<int64_t, kLossGrpo>{}, std::false_type{}); break;
    case kLossGrpoBc: variants(std::integral_constant<int64_t, kLossGrpoBc>{}, std::false_type{}); break;
    case kLossValue:
      TORCH_CHECK(variant == kVariantPpo, "the value kind has no variants, got ", variant);
      kv(std::integral_constant<int64_t, kLossValue>{}, P{});
      break;
    default: TORCH_CHECK(false, "kind must be 0 (policy), 1 (grpo), 2 (value) or 3 (grpo_bc), got ", kind);
  }
}

// The rows of a [..., T] tensor: the product of its leading dims.
int64_t rows_in(const at::Tensor& x) { return c10::multiply_integers(x.sizes().slice(0, x.dim() - 1)); }

int64_t rows_per_task(int64_t len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1)); }

// Checks the token tensors ([..., T], contiguous; advantages [..., T] or [...]) and returns the row view.
template <typename T>
Rows<T> rows_of(int64_t kind, int64_t level, const at::Tensor& x, const at::Tensor& y, const at::Tensor& a,
                const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& w, const at::Tensor& mask,
                int64_t variant, const std::optional<at::Tensor>& row_in) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "x must be a contiguous [..., T] tensor");
  const int64_t L = x.size(-1);
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == x.sizes() && t.is_contiguous() && t.scalar_type() == x.scalar_type(), name,
                " must be a contiguous tensor of x's shape ", x.sizes(), " and dtype ", x.scalar_type());
  };
  same(y, "old");
  const bool per_row = a.dim() == x.dim() - 1;
  if (per_row) {
    TORCH_CHECK(kind != kLossValue && a.sizes() == x.sizes().slice(0, x.dim() - 1) && a.is_contiguous() &&
                    a.scalar_type() == x.scalar_type(),
                "per-row advantages must be a contiguous tensor of x's leading shape and dtype");
  } else {
    same(a, "advantages / returns");
  }
  const bool grpo = kind == kLossGrpo || kind == kLossGrpoBc;
  TORCH_CHECK(grpo || !z.has_value(), "ref_logp is used by the grpo kinds only (absent: no KL term)");
  if (z) same(*z, "ref_logp");
  TORCH_CHECK(!w || kind != kLossValue, "weights are supported by the policy and grpo kinds only");
  if (w) same(*w, "weights");
  TORCH_CHECK(mask.sizes() == x.sizes() && mask.is_contiguous(), "mask must be a contiguous tensor of x's shape ",
              x.sizes());
  TORCH_CHECK(level == kLevelToken || level == kLevelSequence || level == kLevelSequenceToken,
              "level must be 0 (token), 1 (sequence) or 2 (sequence_token), got ", level);
  TORCH_CHECK(level == kLevelToken || kind != kLossValue, "the value kind has no ratio level");
  TORCH_CHECK(level == kLevelToken || (variant != kVariantGmpo && variant != kVariantDro),
              "gmpo and dro have the token level only");
  TORCH_CHECK(!w || variant != kVariantGmpo, "gmpo takes its weights as row_in (their log geometric mean)");
  const bool extra = variant == kVariantVespo || variant == kVariantGmpo;
  TORCH_CHECK(!row_in || (extra && row_in->scalar_type() == at::kFloat && row_in->is_contiguous() &&
                          row_in->numel() == c10::multiply_integers(x.sizes().slice(0, x.dim() - 1))),
              "row_in is vespo's / gmpo's only: a contiguous float32 tensor with one entry per row");
  MaskStager stage = nullptr;
  dispatch_mask_type(mask.scalar_type(), "mask", [&](auto mtag) { stage = mask_stager<decltype(mtag)>(); });
  return {static_cast<const T*>(x.data_ptr()), static_cast<const T*>(y.data_ptr()),
          static_cast<const T*>(a.data_ptr()),  z ? static_cast<const T*>(z->data_ptr()) : nullptr,
          w ? static_cast<const T*>(w->data_ptr()) : nullptr, row_in ? row_in->data_ptr<float>() : nullptr,
          static_cast<const char*>(mask.const_data_ptr()), mask.element_size(), stage, L, per_row, level};
}

Consts consts_of(double clip_low, double clip_high, double dual_clip, double beta, double value_clip, double delta,
                 double tau_pos, double tau_neg, double k_pos = 2.0, double lam_pos = 3.0, double k_neg = 3.0,
                 double lam_neg = 2.0) {
  // The ratio bounds 1 - clip_low > 0 and 1 + clip_high are finite: clamp_const and the plain max of
  // policy_terms rely on it.
  TORCH_CHECK(clip_low >= 0 && clip_low < 1 && clip_high >= 0 && std::isfinite(clip_high),
              "clip_low must be in [0, 1) and clip_high a finite number >= 0, got ", clip_low, " and ", clip_high);
  TORCH_CHECK(delta > 0 && tau_pos > 0 && tau_neg > 0 && std::isfinite(tau_pos) && std::isfinite(tau_neg),
              "delta (+inf: off) and the sapo temperatures must be > 0, got ", delta, ", ", tau_pos, ", ", tau_neg);
  auto f = [](double v) { return splat(static_cast<float>(v)); };
  // TRL: sigmoid(...) * 4 / temperatures, in float32.
  // vespo: TRL clamps lambda to >= 1e-4 (torch.where(...).clamp(min=1e-4)).
  auto lam = [](double v) { return std::max(static_cast<float>(v), 1e-4f); };
  return {f(1.0 - clip_low), f(clip_high + 1.0), f(dual_clip), f(beta), f(value_clip), f(clip_high), f(delta),
          f(tau_pos), f(tau_neg), f(4.0f / static_cast<float>(tau_pos)), f(4.0f / static_cast<float>(tau_neg)),
          f(-clip_low), static_cast<float>(k_pos), lam(lam_pos), static_cast<float>(k_neg), lam(lam_neg)};
}

float* f32_out(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, name,
              " must be a contiguous float32 tensor of ", n, " elements");
  return t.data_ptr<float>();
}

}  // namespace

// denom > 0: that constant; denom == -1: the number of valid tokens; denom == -2: the number of rows
// with at least one valid token. Whatever it is, at least 1, so an all-padding batch gives loss 0.
// row_aux ([..., 2] float32): per row the mean log-ratio s_b and the row-mean gradient G_b at the
// sequence levels (read by losses_bwd and losses_bwd_saved); zeros at the token level.
// At the sequence level with per-row advantages, the clip stats are means over all rows of each row's
// flag share (TRL's global_masked_mean of a (B, 1) tensor); otherwise masked token means.
void losses_fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const std::optional<at::Tensor>& z,
                const std::optional<at::Tensor>& w, const at::Tensor& mask, int64_t kind, double clip_low, double clip_high,
                double dual_clip, double beta, double value_clip, bool per_row_mean, double denom, at::Tensor loss,
                at::Tensor stats, at::Tensor row_scale, const std::optional<at::Tensor>& saved, int64_t variant,
                int64_t level, double delta, double tau_pos, double tau_neg, at::Tensor row_aux,
                const std::optional<at::Tensor>& row_in, double vespo_k_pos, double vespo_lambda_pos,
                double vespo_k_neg, double vespo_lambda_neg) {
  TORCH_CHECK(denom > 0 || denom == -1 || denom == -2, "denom must be > 0, -1 (token count) or -2 (row count)");
  TORCH_CHECK(x.dim() >= 1, "x must be a [..., T] tensor, got a 0-d tensor");
  const int64_t B = rows_in(x);
  float* loss_ptr = f32_out(loss, 1, "loss");
  float* stats_ptr = f32_out(stats, kLossStats, "stats");
  float* scale_ptr = f32_out(row_scale, B, "row_scale");
  float* aux_ptr = f32_out(row_aux, 2 * B, "row_aux");
  Consts c = consts_of(clip_low, clip_high, dual_clip, beta, value_clip, delta, tau_pos, tau_neg, vespo_k_pos,
                       vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg);
  c.ref = z.has_value();
  std::vector<float> partial(static_cast<size_t>(B) * kPartials, 0.f);
  float* saved_ptr = nullptr;
  if (saved) {
    TORCH_CHECK(saved->scalar_type() == at::kFloat && saved->is_contiguous() && saved->sizes() == x.sizes(),
                "saved must be a contiguous float32 tensor of x's shape");
    saved_ptr = saved->data_ptr<float>();
  }
  bool a_per_row = false;
  dispatch_storage_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const Rows<T> r = rows_of<T>(kind, level, x, y, a, z, w, mask, variant, row_in);
    a_per_row = r.a_per_row;
    dispatch_kind(kind, variant, dual_clip, [&](auto k, auto v, auto dual) {
      at::parallel_for(0, B, rows_per_task(r.len), [&](int64_t b, int64_t e) {
        forward_kind(b, e, r, c, partial.data(), saved_ptr, aux_ptr, k, v, dual);
      });
    });
  });
  // Fixed-order combination in double: the loss does not depend on how rows were split over threads.
  // (vespo: its phi, in the clip_high slot, is per row with per-row advantages, as TRL logs it.)
  const bool flags_per_row = (level == kLevelSequence || variant == kVariantVespo) && a_per_row;
  const int flag_parts[] = {kClipped, kClipHigh, kClipLow, kDualFlag};
  double tokens = 0, live_rows = 0, sums[kPartials] = {};
  for (int64_t b = 0; b < B; ++b) {
    const float* p = partial.data() + b * kPartials;
    tokens += p[kCount];
    live_rows += p[kCount] > 0;
    for (int i = 0; i < kPartials; ++i) sums[i] += p[i];
    if (flags_per_row)
      for (int i : flag_parts) sums[i] += static_cast<double>(p[i]) / std::max<double>(p[kCount], 1.0) - p[i];
  }
  const double d = std::max(denom > 0 ? denom : denom == -1 ? tokens : live_rows, 1.0);
  double total = 0;
  for (int64_t b = 0; b < B; ++b) {
    const float* p = partial.data() + b * kPartials;
    const double s = (per_row_mean ? 1.0 / std::max<double>(p[kCount], 1.0) : 1.0) / d;
    scale_ptr[b] = static_cast<float>(s);
    total += s * p[kLossSum];
  }
  loss_ptr[0] = static_cast<float>(total);
  const double n = std::max(tokens, 1.0), rows = std::max<double>(static_cast<double>(B), 1.0);
  const int order[] = {kClipped, kClipHigh, kClipLow, kDualFlag, kNegLogRatio, kK3};
  for (std::size_t i = 0; i < std::size(order); ++i) {
    const bool flag = order[i] != kNegLogRatio && order[i] != kK3;
    stats_ptr[i] = static_cast<float>(sums[order[i]] / (flag && flags_per_row ? rows : n));
  }
  stats_ptr[std::size(order)] = stats_ptr[1] + stats_ptr[2];  // GRPO's clip_ratio: high + low
  stats_ptr[7] = 0.f;
}

// losses_fwd with its outputs allocated here, for rlkern/ops/losses.py's eager calls that build no
// autograd node: one call instead of five Python allocations (~20-40 us of a 1M-token GSPO forward,
// as each runs with the caches the kernel just swept). Returns (loss, stats, row_scale, row_aux,
// saved: x's shape in float32 when save_grad != 0, else a [0] tensor).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> losses_fwd_new(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& w, const at::Tensor& mask, int64_t kind, double clip_low, double clip_high,
    double dual_clip, double beta, double value_clip, bool per_row_mean, double denom, int64_t save_grad,
    int64_t variant, int64_t level, double delta, double tau_pos, double tau_neg,
    const std::optional<at::Tensor>& row_in, double vespo_k_pos, double vespo_lambda_pos, double vespo_k_neg,
    double vespo_lambda_neg, bool poison) {
  TORCH_CHECK(x.dim() >= 1, "x must be a [..., T] tensor, got a 0-d tensor");
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  const at::IntArrayRef lead = x.sizes().slice(0, x.dim() - 1);
  std::vector<int64_t> aux_shape(lead.begin(), lead.end());
  aux_shape.push_back(2);
  at::Tensor loss = new_output({}, f32, poison), stats = new_output({kLossStats}, f32, poison),
             row_scale = new_output(lead, f32, poison), row_aux = new_output(aux_shape, f32, poison),
             saved = save_grad ? new_output(x.sizes(), f32, poison) : at::empty({0}, f32);
  losses_fwd(x, y, a, z, w, mask, kind, clip_low, clip_high, dual_clip, beta, value_clip, per_row_mean, denom, loss,
             stats, row_scale, save_grad ? std::optional<at::Tensor>(saved) : std::nullopt, variant, level, delta,
             tau_pos, tau_neg, row_aux, row_in, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg);
  return {loss, stats, row_scale, row_aux, saved};
}

void losses_bwd(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y, const at::Tensor& a,
                const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& w, const at::Tensor& mask, const at::Tensor& row_scale,
                int64_t kind, double clip_low, double clip_high, double dual_clip, double beta, double value_clip,
                at::Tensor grad_x, int64_t variant, int64_t level, double delta, double tau_pos, double tau_neg,
                const at::Tensor& row_aux, const std::optional<at::Tensor>& row_in, double vespo_k_pos,
                double vespo_lambda_pos, double vespo_k_neg, double vespo_lambda_neg) {
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.scalar_type() == at::kFloat,
              "grad_loss must be a float32 scalar");
  TORCH_CHECK(grad_x.sizes() == x.sizes() && grad_x.is_contiguous() && grad_x.scalar_type() == x.scalar_type(),
              "grad_x must be a contiguous tensor of x's shape and dtype");
  TORCH_CHECK(x.dim() >= 1, "x must be a [..., T] tensor, got a 0-d tensor");
  const int64_t B = rows_in(x);
  const float* scale = f32_out(row_scale, B, "row_scale");
  const float* aux = f32_out(row_aux, 2 * B, "row_aux");
  const float g = grad_loss.item<float>();
  Consts c = consts_of(clip_low, clip_high, dual_clip, beta, value_clip, delta, tau_pos, tau_neg, vespo_k_pos,
                       vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg);
  c.ref = z.has_value();
  dispatch_storage_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const Rows<T> r = rows_of<T>(kind, level, x, y, a, z, w, mask, variant, row_in);
    T* out = static_cast<T*>(grad_x.data_ptr());
    dispatch_kind(kind, variant, dual_clip, [&](auto k, auto v, auto dual) {
      at::parallel_for(0, B, rows_per_task(r.len), [&](int64_t b, int64_t e) {
        backward_kind(b, e, r, c, g, scale, aux, out, k, v, dual);
      });
    });
  });
}

// row_aux: None at the token level; at the sequence level the forward's [..., 2] row_aux, whose
// per-row gradient G_b is added to every valid token's saved gradient.
void losses_bwd_saved(const at::Tensor& grad_loss, const std::optional<at::Tensor>& saved, const at::Tensor& mask,
                      const at::Tensor& row_scale, at::Tensor grad_x, const std::optional<at::Tensor>& row_aux) {
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.scalar_type() == at::kFloat,
              "grad_loss must be a float32 scalar");
  TORCH_CHECK(grad_x.dim() >= 1 && grad_x.is_contiguous(), "grad_x must be a contiguous [..., T] tensor");
  TORCH_CHECK(!saved || (saved->scalar_type() == at::kFloat && saved->is_contiguous() &&
                         saved->sizes() == grad_x.sizes()),
              "saved must be a contiguous float32 tensor of grad_x's shape");
  TORCH_CHECK(saved || row_aux, "without saved (row-constant rows) the gradient is row_aux's: pass it");
  TORCH_CHECK(mask.sizes() == grad_x.sizes() && mask.is_contiguous(), "mask must be a contiguous tensor of "
              "grad_x's shape");
  const int64_t B = rows_in(grad_x), len = grad_x.size(-1);
  const float* scale = f32_out(row_scale, B, "row_scale");
  const float* aux = row_aux ? f32_out(*row_aux, 2 * B, "row_aux") : nullptr;
  const float g = grad_loss.item<float>();
  MaskStager stage = nullptr;
  dispatch_mask_type(mask.scalar_type(), "mask", [&](auto mtag) { stage = mask_stager<decltype(mtag)>(); });
  const char* m = static_cast<const char*>(mask.const_data_ptr());
  const int64_t mb = mask.element_size();
  const float* sv = saved ? saved->data_ptr<float>() : nullptr;
  dispatch_storage_type(grad_x.scalar_type(), "grad_x", [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(grad_x.data_ptr());
    at::parallel_for(0, B, rows_per_task(len), [&](int64_t b, int64_t e) {
      backward_saved_any(b, e, len, sv, m, mb, stage, g, scale, aux, out);
    });
  });
}

}  // namespace rlkern
