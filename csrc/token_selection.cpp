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
#include <mutex>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "simd.h"
#include "token_selection.h"

namespace rlkern {
namespace {

struct Cand {
  float key;
  int64_t idx;
};
// a ranks before b: larger cov, then the earlier token.
inline bool better(const Cand& a, const Cand& b) { return a.key > b.key || (a.key == b.key && a.idx < b.idx); }

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

// 16 tokens from p (n remain in the row; fewer than 16: a tail, padded with 0 / invalid).
template <typename T>
RLKERN_INLINE vfloat load_n(const T* p, int64_t n) {
  return n >= kLanes ? load16(p) : load_tail(p, n, 0.f);
}
template <typename M>
RLKERN_INLINE vfloat mask_n(const M* p, int64_t n) {
  return n >= kLanes ? mask16(p) : mask_tail(p, n);
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
RLKERN_INLINE bool any_lane(vint m) {
  uint64_t w[kLanes / 2];
  std::memcpy(w, &m, sizeof(w));
  uint64_t acc = 0;
  for (int i = 0; i < kLanes / 2; ++i) acc |= w[i];
  return acc != 0;
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

// Per-row sums over the valid tokens: A, logp and the count; with LOSS also the token losses and |d|.
// 16 lanes of float partial sums over 256 tokens at a time, then added in double.
struct RowSums {
  std::vector<double> a, l, loss, abs;
  std::vector<int64_t> count;
  explicit RowSums(int64_t rows) : a(rows), l(rows), loss(rows), abs(rows), count(rows) {}
};
constexpr int64_t kSpan = 256;

template <bool LOSS, typename T, typename M>
void row_sums(const T* adv, const T* lp, const T* old, const M* mask, const float* w, Shape s, RowSums& out) {
  at::parallel_for(0, s.rows, grain_rows(s.length), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * s.length;
      double sa = 0, sl = 0, loss = 0, sabs = 0, n = 0;
      for (int64_t t0 = 0; t0 < s.length; t0 += kSpan) {
        vfloat va{}, vl{}, vn{}, vloss{}, vd{};
        for (int64_t t = t0, end = std::min(s.length, t0 + kSpan); t < end; t += kLanes) {
          const int64_t i = base + t, left = s.length - t;
          const vfloat m = mask_n(mask + i, left);
          const vfloat a = load_n(adv + i, left), x = load_n(lp + i, left);
          va += clear_invalid(a, m);
          vl += clear_invalid(x, m);
          vn += m;
          if constexpr (LOSS) {
            const vfloat d = x - load_n(old + i, left);
            vfloat tok = -a * vexp_any(d);
            if (w) tok *= load_n(w + i, left);
            vloss += clear_invalid(tok, m);
            vd += clear_invalid(vabs(d), m);
          }
        }
        sa += hsum(va);
        sl += hsum(vl);
        n += hsum(vn);
        loss += hsum(vloss);
        sabs += hsum(vd);
      }
      out.a[r] = sa;
      out.l[r] = sl;
      out.count[r] = static_cast<int64_t>(n);
      out.loss[r] = loss;
      out.abs[r] = sabs;
    }
  });
}

// The selection from the row sums: sets chosen (bool storage) at the selected tokens, clears it
// elsewhere, and returns their flat indices.
template <typename T, typename M>
std::vector<int64_t> select(const T* adv, const T* lp, const M* mask, Shape s, const RowSums& sums,
                            double ratio, at::Tensor& chosen) {
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
    std::vector<Cand> heap;  // front: the worst kept token (comparator `better`)
    heap.reserve(static_cast<size_t>(k));
    float cs[kLanes], ms[kLanes];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t t = 0; t < s.length; t += kLanes) {
        const int64_t i0 = r * s.length + t, left = s.length - t;
        const vfloat m = mask_n(mask + i0, left);
        vfloat c = (load_n(adv + i0, left) - splat(ma)) * (load_n(lp + i0, left) - splat(ml));
        c = c != c ? splat(kInf) : c;
        const bool full = static_cast<int64_t>(heap.size()) == k;
        // a full heap: only a valid token above its worst can enter (a tie loses: every kept token
        // comes earlier), usually none of the 16
        if (full && !any_lane((c > splat(heap.front().key)) & (m > splat(0.5f)))) continue;
        store16(cs, c);
        store16(ms, m);
        for (int64_t j = 0; j < std::min<int64_t>(left, kLanes); ++j) {
          if (ms[j] == 0.f) continue;
          if (static_cast<int64_t>(heap.size()) < k) {
            heap.push_back({cs[j], i0 + j});
            std::push_heap(heap.begin(), heap.end(), better);
          } else if (cs[j] > heap.front().key) {
            std::pop_heap(heap.begin(), heap.end(), better);
            heap.back() = {cs[j], i0 + j};
            std::push_heap(heap.begin(), heap.end(), better);
          }
        }
      }
    }
    std::lock_guard<std::mutex> guard(lock);
    all.insert(all.end(), heap.begin(), heap.end());
  });
  const int64_t take = std::min<int64_t>(k, static_cast<int64_t>(all.size()));
  std::partial_sort(all.begin(), all.begin() + take, all.end(), better);
  std::vector<int64_t> picked(static_cast<size_t>(take));
  for (int64_t j = 0; j < take; ++j) out[picked[j] = all[j].idx] = true;
  return picked;
}

