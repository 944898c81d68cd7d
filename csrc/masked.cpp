// Masked statistics over token tensors (masked_sum / mean / var / whiten and their gradients): the
// C++ CPU kernels. One call per op and direction: each computes the moments it needs, turns them into
// the statistic (and the whitened values), and returns its outputs (allocated here: a Python
// torch.empty costs ~1 us a tensor) with the smallest selected count, so that Python can refuse an
// empty selection without another pass (rlkern/ops/masked.py).
//
// The data is cut into segments: a segment is one row (the last dim) for per-row statistics, or a
// fixed run of kSegment elements of the flattened tensor for a global statistic (merge_all), whose
// segments are then merged in index order. Either way the result depends only on the data, never on
// the thread count.
//
// Moments of a segment (count n, sum s, M2 = sum (x - mean)^2 over the masked elements) are built
// from chunks of kChunk elements: a chunk is summed in fp32 (16 lanes, fixed pairwise finish), then
// its M2 is taken about its own mean in a second pass while it is still in L1 (two-pass accuracy
// for one pass over memory); chunks and segments are merged in float64 with Chan et al.'s update
//   n = na + nb,  s = sa + sb,  M2 = M2a + M2b + (sb/nb - sa/na)^2 na nb / n.
// Masked-out elements are selected away, never multiplied by 0, so padding that holds inf or NaN
// does not reach a statistic. The mask is read in its own dtype, "nonzero = valid" (simd.h).
//
// Everything elementwise is one pass with per-segment float32 coefficients (derived in float64):
//   whiten:        y_j  = c + b (x_j - mu)                      b = rstd, c = 0 or the mean
//   sum, mean bwd: dx_j = [m_j] a                               a = g, g / n
//   var bwd:       dx_j = [m_j] b (x_j - mu)                    b = 2 g / (n - ddof)
//   whiten bwd:    dx_j = gy_j c + [m_j] (a + b (x_j - mu))     c = rstd, with S1 = sum gy and
//                  S2 = sum gy (x - mu) over the whole segment: a = S1 (1[not shift] - rstd) / n,
//                  b = -S2 rstd^3 / (n - ddof)
// (var's own dependence on the mean drops out: the masked sum of x - mean is 0). The sum's and the
// mean's gradients never read x: d sum / d x_j = m_j whatever x_j holds, NaN included (issue 9).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dispatch.h"
#include "masked.h"
#include "simd.h"

