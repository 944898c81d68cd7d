// KL-Cov token selection and token losses (verl 0.9.1 core_algos.compute_policy_loss_kl_cov): the
// C++ CPU kernels. rlkern/ops/token_selection.py calls them; kernels/token_selection.py is the GPU
// twin (same names, same arguments).
//
// Selection (kl_cov_select, and inside kl_cov_fwd), over the R x T tokens as one batch:
//   n = #valid, mA = sum_valid A / n, mL = sum_valid logp / n (sums in double, rounded to float32)
//   cov_i = (A_i - mA) * (logp_i - mL) in float32, as torch computes it
//   k = max(1, floor(n * ratio)) (0 when n = 0): the k valid tokens of largest cov, ties at equal cov
//   taken in row-major order (a NaN cov ranks as +inf, like torch.topk's NaN).
// chosen (bool, one per token) is set at them and cleared elsewhere.
// One pass for the sums, one for the selection: each task keeps a heap of its best `width` tokens
// (a token that does not beat the heap's worst costs one compare), the heaps are merged at the end.
//
// Token losses (kl_cov_fwd), d = logp - old, r = e^d, w = weights (1 without):
//   l_i = w (-A r)              elsewhere
//   l_i = w (-A r + coef |d|)   at the selected tokens
// rows (float32 [3, R]): per row the sum of l over valid tokens, the sum of |d| over valid tokens
// (verl's ppo_kl numerator), and the valid count; sums in double, rounded once.
// kl_cov_bwd: d rows[0] / d logp: g_r w (-A r), plus g_r w coef sign(d) at the selected tokens, 0 at
// masked-out ones. Masked-out tokens never enter (a NaN there reaches nothing); a NaN at a valid
// token makes its row's sum NaN.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "simd.h"
#include "token_selection.h"

namespace rlkern {
namespace {

struct Shape {
  int64_t rows, length;
};

Shape shape_of(const at::Tensor& x) {
  const int64_t length = x.dim() == 0 ? 1 : x.size(-1);
  return {length == 0 ? 0 : x.numel() / length, length};
}

// Rows per task: at least 64K tokens, so a batch below that runs on the calling thread (no parallel
// region to join: on a loaded machine each join can wait a scheduler slice for the other thread).
int64_t grain_rows(int64_t length) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(length, 1)); }

// Each hot loop below is the always-inline `run` of a kernel struct K, compiled once per x86-64 level
// by at_level<K> (simd.h's RLKERN_AT_LEVELS, for templates): AVX-512 on this machine, where a
// baseline build splits every 16-lane step into 4 SSE ops. A lambda or a non-inline callee would
// stay at the baseline, so the parallel_for lambdas only call at_level.
template <typename K, typename... A>
__attribute__((target("arch=x86-64-v4"))) void run_v4(A... a) { K::run(a...); }
template <typename K, typename... A>
__attribute__((target("arch=x86-64-v3"))) void run_v3(A... a) { K::run(a...); }
template <typename K, typename... A>
void run_base(A... a) { K::run(a...); }
template <typename K, typename... A>
void at_level(A... a) {
  switch (cpu_level()) {
    case 4: return run_v4<K>(a...);
    case 3: return run_v3<K>(a...);
    default: return run_base<K>(a...);
  }
}