void check_tokens(const at::Tensor& logp, const at::Tensor& other, const char* what) {
  TORCH_CHECK(other.is_contiguous() && other.sizes() == logp.sizes() && other.scalar_type() == logp.scalar_type(),
              what, " must be contiguous with logp's shape and dtype");
}

// The token pointers of one call, in their storage types.
template <typename T, typename M>
struct Tokens {
  const T *adv, *lp, *old;
  const M* mask;
};

// Calls f(Tokens<T, M>) for logp's storage type T and the mask's M (old_logp: logp when a kernel
// has none).
template <typename F>
void dispatch_tokens(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages,
                     const at::Tensor& mask, F&& f) {
  dispatch_storage_type(logp.scalar_type(), "logp", [&](auto t) {
    using T = decltype(t);
    dispatch_mask_type(mask.scalar_type(), "mask", [&](auto m) {
      using M = decltype(m);
      f(Tokens<T, M>{static_cast<const T*>(advantages.const_data_ptr()), static_cast<const T*>(logp.const_data_ptr()),
                     static_cast<const T*>(old_logp.const_data_ptr()), mask_data<M>(mask)});
    });
  });
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

}  // namespace

void kl_cov_select(const at::Tensor& advantages, const at::Tensor& logp, const at::Tensor& mask, double ratio,
                   at::Tensor chosen) {
  check_tokens(logp, advantages, "advantages");
  TORCH_CHECK(mask.is_contiguous() && mask.numel() == logp.numel(), "mask must be contiguous with logp's size");
  check_chosen(chosen, logp);
  const Shape s = shape_of(logp);
  dispatch_tokens(logp, logp, advantages, mask, [&](auto p) {
    RowSums sums(s.rows);
    row_sums<false>(p.adv, p.lp, p.old, p.mask, nullptr, s, sums);
    select(p.adv, p.lp, p.mask, s, sums, ratio, chosen);
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
  const float* w = weights_data(weights, logp);
  const float c = static_cast<float>(coef);
  dispatch_tokens(logp, old_logp, advantages, mask, [&](auto p) {
    const auto *adv = p.adv, *lp = p.lp, *old = p.old;
    RowSums sums(s.rows);
    row_sums<true>(adv, lp, old, p.mask, w, s, sums);
    for (const int64_t i : select(adv, lp, p.mask, s, sums, ratio, chosen)) {  // swap in the KL term
      const float d = static_cast<float>(lp[i]) - static_cast<float>(old[i]);
      const float tok = -static_cast<float>(adv[i]) * exp_one(d);
      const float with_kl = tok + c * std::fabs(d);
      const float wi = w ? w[i] : 1.f;
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
  const float* w = weights_data(weights, logp);
  const float c = static_cast<float>(coef);
  const float* g = grad_rows.const_data_ptr<float>();
  dispatch_tokens(logp, old_logp, advantages, mask, [&](auto p) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(p.lp)>>;
    const auto *adv = p.adv, *lp = p.lp, *old = p.old;
    const auto* mk = p.mask;
    T* out = static_cast<T*>(grad_logp.data_ptr());
    const uint8_t* pick = reinterpret_cast<const uint8_t*>(chosen.const_data_ptr<bool>());
    at::parallel_for(0, s.rows, grain_rows(s.length), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const vfloat gr = splat(g[r]);
        for (int64_t t = 0; t < s.length; t += kLanes) {
          const int64_t i = r * s.length + t, left = s.length - t;
          const vfloat m = mask_n(mk + i, left);
          const vfloat d = load_n(lp + i, left) - load_n(old + i, left);
          vfloat local = -load_n(adv + i, left) * vexp_any(d);
          const vfloat sign = d > splat(0.f) ? splat(1.f) : (d < splat(0.f) ? splat(-1.f) : d);  // torch.sign
          local = mask_n(pick + i, left) > splat(0.5f) ? local + splat(c) * sign : local;
          const vfloat v = clear_invalid((w ? gr * load_n(w + i, left) : gr) * local, m);
          if (left >= kLanes) {
            store16(out + i, v);
          } else {
            store_tail(out + i, v, left);
          }
        }
      }
    });
  });
}

}  // namespace rlkern