namespace rlkern {
namespace {

constexpr int64_t kChunk = 4096;     // elements per two-pass chunk: 16 KiB of fp32 + the mask, in L1
constexpr int64_t kSegment = 16384;  // elements per segment of a global reduction (a parallel task)
enum Kind : int64_t { kSum = 0, kMean = 1, kVar = 2 };

// Builds NAME_v4 / NAME_v3 / NAME_base from the always-inline template BODY<T, M> and NAME<T, M>
// dispatching on cpu_level() (simd.h's RLKERN_AT_LEVELS, for templates).
#define RLKERN_TEMPLATE_AT_LEVELS(NAME, BODY)                                                          \
  template <typename T, typename M, typename... A>                                                     \
  __attribute__((target("arch=x86-64-v4"))) void NAME##_v4(A... args) { BODY<T, M>(args...); }       \
  template <typename T, typename M, typename... A>                                                     \
  __attribute__((target("arch=x86-64-v3"))) void NAME##_v3(A... args) { BODY<T, M>(args...); }       \
  template <typename T, typename M, typename... A>                                                     \
  void NAME##_base(A... args) { BODY<T, M>(args...); }                                                 \
  template <typename T, typename M, typename... A>                                                     \
  void NAME(A... args) {                                                                               \
    switch (cpu_level()) {                                                                             \
      case 4: return NAME##_v4<T, M>(args...);                                                         \
      case 3: return NAME##_v3<T, M>(args...);                                                         \
      default: return NAME##_base<T, M>(args...);                                                      \
    }                                                                                                  \
  }

// 16 mask lanes as all-ones / zero. Bytes are widened by a plain loop that GCC vectorises
// (vpmovzxbd): __builtin_convertvector on a 16-byte vector was scalarised by GCC 12 and made the
// moments pass 3x slower. Wider dtypes are converted to float and compared there (simd.h).
template <typename M>
RLKERN_INLINE vint valid16(const M* m) {
  if constexpr (std::is_same_v<M, uint8_t>) {
    int32_t wide[kLanes];
    for (int j = 0; j < kLanes; ++j) wide[j] = m[j];
    vint v;
    std::memcpy(&v, wide, sizeof(v));
    return v != 0;
  } else {
    return mask_values16(m) != splat(0.f);
  }
}
template <typename M>
RLKERN_INLINE vint valid_tail(const M* m, int64_t n) {
  return mask_tail(m, n) != splat(0.f);
}

struct Moments {
  double n = 0, s = 0, m2 = 0;
};

RLKERN_INLINE Moments merge(const Moments& a, const Moments& b) {
  if (a.n == 0) return b;
  if (b.n == 0) return a;
  const double n = a.n + b.n;
  const double delta = b.s / b.n - a.s / a.n;
  return {n, a.s + b.s, a.m2 + b.m2 + delta * delta * (a.n * b.n / n)};
}

RLKERN_INLINE void add_sum(vfloat xv, vint valid, vfloat& vs, vfloat& vc) {
  vs += valid ? xv : splat(0.f);
  vc += valid ? splat(1.f) : splat(0.f);
}
RLKERN_INLINE void add_m2(vfloat xv, vint valid, vfloat mean, vfloat& vm2) {
  const vfloat d = xv - mean;
  vm2 += valid ? d * d : splat(0.f);
}

// Full 16-lane steps and the tail are separate loops: a per-step "is this the tail?" branch (a
// stack buffer) made the moments pass 3x slower.
template <typename T, typename M, bool kM2>
RLKERN_INLINE Moments chunk_moments(const T* x, const M* m, int64_t len) {
  const int64_t full = len - len % kLanes, tail = len - full;
  vfloat vs = splat(0.f), vc = splat(0.f);
  for (int64_t j = 0; j < full; j += kLanes) add_sum(load16(x + j), valid16(m + j), vs, vc);
  if (tail) add_sum(load_tail(x + full, tail, 0.f), valid_tail(m + full, tail), vs, vc);
  const float count = hsum(vc), sum = hsum(vs);
  if (!kM2 || count == 0.f) return {count, sum, 0.0};
  const vfloat mean = splat(sum / count);
  vfloat vm2 = splat(0.f);
  for (int64_t j = 0; j < full; j += kLanes) add_m2(load16(x + j), valid16(m + j), mean, vm2);
  if (tail) add_m2(load_tail(x + full, tail, 0.f), valid_tail(m + full, tail), mean, vm2);
  return {count, sum, hsum(vm2)};
}

template <typename T, typename M>
RLKERN_INLINE void moments_body(int64_t b, int64_t e, int64_t seg, int64_t numel, const T* x, const M* m,
                                bool want_m2, Moments* out) {
  for (int64_t r = b; r < e; ++r) {
    const int64_t o = r * seg, len = std::max<int64_t>(0, std::min(seg, numel - o));
    Moments acc;
    for (int64_t c = 0; c < len; c += kChunk) {
      const int64_t n = std::min(kChunk, len - c);
      acc = merge(acc, want_m2 ? chunk_moments<T, M, true>(x + o + c, m + o + c, n)
                               : chunk_moments<T, M, false>(x + o + c, m + o + c, n));
    }
    out[r] = acc;
  }
}
RLKERN_TEMPLATE_AT_LEVELS(moments_range, moments_body)

// S1 = sum gy, S2 = sum gy (x - mu) over each segment: fp32 per chunk, float64 across chunks.
template <typename T, typename M>
RLKERN_INLINE void dot_body(int64_t b, int64_t e, int64_t seg, int64_t numel, const float* gy, const T* x,
                            const float* mu, bool one_mean, double* s1, double* s2) {
  for (int64_t r = b; r < e; ++r) {
    const int64_t o = r * seg, len = std::max<int64_t>(0, std::min(seg, numel - o));
    const vfloat mean = splat(mu[one_mean ? 0 : r]);
    double acc1 = 0, acc2 = 0;
    for (int64_t c = 0; c < len; c += kChunk) {
      const int64_t clen = std::min(kChunk, len - c), full = clen - clen % kLanes, tail = clen - full;
      const float* g = gy + o + c;
      const T* xc = x + o + c;
      vfloat v1 = splat(0.f), v2 = splat(0.f);
      for (int64_t j = 0; j < full; j += kLanes) {
        const vfloat gv = load16(g + j);
        v1 += gv;
        v2 += gv * (load16(xc + j) - mean);
      }
      if (tail) {
        const vfloat gv = load_tail(g + full, tail, 0.f);
        v1 += gv;
        v2 += gv * (load_tail(xc + full, tail, 0.f) - mean);
      }
      acc1 += hsum(v1);
      acc2 += hsum(v2);
    }
    s1[r] = acc1;
    s2[r] = acc2;
  }
}
RLKERN_TEMPLATE_AT_LEVELS(dot_range, dot_body)

// Per-segment coefficients of the elementwise passes (see the file comment), float32.
struct Coefficients {
  std::vector<float> mu, a, b, c;
  explicit Coefficients(int64_t n) : mu(n), a(n), b(n), c(n) {}
};
struct CoefPtrs {
  const float *mu, *a, *b, *c;
};

enum Affine : int { kMaskedConst, kMaskedCentered, kWhitenGrad, kWhiten };

// n lanes as float32 (n == kLanes: a full step, folded at compile time; else a tail).
template <typename T>
RLKERN_INLINE vfloat load_n(const T* p, int64_t n) {
  return n == kLanes ? load16(p) : load_tail(p, n, 0.f);
}

// One step of an elementwise pass (see Affine and the file comment): the loads it needs, then the value.
template <Affine kMode, typename T, typename M>
RLKERN_INLINE vfloat affine_step(const T* x, const M* m, const float* gy, int64_t n, vfloat mu, vfloat a, vfloat b,
                                 vfloat c) {
  if constexpr (kMode == kWhiten) {
    return c + b * (load_n(x, n) - mu);
  } else {
    const vint valid = n == kLanes ? valid16(m) : valid_tail(m, n);
    if constexpr (kMode == kMaskedConst) return valid ? a : splat(0.f);
    else if constexpr (kMode == kMaskedCentered) return valid ? b * (load_n(x, n) - mu) : splat(0.f);
    else return load_n(gy, n) * c + (valid ? a + b * (load_n(x, n) - mu) : splat(0.f));  // kWhitenGrad
  }
}

// One elementwise pass over [begin, end) with segment length seg. kWhiten writes float32 and reads no
// mask; the gradients write x's dtype.
template <typename T, typename M, Affine kMode, typename O>
RLKERN_INLINE void affine_mode(int64_t begin, int64_t end, int64_t seg, const T* x, const M* m, const float* gy,
                               const CoefPtrs& k, O* out) {
  for (int64_t i = begin; i < end;) {
    const int64_t r = i / seg, stop = std::min(end, (r + 1) * seg);
    const vfloat mu = splat(k.mu[r]), a = splat(k.a[r]), b = splat(k.b[r]), c = splat(k.c[r]);
    const int64_t full = stop - (stop - i) % kLanes, n = stop - full;
    for (int64_t j = i; j < full; j += kLanes)
      store16(out + j, affine_step<kMode>(x + j, m + j, gy + j, kLanes, mu, a, b, c));
    if (n > 0) store_tail(out + full, affine_step<kMode>(x + full, m + full, gy + full, n, mu, a, b, c), n);
    i = stop;
  }
}

template <typename T, typename M>
RLKERN_INLINE void affine_body(int64_t begin, int64_t end, int64_t seg, const T* x, const M* m, const float* gy,
                               const CoefPtrs* k, int mode, void* out) {
  switch (mode) {
    case kMaskedConst: return affine_mode<T, M, kMaskedConst>(begin, end, seg, x, m, gy, *k, static_cast<T*>(out));
    case kMaskedCentered:
      return affine_mode<T, M, kMaskedCentered>(begin, end, seg, x, m, gy, *k, static_cast<T*>(out));
    case kWhitenGrad: return affine_mode<T, M, kWhitenGrad>(begin, end, seg, x, m, gy, *k, static_cast<T*>(out));
    default: return affine_mode<T, M, kWhiten>(begin, end, seg, x, m, gy, *k, static_cast<float*>(out));
  }
}
RLKERN_TEMPLATE_AT_LEVELS(affine_range, affine_body)

// The layout of x: `outs` statistics over segments of `seg` elements (`count` of them).
struct Layout {
  int64_t numel, seg, count, outs;
  bool merge_all;
};
Layout layout_of(const at::Tensor& x, bool merge_all) {
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  const int64_t numel = x.numel();
  if (merge_all) return {numel, kSegment, (numel + kSegment - 1) / kSegment, 1, true};
  TORCH_CHECK(x.dim() >= 1, "per-row statistics need at least one dimension");
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return {numel, std::max<int64_t>(x.size(-1), 1), rows, rows, false};
}

void check_mask(const at::Tensor& mask, const at::Tensor& x) {
  TORCH_CHECK(mask.is_contiguous() && mask.sizes() == x.sizes(), "mask must be a contiguous tensor shaped like x");
}

template <typename T>
T* checked(const at::Tensor& t, at::ScalarType dtype, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.numel() == n, name, " must be a contiguous ",
              dtype, " tensor of ", n, " elements");
  return static_cast<T*>(t.data_ptr());
}

// A new output (NaN-filled when `poison`: tests then catch an element a kernel forgets to write).
at::Tensor new_output(at::IntArrayRef shape, const at::Tensor& like, at::ScalarType dtype, bool poison) {
  at::Tensor t = at::empty(shape, like.options().dtype(dtype));
  if (poison) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// The shape of the statistics, after `lead` leading sizes: [lead..., x's leading dims] per row, else [lead...].
std::vector<int64_t> stat_shape(const at::Tensor& x, bool merge_all, std::initializer_list<int64_t> lead) {
  std::vector<int64_t> shape(lead);
  if (!merge_all) shape.insert(shape.end(), x.sizes().begin(), x.sizes().end() - 1);
  return shape;
}

int64_t grain_segments(int64_t seg) { return std::max<int64_t>(1, 65536 / seg); }

// Moments of every statistic (one per row, or one merged in segment order).
std::vector<Moments> moments_of(const at::Tensor& x, const at::Tensor& mask, const Layout& l, bool want_m2) {
  check_mask(mask, x);
  std::vector<Moments> parts(l.count);
  dispatch_storage_type(x.scalar_type(), "x", [&](auto xt) {
    using T = decltype(xt);
    dispatch_mask_type(mask.scalar_type(), "mask", [&](auto mt) {
      using M = decltype(mt);
      const T* xp = static_cast<const T*>(x.const_data_ptr());
      const M* mp = mask_data<M>(mask);
      at::parallel_for(0, l.count, grain_segments(l.seg), [&](int64_t b, int64_t e) {
        moments_range<T, M>(b, e, l.seg, l.numel, xp, mp, want_m2, parts.data());
      });
    });
  });
  if (l.merge_all) {
    Moments total;
    for (const Moments& p : parts) total = merge(total, p);  // in segment order: thread-count independent
    parts.assign(1, total);
  }
  return parts;
}

double min_count(const std::vector<Moments>& parts) {
  double low = std::numeric_limits<double>::infinity();
  for (const Moments& p : parts) low = std::min(low, p.n);
  return low;
}

// The elementwise pass: coefficient r covers segment r (a row), or everything when merge_all.
void apply(const at::Tensor& x, const std::optional<at::Tensor>& mask, const float* gy, const Layout& l,
           const Coefficients& k, Affine mode, at::Tensor& out) {
  const int64_t seg = l.merge_all ? std::max<int64_t>(l.numel, 1) : l.seg;
  const CoefPtrs ptrs{k.mu.data(), k.a.data(), k.b.data(), k.c.data()};
  const at::ScalarType mdtype = mask.has_value() ? mask->scalar_type() : at::kBool;
  dispatch_storage_type(x.scalar_type(), "x", [&](auto xt) {
    using T = decltype(xt);
    dispatch_mask_type(mdtype, "mask", [&](auto mt) {
      using M = decltype(mt);
      const T* xp = static_cast<const T*>(x.const_data_ptr());
      const M* mp = mask.has_value() ? mask_data<M>(*mask) : nullptr;
      void* op = out.data_ptr();
      at::parallel_for(0, l.numel, 32768, [&](int64_t b, int64_t e) {
        affine_range<T, M>(b, e, seg, xp, mp, gy, &ptrs, static_cast<int>(mode), op);
      });
    });
  });
}

// What a backward pass starts from: the layout, d x's buffer (x's dtype), the upstream gradient and
// the forward's saved statistics (`saved_rows` float64 rows of one value per statistic).
struct Backward {
  Layout l;
  at::Tensor out;
  const float* g;
  const double* sv;
  Coefficients k;
};
Backward backward_of(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask, const at::Tensor& saved,
                     bool merge_all, bool grad_like_x, int64_t saved_rows, bool poison) {
  const Layout l = layout_of(x, merge_all);
  check_mask(mask, x);
  Backward b{l, new_output(x.sizes(), x, x.scalar_type(), poison),
             checked<const float>(grad, at::kFloat, grad_like_x ? l.numel : l.outs, "grad"),
             checked<const double>(saved, at::kDouble, saved_rows * l.outs, "saved"), Coefficients(l.outs)};
  for (int64_t r = 0; r < l.outs; ++r) b.k.mu[r] = static_cast<float>(b.sv[r]);  // row 0: the centring mean
  return b;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, double> masked_stat_fwd(const at::Tensor& x, const at::Tensor& mask,
                                                            bool merge_all, int64_t kind, int64_t ddof, bool poison) {
  TORCH_CHECK(kind == kSum || kind == kMean || kind == kVar, "kind must be 0 (sum), 1 (mean) or 2 (var)");
  const Layout l = layout_of(x, merge_all);
  const std::vector<Moments> parts = moments_of(x, mask, l, kind == kVar);
  at::Tensor out = new_output(stat_shape(x, merge_all, {}), x, at::kFloat, poison);
  at::Tensor saved = new_output(stat_shape(x, merge_all, {2}), x, at::kDouble, poison);
  float* o = out.data_ptr<float>();
  double* sv = saved.data_ptr<double>();
  for (int64_t r = 0; r < l.outs; ++r) {
    const Moments& p = parts[r];
    const double dof = p.n - ddof;
    o[r] = static_cast<float>(kind == kSum ? p.s : kind == kMean ? p.s / p.n : p.m2 / dof);
    sv[r] = p.n > 0 ? p.s / p.n : 0.0;  // centres x in backward: 0 for an empty selection keeps it finite
    sv[l.outs + r] = kind == kSum ? 1.0 : kind == kMean ? 1.0 / p.n : 2.0 / dof;
  }
  return {out, saved, min_count(parts)};
}

at::Tensor masked_stat_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
                           const at::Tensor& saved, bool merge_all, int64_t kind, bool poison) {
  Backward b = backward_of(grad, x, mask, saved, merge_all, false, 2, poison);
  for (int64_t r = 0; r < b.l.outs; ++r) {
    const double scaled = b.g[r] * b.sv[b.l.outs + r];
    b.k.a[r] = kind == kVar ? 0.f : static_cast<float>(scaled);
    b.k.b[r] = kind == kVar ? static_cast<float>(scaled) : 0.f;
  }
  apply(x, mask, nullptr, b.l, b.k, kind == kVar ? kMaskedCentered : kMaskedConst, b.out);
  return b.out;
}

std::tuple<at::Tensor, at::Tensor, double> masked_whiten_fwd(const at::Tensor& x, const at::Tensor& mask,
                                                              bool merge_all, bool shift_mean, int64_t ddof,
                                                              double eps, bool poison) {
  const Layout l = layout_of(x, merge_all);
  const std::vector<Moments> parts = moments_of(x, mask, l, true);
  at::Tensor out = new_output(x.sizes(), x, at::kFloat, poison);
  at::Tensor saved = new_output(stat_shape(x, merge_all, {4}), x, at::kDouble, poison);
  double* sv = saved.data_ptr<double>();
  Coefficients k(l.outs);
  for (int64_t r = 0; r < l.outs; ++r) {
    const Moments& p = parts[r];
    const double mean = p.s / p.n, dof = p.n - ddof, rstd = 1.0 / std::sqrt(p.m2 / dof + eps);
    sv[r] = mean;
    sv[l.outs + r] = rstd;
    sv[2 * l.outs + r] = p.n;
    sv[3 * l.outs + r] = dof;
    k.mu[r] = static_cast<float>(mean);
    k.b[r] = static_cast<float>(rstd);
    k.c[r] = shift_mean ? 0.f : k.mu[r];
  }
  apply(x, std::nullopt, nullptr, l, k, kWhiten, out);
  return {out, saved, min_count(parts)};
}

at::Tensor masked_whiten_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
                             const at::Tensor& saved, bool merge_all, bool shift_mean, bool poison) {
  Backward bw = backward_of(grad, x, mask, saved, merge_all, true, 4, poison);
  const Layout& l = bw.l;
  const double* sv = bw.sv;
  const float* g = bw.g;
  Coefficients& k = bw.k;
  std::vector<double> p1(l.count), p2(l.count);
  dispatch_storage_type(x.scalar_type(), "x", [&](auto xt) {
    using T = decltype(xt);
    const T* xp = static_cast<const T*>(x.const_data_ptr());
    at::parallel_for(0, l.count, grain_segments(l.seg), [&](int64_t b, int64_t e) {
      dot_range<T, void>(b, e, l.seg, l.numel, g, xp, k.mu.data(), merge_all, p1.data(), p2.data());
    });
  });
  if (merge_all) {
    double a = 0, b = 0;
    for (int64_t r = 0; r < l.count; ++r) a += p1[r], b += p2[r];  // in segment order
    p1.assign(1, a);
    p2.assign(1, b);
  }
  for (int64_t r = 0; r < l.outs; ++r) {
    const double rstd = sv[l.outs + r], n = sv[2 * l.outs + r], dof = sv[3 * l.outs + r];
    k.a[r] = static_cast<float>(p1[r] * ((shift_mean ? 0.0 : 1.0) - rstd) / n);
    k.b[r] = static_cast<float>(-p2[r] * rstd * rstd * rstd / dof);
    k.c[r] = static_cast<float>(rstd);
  }
  apply(x, mask, g, l, k, kWhitenGrad, bw.out);
  return bw.out;
}

namespace {

// masked_stat's eager autograd on the C++ backend as a C++ autograd node (rlkern/ops/masked.py
// registers it with KernelOp.register_native_autograd): the same two kernels as the Python
// torch.autograd.Function of the registered op, without its per-call Python (~10 us of a ~40 us
// forward + backward on tiny inputs). Inputs as masked_stat_fwd's; `low` receives the smallest count.
struct MaskedStatFunction : torch::autograd::Function<MaskedStatFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& mask, bool merge_all, int64_t kind,
                                                int64_t ddof, bool poison, double* low) {
    auto [out, saved, smallest] = masked_stat_fwd(x, mask, merge_all, kind, ddof, poison);
    *low = smallest;
    ctx->save_for_backward({x, mask, saved});
    ctx->saved_data["merge_all"] = merge_all;
    ctx->saved_data["kind"] = kind;
    ctx->saved_data["poison"] = poison;
    ctx->mark_non_differentiable({saved});
    ctx->set_materialize_grads(false);  // saved never has a gradient: no zeros for it
    return {out, saved};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    torch::autograd::variable_list dx(7);
    if (grads[0].defined()) {  // else no gradient reaches the statistic
      const auto s = ctx->get_saved_variables();
      dx[0] = masked_stat_bwd(grads[0].to(at::kFloat).contiguous(), s[0], s[1], s[2],
                              ctx->saved_data["merge_all"].toBool(), ctx->saved_data["kind"].toInt(),
                              ctx->saved_data["poison"].toBool());
    }
    return dx;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, double> masked_stat_autograd(const at::Tensor& x, const at::Tensor& mask,
                                                                 bool merge_all, int64_t kind, int64_t ddof,
                                                                 bool poison) {
  double low = std::numeric_limits<double>::infinity();
  auto outs = MaskedStatFunction::apply(x, mask, merge_all, kind, ddof, poison, &low);
  return {outs[0], outs[1], low};
}

}  // namespace rlkern