// 16 tokens from p, or (TAIL) the n < 16 left at the end of a row, padded with 0 / invalid. Full
// steps and the tail are separate loops: a per-step tail branch costs a stack copy.
template <bool TAIL, typename T>
RLKERN_INLINE vfloat load_n(const T* p, int64_t n) {
  if constexpr (TAIL) {
    return load_tail(p, n, 0.f);
  } else {
    return load16(p);
  }
}
template <bool TAIL, typename M>
RLKERN_INLINE vfloat mask_n(const M* p, int64_t n) {
  if constexpr (TAIL) {
    return mask_tail(p, n);
  } else {
    return mask16(p);
  }
}
// x where valid (0/1) is 1, else +0.0, by clearing the bits: a NaN / inf in padding never survives.
RLKERN_INLINE vfloat clear_invalid(vfloat x, vfloat valid) {
  vint bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= -__builtin_convertvector(valid, vint);
  vfloat out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
RLKERN_INLINE vfloat vabs(vfloat x) { return x < splat(0.f) ? -x : x; }
// The largest lane, by shuffles (a compare whose int-vector result is read as bits was lowered lane
// by lane by GCC 12, even for AVX-512).
RLKERN_INLINE float vhmax(vfloat v) {
  v = vmax(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vmax(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vmax(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = vmax(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}
// e^d for any float d (torch.exp within ~2 ulp): e^-|d| from simd.h's vexp_nonpos, inverted where
// d > 0; inf above ln(FLT_MAX), 0 below ln(FLT_MIN) (torch: a subnormal), NaN kept.
RLKERN_INLINE vfloat vexp_any(vfloat d) {
  const vfloat e = vexp_nonpos(-vabs(d));
  vfloat r = d > splat(0.f) ? splat(1.f) / e : e;
  r = d > splat(88.72283f) ? splat(kInf) : r;
  r = d < splat(-87.33654f) ? splat(0.f) : r;
  return d != d ? d : r;
}
float exp_one(float d) {
  float lanes[kLanes];
  store16(lanes, vexp_any(splat(d)));
  return lanes[0];
}

// The token pointers of one call, in their storage types, and the optional float32 weights.
template <typename T, typename M>
struct Tokens {
  const T *adv, *lp, *old;
  const M* mask;
  const float* w;
};

// Per-row sums over the valid tokens: A, logp and the count; with LOSS also the token losses and |d|.
// 16 lanes of float partial sums over 256 tokens at a time, then added in double.
struct RowSums {
  std::vector<double> a, l, loss, abs;
  std::vector<int64_t> count;
  explicit RowSums(int64_t rows) : a(rows), l(rows), loss(rows), abs(rows), count(rows) {}
};
constexpr int64_t kSpan = 256;

template <bool LOSS, typename T, typename M>
struct RowSumsKernel {
  struct Acc {
    vfloat a{}, l{}, n{}, loss{}, d{};
  };
  template <bool TAIL>
  RLKERN_INLINE static void step(const Tokens<T, M>& p, int64_t i, int64_t left, Acc& acc) {
    const vfloat m = mask_n<TAIL>(p.mask + i, left);
    const vfloat a = load_n<TAIL>(p.adv + i, left), x = load_n<TAIL>(p.lp + i, left);
    acc.a += clear_invalid(a, m);
    acc.l += clear_invalid(x, m);
    acc.n += m;
    if constexpr (LOSS) {
      const vfloat d = x - load_n<TAIL>(p.old + i, left);
      vfloat tok = -a * vexp_any(d);
      if (p.w) tok *= load_n<TAIL>(p.w + i, left);
      acc.loss += clear_invalid(tok, m);
      acc.d += clear_invalid(vabs(d), m);
    }
  }
  RLKERN_INLINE static void run(Tokens<T, M> p, Shape s, int64_t r0, int64_t r1, RowSums* out) {
    const int64_t full = s.length - s.length % kLanes;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * s.length;
      double sa = 0, sl = 0, loss = 0, sabs = 0, n = 0;
      for (int64_t t0 = 0; t0 < s.length; t0 += kSpan) {
        Acc acc;
        for (int64_t t = t0, end = std::min(full, t0 + kSpan); t < end; t += kLanes)
          step<false>(p, base + t, kLanes, acc);
        if (t0 + kSpan >= s.length && full < s.length) step<true>(p, base + full, s.length - full, acc);
        sa += hsum(acc.a);
        sl += hsum(acc.l);
        n += hsum(acc.n);
        loss += hsum(acc.loss);
        sabs += hsum(acc.d);
      }
      out->a[r] = sa;
      out->l[r] = sl;
      out->count[r] = static_cast<int64_t>(n);
      out->loss[r] = loss;
      out->abs[r] = sabs;
    }
  }
};

template <bool LOSS, typename T, typename M>
void row_sums(const Tokens<T, M>& p, Shape s, RowSums& out) {
  at::parallel_for(0, s.rows, grain_rows(s.length), [&](int64_t r0, int64_t r1) {
    at_level<RowSumsKernel<LOSS, T, M>>(p, s, r0, r1, &out);
  });
}

struct Cand {
  float key;
  int64_t idx;
};
// a ranks before b: larger cov, then the earlier token.
inline bool better(const Cand& a, const Cand& b) { return a.key > b.key || (a.key == b.key && a.idx < b.idx); }

// One task's candidates: a heap of its best k tokens, front = the worst kept (comparator `better`).
template <typename T, typename M>
struct SelectKernel {
  static void offer(std::vector<Cand>& heap, int64_t k, float key, int64_t idx) {
    if (static_cast<int64_t>(heap.size()) < k) {
      heap.push_back({key, idx});
      std::push_heap(heap.begin(), heap.end(), better);
    } else if (key > heap.front().key) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = {key, idx};
      std::push_heap(heap.begin(), heap.end(), better);
    }
  }
  template <bool TAIL>
  RLKERN_INLINE static void step(const Tokens<T, M>& p, int64_t i0, int64_t left, vfloat ma, vfloat ml, int64_t k,
                                 std::vector<Cand>& heap) {
    const vfloat m = mask_n<TAIL>(p.mask + i0, left);
    vfloat c = (load_n<TAIL>(p.adv + i0, left) - ma) * (load_n<TAIL>(p.lp + i0, left) - ml);
    c = c != c ? splat(kInf) : c;
    // a full heap: only a valid token above its worst can enter (a tie loses: every kept token
    // comes earlier), usually none of the 16
    if (static_cast<int64_t>(heap.size()) == k && !(vhmax(m > splat(0.5f) ? c : splat(-kInf)) > heap.front().key))
      return;
    float cs[kLanes], ms[kLanes];
    store16(cs, c);
    store16(ms, m);
    for (int64_t j = 0; j < (TAIL ? left : kLanes); ++j)
      if (ms[j] != 0.f) offer(heap, k, cs[j], i0 + j);
  }
  RLKERN_INLINE static void run(Tokens<T, M> p, Shape s, int64_t r0, int64_t r1, float ma, float ml, int64_t k,
                                std::vector<Cand>* heap) {
    const int64_t full = s.length - s.length % kLanes;
    const vfloat vma = splat(ma), vml = splat(ml);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * s.length;
      for (int64_t t = 0; t < full; t += kLanes) step<false>(p, base + t, kLanes, vma, vml, k, *heap);
      if (full < s.length) step<true>(p, base + full, s.length - full, vma, vml, k, *heap);
    }
  }
};

// The selection from the row sums: sets chosen (bool storage) at the selected tokens, clears it
// elsewhere, and returns their flat indices.
template <typename T, typename M>
std::vector<int64_t> select(const Tokens<T, M>& p, Shape s, const RowSums& sums, double ratio,
                            at::Tensor& chosen) {
  double sa = 0, sl = 0;
  int64_t n = 0;
  for (int64_t r = 0; r < s.rows; ++r) {  // fixed order: the means never depend on the threads
    sa += sums.a[r];
    sl += sums.l[r];
    n += sums.count[r];
  }
  bool* out = chosen.data_ptr<bool>();
  std::fill(out, out + chosen.numel(), false);
  // Python's max(1, int(n * ratio)): the product in double, truncated; ratio <= 1 keeps k <= n.
  const int64_t k = n == 0 ? 0 : std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(n) * ratio));
  if (k == 0) return {};
  // torch's float32 mean (verl's x[mask].mean(), rlkern's masked_sum / count): the sum rounded to
  // float32, then divided in float32.
  const float ma = static_cast<float>(sa) / static_cast<float>(n);
  const float ml = static_cast<float>(sl) / static_cast<float>(n);
  std::vector<Cand> all;
  std::mutex lock;
  at::parallel_for(0, s.rows, grain_rows(s.length), [&](int64_t r0, int64_t r1) {
    std::vector<Cand> heap;
    heap.reserve(static_cast<size_t>(k));
    at_level<SelectKernel<T, M>>(p, s, r0, r1, ma, ml, k, &heap);
    std::lock_guard<std::mutex> guard(lock);
    all.insert(all.end(), heap.begin(), heap.end());
  });
  const int64_t take = std::min<int64_t>(k, static_cast<int64_t>(all.size()));
  std::partial_sort(all.begin(), all.begin() + take, all.end(), better);
  std::vector<int64_t> picked(static_cast<size_t>(take));
  for (int64_t j = 0; j < take; ++j) out[picked[j] = all[j].idx] = true;
  return picked;
}

