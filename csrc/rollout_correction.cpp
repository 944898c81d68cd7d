// Rollout/training mismatch correction, the C++ CPU kernel: importance weights (TIS / IcePop / the
// peers' conventions), verl's rejection options and every per-row sum behind verl's metrics, in two
// sweeps over each row (the second reads the row again from L1/L2, 4096 floats = 16 KiB):
//
//   sweep 1 (valid tokens): n = Σm, Σ m·d, the off-policy sums (Σ m·lp, Σ m·rlp, Σ m·(rlp - lp),
//           Σ m·(e^d - d - 1), Σ m·e^{2 clamp(d)}), TRL's Σ nan_to_num(m·d), and per rejection option
//           the sums / max / min / threshold counts of its token statistic k1 = -d, k2 = d²/2,
//           k3 = e^d - 1 - d (d clamped to ±20) -> the row's sequence statistics and keep flags;
//   sweep 2 (every token): the weight (token d or the row's Σd, clamped, exp, padding rule,
//           truncate / mask, OpenRLHF's row gate), the combined keep flag and the new mask
//           (mask if kept else 0, in the mask's dtype), and the weight sums for verl's IS metrics.
//
// Python (rlkern/ops/rollout_correction.py) turns the [rows, K] float64 sums into verl's metrics.
// Masks are read in their own dtype: a token is valid when mask != 0 and is weighted by the mask's
// value (verl's masked_sum: where(mask.bool(), x, 0) * mask). NaN propagates as in torch: a NaN
// token makes every sum, max and min it enters NaN, and fails every keep test.
#pragma GCC optimize("fp-contract=off")

#include "rollout_correction.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "dispatch.h"
#include "simd.h"

