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
#include <limits>

#include "dispatch.h"

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