// d rows[0] / d logp over rows [r0, r1).
template <typename T, typename M>
struct BackwardKernel {
  template <bool TAIL>
  RLKERN_INLINE static void step(const Tokens<T, M>& p, const uint8_t* pick, vfloat gr, vfloat c, int64_t i,
                                 int64_t left, T* out) {
    const vfloat m = mask_n<TAIL>(p.mask + i, left);
    const vfloat d = load_n<TAIL>(p.lp + i, left) - load_n<TAIL>(p.old + i, left);
    vfloat local = -load_n<TAIL>(p.adv + i, left) * vexp_any(d);
    const vfloat sign = d > splat(0.f) ? splat(1.f) : (d < splat(0.f) ? splat(-1.f) : d);  // torch.sign
    local = mask_n<TAIL>(pick + i, left) > splat(0.5f) ? local + c * sign : local;
    const vfloat v = clear_invalid((p.w ? gr * load_n<TAIL>(p.w + i, left) : gr) * local, m);
    if constexpr (TAIL) {
      store_tail(out + i, v, left);
    } else {
      store16(out + i, v);
    }
  }
  RLKERN_INLINE static void run(Tokens<T, M> p, Shape s, int64_t r0, int64_t r1, const float* g,
                                const uint8_t* pick, float coef, T* out) {
    const int64_t full = s.length - s.length % kLanes;
    const vfloat c = splat(coef);
    for (int64_t r = r0; r < r1; ++r) {
      const vfloat gr = splat(g[r]);
      const int64_t base = r * s.length;
      for (int64_t t = 0; t < full; t += kLanes) step<false>(p, pick, gr, c, base + t, kLanes, out);
      if (full < s.length) step<true>(p, pick, gr, c, base + full, s.length - full, out);
    }
  }
};