namespace rlkern {
namespace {

constexpr double kSafety = 20.0;
constexpr double kEps = 1e-8;
// Per-row statistics (float64), the layout rlkern/ops/rollout_correction.py reads.
enum : int64_t {
  sN = 0, sSumD, sSumLp, sSumRlp, sSumKl, sSumK3u, sSumChi, sTrlSum,
  sSumW, sHigh, sLow, sMaxW, sMinW, sSumWc, sSumWc2, sOob, sSumRaw,
  sRejected, sAnyRejected, kBase
};
// Per rejection option: sum, max, min of its token statistic; counts above / below its bounds;
// sums of the clamped statistic and of its square; the weight of the tokens it rejects.
enum : int64_t { oSum = 0, oMax, oMin, oHigh, oLow, oClamp, oClamp2, oRejected, kPerOption };

struct Params {
  int64_t level, mode, padding, nopt;
  float lower, upper, log_clamp;
  bool has_lower, has_upper, has_clamp, has_gate, has_rlp;
  double gate_lo, gate_hi;
  const int64_t* codes;  // kind (1..3) + 10 * aggregation (0 token, 1 sum, 2 mean, 3 max)
  const double* lo;      // k1: log(lower); otherwise -inf
  const double* hi;      // k1: log(upper); otherwise upper
};

inline float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }  // NaN passes
inline float nan_max(float m, float v) { return (v > m || v != v) && m == m ? v : m; }
inline float nan_min(float m, float v) { return (v < m || v != v) && m == m ? v : m; }
inline double nan_maxd(double m, double v) { return (v > m || v != v) && m == m ? v : m; }
inline double nan_mind(double m, double v) { return (v < m || v != v) && m == m ? v : m; }

inline float token_stat(int64_t kind, float ds) {
  if (kind == 1) return -ds;
  if (kind == 2) return 0.5f * (ds * ds);
  return (std::exp(ds) - 1.0f) - ds;
}

inline bool keep_value(int64_t kind, double v, double lo, double hi) { return kind == 1 ? (v >= lo && v <= hi) : v <= hi; }

template <typename M>
void rows(int64_t b, int64_t e, int64_t len, const float* lp, const float* rlp, const M* mask, const Params& p, float* weights, M* new_mask, double* stats) {
  constexpr int64_t kMaxOptions = 16;
  const int64_t K = kBase + kPerOption * p.nopt;
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t r = b; r < e; ++r) {
    const int64_t off = r * len;
    double* S = stats + r * K;
    for (int64_t k = 0; k < K; ++k) S[k] = 0.0;
    S[sMaxW] = -inf;
    S[sMinW] = inf;
    for (int64_t j = 0; j < p.nopt; ++j) {
      S[kBase + j * kPerOption + oMax] = -inf;
      S[kBase + j * kPerOption + oMin] = inf;
    }
    // sweep 1: the row's sums over its valid tokens
    for (int64_t t = 0; t < len; ++t) {
      const float mf = static_cast<float>(mask[off + t]);
      if (mf == 0.f) continue;
      const float a = lp[off + t];
      const float d = p.has_rlp ? a - rlp[off + t] : a;
      const float ds = clampf(d, -kSafety, kSafety);
      S[sN] += mf;
      S[sSumD] += static_cast<double>(d * mf);
      float x = d * mf;
      x = x != x ? 0.f : (x == inf ? FLT_MAX : (x == -inf ? -FLT_MAX : x));
      S[sTrlSum] += x;
      if (p.has_rlp) {
        const float c = rlp[off + t];
        const float ed = std::exp(d);
        const float eds = d == ds ? ed : std::exp(ds);
        S[sSumLp] += static_cast<double>(a * mf);
        S[sSumRlp] += static_cast<double>(c * mf);
        S[sSumKl] += static_cast<double>((c - a) * mf);
        S[sSumK3u] += static_cast<double>(((ed - d) - 1.0f) * mf);
        S[sSumChi] += static_cast<double>((eds * eds) * mf);
      }
      for (int64_t j = 0; j < p.nopt; ++j) {
        double* O = S + kBase + j * kPerOption;
        const int64_t kind = p.codes[j] % 10;
        const float k = token_stat(kind, ds);
        O[oSum] += static_cast<double>(k * mf);
        O[oMax] = nan_maxd(O[oMax], k);
        O[oMin] = nan_mind(O[oMin], k);
        if (p.codes[j] / 10 == 0) {
          const float lo = static_cast<float>(p.lo[j]), hi = static_cast<float>(p.hi[j]);
          O[oHigh] += (k > hi) ? mf : 0.f;
          O[oLow] += (k < lo) ? mf : 0.f;
          const float c = clampf(k, lo, hi);
          O[oClamp] += static_cast<double>(c * mf);
          O[oClamp2] += static_cast<double>((c * c) * mf);
          O[oRejected] += keep_value(kind, k, lo, hi) ? 0.f : mf;
        }
      }
    }
    // the row's keep flag for each sequence-level option
    bool row_keep[kMaxOptions];
    for (int64_t j = 0; j < p.nopt; ++j) {
      double* O = S + kBase + j * kPerOption;
      const int64_t agg = p.codes[j] / 10;
      row_keep[j] = true;
      if (agg == 0) continue;
      double v = agg == 1 ? O[oSum] : agg == 2 ? O[oSum] / (S[sN] + kEps) : (O[oMax] == -inf ? 0.0 : O[oMax]);
      row_keep[j] = keep_value(p.codes[j] % 10, v, p.lo[j], p.hi[j]);
      O[oRejected] = row_keep[j] ? 0.0 : S[sN];
    }
    // sweep 2: weights, the combined keep flag and the new mask
    const float row_log = p.padding == 1 ? static_cast<float>(S[sTrlSum]) : static_cast<float>(S[sSumD]);
    bool gate = true;
    if (p.has_gate) {
      const float geo = std::exp(static_cast<float>(S[sSumD]) / static_cast<float>(S[sN]));
      gate = geo >= p.gate_lo && geo <= p.gate_hi;
    }
    const float low_default = p.has_lower ? p.lower : 1.0f / p.upper;
    for (int64_t t = 0; t < len; ++t) {
      const float mf = static_cast<float>(mask[off + t]);
      const bool valid = mf != 0.f;
      float d = 0.f;
      if (p.level != 0 || (p.nopt > 0 && valid)) d = p.has_rlp ? lp[off + t] - rlp[off + t] : lp[off + t];
      if (p.level != 0) {
        float lw;
        if (p.level == 2) {
          lw = row_log;
        } else if (p.padding == 1) {
          const float x = d * mf;
          lw = x != x ? 0.f : (x == inf ? FLT_MAX : (x == -inf ? -FLT_MAX : x));
        } else {
          lw = d;
        }
        if (p.has_clamp) lw = clampf(lw, -p.log_clamp, p.log_clamp);
        float raw = std::exp(lw);
        if (p.padding == 0) raw = raw * mf;
        float w = raw;
        if (p.mode == 0) {
          if (p.has_lower) w = w < p.lower ? p.lower : w;
          if (p.has_upper) w = w > p.upper ? p.upper : w;
        } else if (p.mode == 1) {
          const bool in = (!p.has_lower || raw >= p.lower) && (!p.has_upper || raw <= p.upper);
          w = p.padding == 2 ? raw * (in ? 1.f : 0.f) : (in ? raw : 0.f);
        }
        if (!gate) w = w * 0.f;
        weights[off + t] = w;
        if (valid) {
          S[sSumW] += static_cast<double>(w * mf);
          S[sHigh] += raw > p.upper ? mf : 0.f;
          S[sLow] += raw < low_default ? mf : 0.f;
          S[sMaxW] = nan_max(static_cast<float>(S[sMaxW]), w);
          S[sMinW] = nan_min(static_cast<float>(S[sMinW]), w);
          const float wc = clampf(w, 0.f, p.upper);
          S[sSumWc] += static_cast<double>(wc * mf);
          S[sSumWc2] += static_cast<double>((wc * wc) * mf);
          S[sOob] += (p.has_lower && (raw < p.lower || raw > p.upper)) ? mf : 0.f;
          S[sSumRaw] += static_cast<double>(raw * mf);
        }
      }
      if (p.nopt > 0) {
        bool keep = true;
        if (valid) {
          const float ds = clampf(d, -kSafety, kSafety);
          for (int64_t j = 0; j < p.nopt && keep; ++j) {
            if (p.codes[j] / 10 != 0) {
              keep = row_keep[j];
            } else {
              const int64_t kind = p.codes[j] % 10;
              keep = keep_value(kind, token_stat(kind, ds), static_cast<float>(p.lo[j]), static_cast<float>(p.hi[j]));
            }
          }
          if (!keep) {
            S[sRejected] += mf;
            S[sAnyRejected] = 1.0;
          }
        }
        new_mask[off + t] = keep ? mask[off + t] : M(0);  // a padded token keeps its 0 (verl: mask * keep)
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The weights alone (rollout_weights_fwd): one sweep over each row (two when the weight needs a row
// statistic: level 2 or OpenRLHF's row gate), 16 lanes at a time, nothing but the fp32 weights
// written. The log-probs are read in their storage type (float32 / bfloat16 / float16), the mask in
// its own dtype staged kChunk tokens at a time as float values (verl and TRL multiply by the mask's
// value, not by a 0/1 flag). Same maths, token for token, as sweep 2 of `rows` above.
// ------------------------------------------------------------------------------------------------

constexpr int64_t kChunk = 1024;
constexpr float kFltMax = std::numeric_limits<float>::max();

RLKERN_INLINE vfloat as_float(vint bits) {
  vfloat out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
RLKERN_INLINE vint as_int(vfloat x) {
  vint out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}
RLKERN_INLINE vfloat flag(vint m) { return as_float(m & (vint{} + 0x3f800000)); }  // 1.0f / 0.0f
RLKERN_INLINE vfloat select(vint m, vfloat a, vfloat b) { return m ? a : b; }
// torch.clamp with constant bounds (never NaN): a NaN x passes through, as in torch.
RLKERN_INLINE vfloat clamp_const(vfloat x, float lo, float hi) {
  x = x < splat(lo) ? splat(lo) : x;
  return splat(hi) < x ? splat(hi) : x;
}

// e^x for every float32 x, as torch.exp: x clamped to [-104, 89] (NaN passes), Cody-Waite reduction
// x = n ln2 + r, e^r by simd.h's vexp_nonpos (|r| <= ln2 / 2: its own reduction is then exact, n = 0,
// leaving its degree-6 polynomial, ~1.5 ulp), then 2^n built as 2^h 2^(n-h), h = floor(n / 2), both
// normal floats for n in [-150, 128]: results overflow to inf above 88.7228, round through the
// subnormals to 0 below -103.97, and a NaN x gives NaN (through r).
RLKERN_INLINE vfloat vexp_any(vfloat x) {
  const vfloat xc = clamp_const(x, -104.0f, 89.0f);
  const vfloat shifter = splat(12582912.0f);  // 1.5 * 2^23: x * log2(e) + shifter rounds to an integer
  const vfloat n = (xc * splat(1.44269504088896341f) + shifter) - shifter;
  vfloat r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  const vfloat p = vexp_nonpos(r) + (r - r);  // + (r - r): NaN through (vexp_nonpos clamps it away)
  const vint ni = __builtin_convertvector(n, vint);
  const vint h = ni >> 1;
  return p * as_float((h + 127) << 23) * as_float((ni - h + 127) << 23);
}

// log(x) for every float32 x, as torch.log (Cephes logf: x = m 2^e with m in [sqrt(1/2), sqrt(2)),
// log(m) = f - f^2/2 + f^3 P(f), f = m - 1, ~1 ulp): log(0) = -inf, log(x < 0) = NaN, log(inf) = inf,
// NaN stays NaN; subnormals are scaled by 2^23 first.
RLKERN_INLINE vfloat vlog_any(vfloat x) {
  const vint sub = (x < splat(1.17549435e-38f)) & (x > splat(0.0f));
  const vfloat xs = select(sub, x * splat(8388608.0f), x);
  const vint bits = as_int(xs);
  vfloat e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vfloat) - select(sub, splat(23.0f), splat(0.0f));
  vfloat m = as_float((bits & 0x007fffff) | 0x3f000000);  // [0.5, 1)
  const vint small = m < splat(0.707106781186547524f);
  e = select(small, e - splat(1.0f), e);
  const vfloat f = select(small, m + m, m) - splat(1.0f);
  const vfloat z = f * f;
  vfloat p = splat(7.0376836292e-2f);
  p = p * f + splat(-1.1514610310e-1f);
  p = p * f + splat(1.1676998740e-1f);
  p = p * f + splat(-1.2420140846e-1f);
  p = p * f + splat(1.4249322787e-1f);
  p = p * f + splat(-1.6668057665e-1f);
  p = p * f + splat(2.0000714765e-1f);
  p = p * f + splat(-2.4999993993e-1f);
  p = p * f + splat(3.3333331174e-1f);
  vfloat y = f * z * p;
  y = y + e * splat(-2.12194440e-4f);
  y = y - splat(0.5f) * z;
  y = f + y + e * splat(0.693359375f);
  y = x == splat(kInf) ? x : y;
  y = x == splat(0.0f) ? splat(-kInf) : y;
  y = x < splat(0.0f) ? splat(std::numeric_limits<float>::quiet_NaN()) : y;
  return x != x ? x : y;
}

// Row sums of fp32 terms accumulated in float64 lanes (a row statistic decides a whole row's weight).
typedef double vdouble __attribute__((vector_size(64)));
typedef float vhalf_float __attribute__((vector_size(32)));
struct WideSum {
  vdouble lo{}, hi{};
  RLKERN_INLINE void add(vfloat x) {
    vhalf_float a, b;
    std::memcpy(&a, &x, sizeof(a));
    std::memcpy(&b, reinterpret_cast<const char*>(&x) + sizeof(a), sizeof(b));
    lo += __builtin_convertvector(a, vdouble);
    hi += __builtin_convertvector(b, vdouble);
  }
  RLKERN_INLINE double total() const {
    double acc[8];
    const vdouble s = lo + hi;
    std::memcpy(acc, &s, sizeof(acc));
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
  }
};

// A chunk of the mask as float values: the float mask itself, others converted into buf (16-padded).
using ValueStager = const float* (*)(const void* mask, int64_t n, float* buf);
template <typename M>
RLKERN_INLINE const float* mask_values_chunk(const M* p, int64_t n, float* buf) {
  if constexpr (std::is_same_v<M, float>) {
    return p;
  } else {
    int64_t i = 0;
    if constexpr (std::is_same_v<M, c10::BFloat16> || std::is_same_v<M, c10::Half>) {
      for (; i + kLanes <= n; i += kLanes) store16(buf + i, load16(p + i));
    }
    for (; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return buf;
  }
}
template <typename M>
__attribute__((target("arch=x86-64-v4"))) const float* values_v4(const void* p, int64_t n, float* buf) {
  return mask_values_chunk(static_cast<const M*>(p), n, buf);
}
template <typename M>
__attribute__((target("arch=x86-64-v3"))) const float* values_v3(const void* p, int64_t n, float* buf) {
  return mask_values_chunk(static_cast<const M*>(p), n, buf);
}
template <typename M>
const float* values_base(const void* p, int64_t n, float* buf) {
  return mask_values_chunk(static_cast<const M*>(p), n, buf);
}
template <typename M>
ValueStager value_stager() {
  switch (cpu_level()) {
    case 4: return &values_v4<M>;
    case 3: return &values_v3<M>;
    default: return &values_base<M>;
  }
}

// 16 (or the n < 16 of a tail) values of a row as float32.
template <typename T>
RLKERN_INLINE vfloat lanes(const T* p, int64_t n) { return n == kLanes ? load16(p) : load_tail(p, n, 0.f); }
template <typename T>
RLKERN_INLINE void store_lanes(T* p, vfloat v, int64_t n) {
  if (n == kLanes) store16(p, v);
  else store_tail(p, v, n);
}

// TRL's nan_to_num(x): NaN -> 0, ±inf -> ±FLT_MAX.
RLKERN_INLINE vfloat nan_to_num(vfloat x) { return clamp_const(x != x ? splat(0.f) : x, -kFltMax, kFltMax); }

struct WeightParams {
  int64_t level, mode, padding;
  float lower, upper, log_clamp;  // -inf / +inf when absent (log_clamp: +inf)
  bool has_rlp, has_gate;
  float gate_lo, gate_hi;
};

// The weights of 16 tokens: d the log-ratio, mv the mask values, row_log the row's log-weight
// (level 2), gate 1 or 0 (OpenRLHF's row gate).
RLKERN_INLINE vfloat token_weights(vfloat d, vfloat mv, vfloat row_log, vfloat gate, const WeightParams& p) {
  vfloat lw = p.level == 2 ? row_log : (p.padding == 1 ? nan_to_num(d * mv) : d);
  if (p.log_clamp < kInf) lw = clamp_const(lw, -p.log_clamp, p.log_clamp);
  vfloat raw = vexp_any(lw);
  if (p.padding == 0) raw = raw * mv;
  vfloat w = raw;
  if (p.mode == 0) {
    w = clamp_const(raw, p.lower, p.upper);
  } else if (p.mode == 1) {
    const vint in = (raw >= splat(p.lower)) & (raw <= splat(p.upper));
    w = p.padding == 2 ? raw * flag(in) : select(in, raw, splat(0.f));
  }
  return p.has_gate ? w * gate : w;
}

template <typename T>
RLKERN_INLINE void weight_rows(int64_t b, int64_t e, int64_t len, const T* lp, const T* rlp, const char* mask,
                               int64_t mask_bytes, ValueStager stage, const WeightParams& p, float* out) {
  alignas(64) float buf[kChunk];
  const bool row_pass = p.level == 2 || p.has_gate;
  const bool needs_mask = p.padding != 2 || row_pass;
  for (int64_t r = b; r < e; ++r) {
    const int64_t o = r * len;
    vfloat row_log = splat(0.f), gate = splat(1.f);
    if (row_pass) {
      WideSum vn, vd, vt;
      for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
        const int64_t cn = std::min<int64_t>(kChunk, len - c0);
        const float* mv = stage(mask + (o + c0) * mask_bytes, cn, buf);
        for (int64_t t = 0; t < cn; t += kLanes) {
          const int64_t k = std::min<int64_t>(kLanes, cn - t), at = o + c0 + t;
          const vfloat m = lanes(mv + t, k);
          const vfloat d = p.has_rlp ? lanes(lp + at, k) - lanes(rlp + at, k) : lanes(lp + at, k);
          vn.add(m);
          vd.add((m != splat(0.f) ? d : splat(0.f)) * m);
          vt.add(nan_to_num(d * m));
        }
      }
      const double n = vn.total(), sum_d = vd.total(), trl = vt.total();
      row_log = splat(p.padding == 1 ? static_cast<float>(trl) : static_cast<float>(sum_d));
      if (p.has_gate) {
        const float geo = std::exp(static_cast<float>(sum_d) / static_cast<float>(n));
        gate = splat(geo >= p.gate_lo && geo <= p.gate_hi ? 1.f : 0.f);
      }
    }
    for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
      const int64_t cn = std::min<int64_t>(kChunk, len - c0);
      const float* mv = needs_mask ? stage(mask + (o + c0) * mask_bytes, cn, buf) : nullptr;
      for (int64_t t = 0; t < cn; t += kLanes) {
        const int64_t k = std::min<int64_t>(kLanes, cn - t), at = o + c0 + t;
        const vfloat m = needs_mask ? lanes(mv + t, k) : splat(1.f);
        const vfloat d = p.has_rlp ? lanes(lp + at, k) - lanes(rlp + at, k) : lanes(lp + at, k);
        store_lanes(out + at, token_weights(d, m, row_log, gate, p), k);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// The trust-region gate (trust_region_fwd), with x the policy whose weights these are and y the one
// that sampled (verl DPPO: log_prob, old_log_prob; OpenRLHF's gating: old_log_probs,
// rollout_log_probs), per token in fp32:
//   convention 0 (verl 0.9.1 core_algos.compute_policy_loss_dppo_tv / _kl): r = exp(clamp(x - y, ±20)),
//     tv: ok+ = e^x - e^y <= high, ok- = e^x - e^y >= -low;
//     kl: b = e^y (y - x) + (1 - e^y) log((1 - e^y + 1e-8) / (1 - e^x + 1e-8)),
//         ok+ = b <= high | e^x <= e^y, ok- = b <= low | e^x >= e^y;
//     valid = A > 0 ? ok+ : ok-, weight min(r, c) * valid; row sums: Σm, Σ m (1 - valid),
//     Σ m [r > c] valid (where the mask is nonzero, verl's masked_sum).
//   convention 1 (OpenRLHF 0.11.2 models/loss.py::PolicyLoss, is_correction_gating binary_kl / tv):
//     p = clamp(e^y, 1e-6, 1 - 1e-6), q = clamp(e^x, ...), s = p log(p / q) + (1 - p) log((1 - p) / (1 - q))
//     (kl) or |p - q| (tv); token level: keep = low <= s <= high; sequence level: keep the row when
//     low <= Σ s m / Σ m <= high; weight e^(x - y) where kept, else 0; row sums: Σm, Σ m [not kept]
//     (token) or Σ s m (sequence), and the row's dropped flag (sequence).
// ------------------------------------------------------------------------------------------------

struct GateParams {
  int64_t convention, divergence, level;  // divergence 0 tv, 1 binary kl; level 1 token, 2 sequence
  float low, high, clip_c;
  bool adv_per_row;
};
constexpr int64_t kGateStats = 3;

// OpenRLHF's statistic of 16 tokens.
RLKERN_INLINE vfloat orl_stat(vfloat x, vfloat y, int64_t divergence) {
  const vfloat p = clamp_const(vexp_any(y), 1e-6f, 1.0f - 1e-6f), q = clamp_const(vexp_any(x), 1e-6f, 1.0f - 1e-6f);
  if (divergence == 0) {
    const vfloat diff = p - q;
    return diff < splat(0.f) ? -diff : diff;
  }
  const vfloat one = splat(1.f);
  return p * vlog_any(p / q) + (one - p) * vlog_any((one - p) / (one - q));
}

template <typename T>
RLKERN_INLINE void gate_rows(int64_t b, int64_t e, int64_t len, const T* lx, const T* ly, const float* adv,
                             const char* mask, int64_t mask_bytes, ValueStager stage, const GateParams& p,
                             float* out, double* stats) {
  alignas(64) float buf[kChunk];
  const vfloat zero = splat(0.f), one = splat(1.f);
  for (int64_t r = b; r < e; ++r) {
    const int64_t o = r * len;
    double* S = stats + r * kGateStats;
    double n = 0.0, s1 = 0.0, s2 = 0.0;
    vfloat row_keep = one;
    if (p.convention == 1 && p.level == 2) {  // the row's mean statistic first
      WideSum vn, vs;
      for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
        const int64_t cn = std::min<int64_t>(kChunk, len - c0);
        const float* mv = stage(mask + (o + c0) * mask_bytes, cn, buf);
        for (int64_t t = 0; t < cn; t += kLanes) {
          const int64_t k = std::min<int64_t>(kLanes, cn - t), at = o + c0 + t;
          const vfloat m = lanes(mv + t, k);
          vn.add(m);
          vs.add(orl_stat(lanes(lx + at, k), lanes(ly + at, k), p.divergence) * m);
        }
      }
      n = vn.total();
      s1 = vs.total();
      const float stat = static_cast<float>(s1) / static_cast<float>(n);
      const bool keep = stat >= p.low && stat <= p.high;
      row_keep = keep ? one : zero;
      s2 = keep ? 0.0 : 1.0;
    }
    for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
      const int64_t cn = std::min<int64_t>(kChunk, len - c0);
      const float* mv = stage(mask + (o + c0) * mask_bytes, cn, buf);
      vfloat vn = zero, v1 = zero, v2 = zero;
      for (int64_t t = 0; t < cn; t += kLanes) {
        const int64_t k = std::min<int64_t>(kLanes, cn - t), at = o + c0 + t;
        const vfloat m = lanes(mv + t, k);
        const vint counted = m != zero;
        const vfloat x = lanes(lx + at, k), y = lanes(ly + at, k);
        vfloat w;
        if (p.convention == 0) {
          const vfloat ratio = vexp_any(clamp_const(x - y, -20.f, 20.f));
          const vfloat px = vexp_any(x), py = vexp_any(y);
          vint ok_pos, ok_neg;
          if (p.divergence == 0) {
            const vfloat diff = px - py;
            ok_pos = diff <= splat(p.high);
            ok_neg = diff >= splat(-p.low);
          } else {
            const vfloat bkl = py * (y - x) + (one - py) * vlog_any(((one - py) + splat(1e-8f)) / ((one - px) + splat(1e-8f)));
            ok_pos = (bkl <= splat(p.high)) | (px <= py);
            ok_neg = (bkl <= splat(p.low)) | (px >= py);
          }
          const vfloat a = p.adv_per_row ? splat(adv[r]) : lanes(adv + at, k);
          const vfloat valid = flag(a > zero ? ok_pos : ok_neg);
          const vfloat truncated = splat(p.clip_c) < ratio ? splat(p.clip_c) : ratio;
          w = truncated * valid;
          vn += m;
          v1 += select(counted, one - valid, zero) * m;
          v2 += select(counted, flag(ratio > splat(p.clip_c)) * valid, zero) * m;
        } else {
          const vfloat token_is = vexp_any(x - y);
          if (p.level == 2) {
            w = select(row_keep > splat(0.5f), token_is, zero);
          } else {
            const vfloat s = orl_stat(x, y, p.divergence);
            const vint keep = (s >= splat(p.low)) & (s <= splat(p.high));
            w = select(keep, token_is, zero);
            vn += m;
            v1 += (one - flag(keep)) * m;
          }
        }
        store_lanes(out + at, w, k);
      }
      if (!(p.convention == 1 && p.level == 2)) {
        n += hsum(vn);
        s1 += hsum(v1);
        s2 += hsum(v2);
      }
    }
    S[0] = n;
    S[1] = s1;
    S[2] = s2;
  }
}

#define RLKERN_RC_KERNELS(T, SUFFIX)                                                                            \
  RLKERN_AT_LEVELS(weight_rows_##SUFFIX,                                                                        \
                   (int64_t b, int64_t e, int64_t len, const T* lp, const T* rlp, const char* m, int64_t mb,    \
                    ValueStager st, const WeightParams& p, float* out),                                         \
                   (b, e, len, lp, rlp, m, mb, st, p, out), (weight_rows<T>(b, e, len, lp, rlp, m, mb, st, p, out))) \
  RLKERN_AT_LEVELS(gate_rows_##SUFFIX,                                                                          \
                   (int64_t b, int64_t e, int64_t len, const T* lx, const T* ly, const float* adv, const char* m, \
                    int64_t mb, ValueStager st, const GateParams& p, float* out, double* stats),                \
                   (b, e, len, lx, ly, adv, m, mb, st, p, out, stats),                                          \
                   (gate_rows<T>(b, e, len, lx, ly, adv, m, mb, st, p, out, stats)))                             \
  void weight_rows_any(int64_t b, int64_t e, int64_t len, const T* lp, const T* rlp, const char* m, int64_t mb,  \
                       ValueStager st, const WeightParams& p, float* out) {                                     \
    weight_rows_##SUFFIX(b, e, len, lp, rlp, m, mb, st, p, out);                                                \
  }                                                                                                             \
  void gate_rows_any(int64_t b, int64_t e, int64_t len, const T* lx, const T* ly, const float* adv, const char* m, \
                     int64_t mb, ValueStager st, const GateParams& p, float* out, double* stats) {              \
    gate_rows_##SUFFIX(b, e, len, lx, ly, adv, m, mb, st, p, out, stats);                                       \
  }
RLKERN_RC_KERNELS(float, f32)
RLKERN_RC_KERNELS(c10::BFloat16, bf16)
RLKERN_RC_KERNELS(c10::Half, f16)
#undef RLKERN_RC_KERNELS

ValueStager stager_for(const at::Tensor& mask) {
  ValueStager st = nullptr;
  dispatch_mask_type(mask.scalar_type(), "mask", [&](auto tag) { st = value_stager<decltype(tag)>(); });
  return st;
}

// Rows per parallel task: ~16K tokens.
int64_t row_grain(int64_t len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1)); }

}  // namespace

void rollout_correction_fwd(const at::Tensor& log_prob, const std::optional<at::Tensor>& rollout_log_prob, const at::Tensor& mask, int64_t level, int64_t mode, int64_t padding, double lower, double upper, double log_clamp, double gate_lo, double gate_hi, std::vector<int64_t> rs_codes, std::vector<double> rs_lo, std::vector<double> rs_hi, const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& new_mask, at::Tensor stats) {
  TORCH_CHECK(log_prob.dim() == 2 && log_prob.is_contiguous() && log_prob.scalar_type() == at::kFloat, "log_prob must be a contiguous float32 [rows, T] tensor");
  const auto shape = log_prob.sizes();
  const int64_t nopt = static_cast<int64_t>(rs_codes.size());
  TORCH_CHECK(nopt <= 16 && rs_lo.size() == rs_codes.size() && rs_hi.size() == rs_codes.size(), "at most 16 rejection options, with one lower and one upper bound each");
  if (rollout_log_prob) TORCH_CHECK(rollout_log_prob->is_contiguous() && rollout_log_prob->sizes() == shape && rollout_log_prob->scalar_type() == at::kFloat, "rollout_log_prob must be contiguous float32 shaped like log_prob");
  TORCH_CHECK(mask.is_contiguous() && mask.sizes() == shape, "mask must be a contiguous tensor shaped like log_prob");
  TORCH_CHECK(level == 0 || (weights && weights->is_contiguous() && weights->sizes() == shape && weights->scalar_type() == at::kFloat), "weights must be a contiguous float32 output shaped like log_prob");
  TORCH_CHECK(nopt == 0 || (new_mask && new_mask->is_contiguous() && new_mask->sizes() == shape && new_mask->scalar_type() == mask.scalar_type()), "new_mask must be a contiguous output shaped and typed like mask");
  TORCH_CHECK(stats.is_contiguous() && stats.scalar_type() == at::kDouble && stats.dim() == 2 && stats.size(0) == shape[0] && stats.size(1) == kBase + kPerOption * nopt, "stats must be a contiguous float64 [rows, ", kBase + kPerOption * nopt, "] output");
  Params p;
  p.level = level;
  p.mode = mode;
  p.padding = padding;
  p.nopt = nopt;
  p.has_lower = !std::isnan(lower);
  p.has_upper = !std::isnan(upper);
  p.has_clamp = !std::isnan(log_clamp);
  p.has_gate = !std::isnan(gate_lo);
  p.has_rlp = rollout_log_prob.has_value();
  p.lower = static_cast<float>(lower);
  p.upper = p.has_upper ? static_cast<float>(upper) : std::numeric_limits<float>::infinity();
  p.log_clamp = static_cast<float>(log_clamp);
  p.gate_lo = gate_lo;
  p.gate_hi = gate_hi;
  p.codes = rs_codes.data();
  p.lo = rs_lo.data();
  p.hi = rs_hi.data();
  const int64_t len = shape[1];
  const float* lp = log_prob.const_data_ptr<float>();
  const float* rlp = p.has_rlp ? rollout_log_prob->const_data_ptr<float>() : nullptr;
  float* w = level != 0 ? weights->data_ptr<float>() : nullptr;
  double* s = stats.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1));
  dispatch_mask_type(mask.scalar_type(), "mask", [&](auto tag) {
    using M = decltype(tag);
    const M* m = mask_data<M>(mask);
    M* out = nopt > 0 ? static_cast<M*>(new_mask->data_ptr()) : nullptr;
    at::parallel_for(0, shape[0], grain, [&](int64_t b, int64_t e) { rows<M>(b, e, len, lp, rlp, m, p, w, out, s); });
  });
}

}  // namespace rlkern