void check_tokens(const at::Tensor& logp, const at::Tensor& other, const char* what) {
  TORCH_CHECK(other.is_contiguous() && other.sizes() == logp.sizes() && other.scalar_type() == logp.scalar_type(),
              what, " must be contiguous with logp's shape and dtype");
}

void check_chosen(const at::Tensor& chosen, const at::Tensor& logp) {
  TORCH_CHECK(chosen.scalar_type() == at::kBool && chosen.is_contiguous() && chosen.numel() == logp.numel(),
              "chosen must be contiguous bool with logp's size");
}

const float* weights_data(const std::optional<at::Tensor>& weights, const at::Tensor& logp) {
  if (!weights) return nullptr;
  TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->is_contiguous() && weights->numel() == logp.numel(),
              "weights must be contiguous float32 with logp's size");
  return weights->const_data_ptr<float>();
}

// Calls f(Tokens<T, M>) for logp's storage type T and the mask's M (old_logp: logp when a kernel
// has none).
template <typename F>
void dispatch_tokens(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                     const at::Tensor& mask, const std::optional<at::Tensor>& weights, F&& f) {
  const float* w = weights_data(weights, logp);
  dispatch_storage_type(logp.scalar_type(), "logp", [&](auto t) {
    using T = decltype(t);
    dispatch_mask_type(mask.scalar_type(), "mask", [&](auto m) {
      using M = decltype(m);
      f(Tokens<T, M>{static_cast<const T*>(advantages.const_data_ptr()), static_cast<const T*>(logp.const_data_ptr()),
                     static_cast<const T*>(old_logp.const_data_ptr()), mask_data<M>(mask), w});
    });
  });
}

}  // namespace

void kl_cov_select(const at::Tensor& advantages, const at::Tensor& logp, const at::Tensor& mask, double ratio,
                   at::Tensor chosen) {
  check_tokens(logp, advantages, "advantages");
  TORCH_CHECK(mask.is_contiguous() && mask.numel() == logp.numel(), "mask must be contiguous with logp's size");
  check_chosen(chosen, logp);
  const Shape s = shape_of(logp);
  dispatch_tokens(logp, logp, advantages, mask, std::nullopt, [&](auto p) {
    RowSums sums(s.rows);
    row_sums<false>(p, s, sums);
    select(p, s, sums, ratio, chosen);
  });
}

void kl_cov_fwd(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                const at::Tensor& mask, const std::optional<at::Tensor>& weights, double ratio, double coef,
                at::Tensor chosen, at::Tensor rows) {
  check_tokens(logp, old_logp, "old_logp");
  check_tokens(logp, advantages, "advantages");
  TORCH_CHECK(mask.is_contiguous() && mask.numel() == logp.numel(), "mask must be contiguous with logp's size");
  check_chosen(chosen, logp);
  const Shape s = shape_of(logp);
  TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.is_contiguous() && rows.numel() == 3 * s.rows,
              "rows must be contiguous float32 [3, R]");
  const float c = static_cast<float>(coef);
  dispatch_tokens(logp, old_logp, advantages, mask, weights, [&](auto p) {
    RowSums sums(s.rows);
    row_sums<true>(p, s, sums);
    for (const int64_t i : select(p, s, sums, ratio, chosen)) {  // swap in the KL term
      const float d = static_cast<float>(p.lp[i]) - static_cast<float>(p.old[i]);
      const float tok = -static_cast<float>(p.adv[i]) * exp_one(d);
      const float with_kl = tok + c * std::fabs(d);
      const float wi = p.w ? p.w[i] : 1.f;
      sums.loss[i / s.length] += static_cast<double>(wi * with_kl) - static_cast<double>(wi * tok);
    }
    float* out = rows.data_ptr<float>();
    for (int64_t r = 0; r < s.rows; ++r) {
      out[r] = static_cast<float>(sums.loss[r]);
      out[s.rows + r] = static_cast<float>(sums.abs[r]);
      out[2 * s.rows + r] = static_cast<float>(sums.count[r]);
    }
  });
}

void kl_cov_bwd(const at::Tensor& grad_rows, const at::Tensor& logp, const at::Tensor& old_logp,
                const at::Tensor& advantages, const at::Tensor& mask, const std::optional<at::Tensor>& weights,
                const at::Tensor& chosen, double coef, at::Tensor grad_logp) {
  check_tokens(logp, old_logp, "old_logp");
  check_chosen(chosen, logp);
  check_tokens(logp, advantages, "advantages");
  check_tokens(logp, grad_logp, "grad_logp");
  TORCH_CHECK(mask.is_contiguous() && mask.numel() == logp.numel(), "mask must be contiguous with logp's size");
  const Shape s = shape_of(logp);
  TORCH_CHECK(grad_rows.scalar_type() == at::kFloat && grad_rows.is_contiguous() && grad_rows.numel() == s.rows,
              "grad_rows must be contiguous float32 [R]");
  const float c = static_cast<float>(coef);
  const float* g = grad_rows.const_data_ptr<float>();
  const uint8_t* pick = reinterpret_cast<const uint8_t*>(chosen.const_data_ptr<bool>());
  dispatch_tokens(logp, old_logp, advantages, mask, weights, [&](auto p) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(p.lp)>>;
    using M = std::remove_cv_t<std::remove_pointer_t<decltype(p.mask)>>;
    T* out = static_cast<T*>(grad_logp.data_ptr());
    at::parallel_for(0, s.rows, grain_rows(s.length), [&](int64_t r0, int64_t r1) {
      at_level<BackwardKernel<T, M>>(p, s, r0, r1, g, pick, c, out);
    });
  });
}