namespace rlkern {

void rollout_weights_fwd(const at::Tensor& log_prob, const std::optional<at::Tensor>& rollout_log_prob, const at::Tensor& mask, int64_t level, int64_t mode, int64_t padding, double lower, double upper, double log_clamp, double gate_lo, double gate_hi, at::Tensor weights) {
  TORCH_CHECK(log_prob.dim() == 2 && log_prob.is_contiguous(), "log_prob must be a contiguous [rows, T] tensor");
  const auto shape = log_prob.sizes();
  if (rollout_log_prob) TORCH_CHECK(rollout_log_prob->is_contiguous() && rollout_log_prob->sizes() == shape && rollout_log_prob->scalar_type() == log_prob.scalar_type(), "rollout_log_prob must be contiguous, shaped and typed like log_prob");
  TORCH_CHECK(mask.is_contiguous() && mask.sizes() == shape, "mask must be a contiguous tensor shaped like log_prob");
  TORCH_CHECK(weights.is_contiguous() && weights.sizes() == shape && weights.scalar_type() == at::kFloat, "weights must be a contiguous float32 output shaped like log_prob");
  TORCH_CHECK((level == 1 || level == 2) && mode >= 0 && mode <= 2 && padding >= 0 && padding <= 2, "level must be 1 or 2, mode and padding 0..2");
  const float inf = std::numeric_limits<float>::infinity();
  WeightParams p;
  p.level = level;
  p.mode = mode;
  p.padding = padding;
  p.lower = std::isnan(lower) ? -inf : static_cast<float>(lower);
  p.upper = std::isnan(upper) ? inf : static_cast<float>(upper);
  p.log_clamp = std::isnan(log_clamp) ? inf : static_cast<float>(log_clamp);
  p.has_rlp = rollout_log_prob.has_value();
  p.has_gate = !std::isnan(gate_lo);
  p.gate_lo = static_cast<float>(gate_lo);
  p.gate_hi = static_cast<float>(gate_hi);
  const int64_t len = shape[1];
  const char* m = static_cast<const char*>(mask.const_data_ptr());
  const int64_t mb = mask.element_size();
  const ValueStager st = stager_for(mask);
  float* out = weights.data_ptr<float>();
  dispatch_storage_type(log_prob.scalar_type(), "log_prob", [&](auto tag) {
    using T = decltype(tag);
    const T* lp = static_cast<const T*>(log_prob.const_data_ptr());
    const T* rlp = p.has_rlp ? static_cast<const T*>(rollout_log_prob->const_data_ptr()) : nullptr;
    at::parallel_for(0, shape[0], row_grain(len), [&](int64_t b, int64_t e) { weight_rows_any(b, e, len, lp, rlp, m, mb, st, p, out); });
  });
}

void trust_region_fwd(const at::Tensor& logp, const at::Tensor& ref_logp, const std::optional<at::Tensor>& advantages, const at::Tensor& mask, int64_t convention, int64_t divergence, int64_t level, double low, double high, double clip_c, at::Tensor weights, at::Tensor stats) {
  TORCH_CHECK(logp.dim() == 2 && logp.is_contiguous(), "logp must be a contiguous [rows, T] tensor");
  const auto shape = logp.sizes();
  TORCH_CHECK(ref_logp.is_contiguous() && ref_logp.sizes() == shape && ref_logp.scalar_type() == logp.scalar_type(), "ref_logp must be contiguous, shaped and typed like logp");
  TORCH_CHECK(mask.is_contiguous() && mask.sizes() == shape, "mask must be a contiguous tensor shaped like logp");
  TORCH_CHECK(weights.is_contiguous() && weights.sizes() == shape && weights.scalar_type() == at::kFloat, "weights must be a contiguous float32 output shaped like logp");
  TORCH_CHECK(stats.is_contiguous() && stats.scalar_type() == at::kDouble && stats.dim() == 2 && stats.size(0) == shape[0] && stats.size(1) == kGateStats, "stats must be a contiguous float64 [rows, 3] output");
  TORCH_CHECK((convention == 0 || convention == 1) && (divergence == 0 || divergence == 1) && (level == 1 || level == 2), "convention, divergence must be 0 or 1, level 1 or 2");
  TORCH_CHECK(convention == 1 || level == 1, "the verl convention is token-level");
  GateParams p;
  p.convention = convention;
  p.divergence = divergence;
  p.level = level;
  p.low = static_cast<float>(low);
  p.high = static_cast<float>(high);
  p.clip_c = static_cast<float>(clip_c);
  p.adv_per_row = false;
  const float* adv = nullptr;
  if (convention == 0) {
    TORCH_CHECK(advantages && advantages->is_contiguous() && advantages->scalar_type() == at::kFloat && advantages->dim() == 2 && advantages->size(0) == shape[0] && (advantages->size(1) == shape[1] || advantages->size(1) == 1), "advantages must be a contiguous float32 [rows, T] or [rows, 1] tensor");
    p.adv_per_row = advantages->size(1) == 1 && shape[1] != 1;
    adv = advantages->const_data_ptr<float>();
  }
  const int64_t len = shape[1];
  const char* m = static_cast<const char*>(mask.const_data_ptr());
  const int64_t mb = mask.element_size();
  const ValueStager st = stager_for(mask);
  float* out = weights.data_ptr<float>();
  double* s = stats.data_ptr<double>();
  dispatch_storage_type(logp.scalar_type(), "logp", [&](auto tag) {
    using T = decltype(tag);
    const T* lx = static_cast<const T*>(logp.const_data_ptr());
    const T* ly = static_cast<const T*>(ref_logp.const_data_ptr());
    at::parallel_for(0, shape[0], row_grain(len), [&](int64_t b, int64_t e) { gate_rows_any(b, e, len, lx, ly, adv, m, mb, st, p, out, s); });
  });
}

}  // namespace rlkern