// The quantile of the high-entropy mask (TRL 1.16 GRPOTrainer.get_high_entropy_mask: torch.quantile
// over the valid tokens' entropies, its padding sentinel -1e9 dropped). With the n live values in
// ascending order followed by +inf (the order torch.sort gives rlkern/ops/token_selection.py's
// torch path) and rank = float32(q) * float32(n - 1), as torch.quantile computes it: bounds = (the
// value at floor(rank), the value at ceil(rank), rank - floor(rank)); Python interpolates them with
// torch.lerp, as torch.quantile does. One pass gathers the live values; std::nth_element places the
// lower one, and the upper one is the least of the values after it: O(n) where the sort is
// O(n log n) (high_entropy_mask on CPU at 256 x 4096: 13 ms against the sort path's 92). A NaN among
// the live values: both values NaN (torch.quantile's answer). count: n.
void entropy_quantile_bounds(const at::Tensor& entropies, const at::Tensor& mask, double q, at::Tensor bounds,
                             at::Tensor count) {
  TORCH_CHECK(entropies.scalar_type() == at::kFloat && entropies.is_contiguous(),
              "entropies must be contiguous float32");
  TORCH_CHECK(mask.is_contiguous() && mask.numel() == entropies.numel(), "mask must be contiguous with entropies' size");
  TORCH_CHECK(bounds.scalar_type() == at::kFloat && bounds.is_contiguous() && bounds.numel() == 3,
              "bounds must be contiguous float32 [3]");
  TORCH_CHECK(count.scalar_type() == at::kLong && count.numel() == 1, "count must be one int64");
  TORCH_CHECK(q >= 0 && q <= 1, "q must be in [0, 1], got ", q);
  constexpr float kTrlPad = -1e9f;  // exactly -1e9 (TRL's pad value, an integer below 2^30)
  const int64_t N = entropies.numel();
  const float* e = entropies.const_data_ptr<float>();
  std::vector<float> live;
  live.reserve(static_cast<size_t>(N));
  bool nan = false;
  dispatch_mask_type(mask.scalar_type(), "mask", [&](auto tag) {
    using M = decltype(tag);
    const M* m = mask_data<M>(mask);
    for (int64_t i = 0; i < N; ++i) {
      // nonzero = valid (a NaN mask value too); int64 and 16-bit floats convert to a nonzero float
      if (static_cast<float>(m[i]) == 0.f || e[i] == kTrlPad) continue;
      live.push_back(e[i]);
      nan |= std::isnan(e[i]);
    }
  });
  const int64_t n = static_cast<int64_t>(live.size());
  const float rank = static_cast<float>(q) * static_cast<float>(std::max<int64_t>(n - 1, 0));
  const int64_t below = static_cast<int64_t>(rank), above = static_cast<int64_t>(std::ceil(rank));
  float* out = bounds.data_ptr<float>();
  out[2] = rank - static_cast<float>(below);
  count.data_ptr<int64_t>()[0] = n;
  constexpr float inf = std::numeric_limits<float>::infinity();
  if (nan) {
    out[0] = out[1] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  // float32(n - 1) rounds up for some n > 2^24, so either index may be n: the +inf after the values.
  out[0] = out[1] = inf;
  if (below >= n) return;
  std::nth_element(live.begin(), live.begin() + below, live.end());
  out[0] = live[below];
  if (above == below) out[1] = out[0];
  else if (above < n) out[1] = *std::min_element(live.begin() + below + 1, live.end());
}

}  // namespace rlkern
