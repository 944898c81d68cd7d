// Masked statistics over [rows, N] (masked_sum / mean / var / whiten and their gradients): the C++
// CPU kernels.
//
// The data is cut into segments: a segment is one row for per-row statistics (dim=...), or a fixed
// run of kSegment elements of the flattened tensor for a global statistic, whose segments are then
// merged in index order. Either way the result depends only on the data, never on the thread count.
//
// Moments of a segment (count n, sum s, M2 = sum (x - mean)^2 over the masked elements) are built
// from chunks of kChunk elements: a chunk is summed in fp32 (16 lanes, fixed pairwise finish), then
// its M2 is taken about its own mean in a second pass while it is still in L1 (two-pass accuracy
// for one pass over memory); chunks and segments are merged in float64 with Chan et al.'s update
//   n = na + nb,  s = sa + sb,  M2 = M2a + M2b + (sb/nb - sa/na)^2 na nb / n.
// Masked-out elements are selected away, never multiplied by 0, so padding that holds inf or NaN
// does not reach a statistic.
//
// Everything else is one elementwise kernel, per segment r with float32 coefficients:
//   out_j = (gy_j if given else 1) * c_r + [m_j if mask_affine] * (a_r + b_r (x_j - mu_r))
// which is the whitening (a = 0, b = rstd, c = mean or 0, no mask) and every backward (sum, mean,
// var: c = 0 and a, b from the chain rule; whiten: c = rstd); and a reduction of
//   S1 = sum_j gy_j,  S2 = sum_j gy_j (x_j - mu_r)
// over each segment that whiten's backward needs. rlkern/ops/masked.py derives the coefficients.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <vector>

#include "masked.h"
#include "dispatch.h"
#include "simd.h"

namespace rlkern {
namespace {

constexpr int64_t kChunk = 4096;    // elements per two-pass chunk: 16 KiB of fp32 + 4 KiB of mask, in L1
constexpr int64_t kSegment = 16384;  // elements per segment of a global reduction (a parallel task)

typedef uint8_t vbyte __attribute__((vector_size(16)));

// Full 16-lane steps and the tail are separate loops below: a per-step "is this the tail?" branch
// (load_tail's stack buffer) made the moments pass 3x slower (1.6 vs 0.55 ms per 1M fp32).
// The 16 mask bytes are widened by a plain loop that GCC vectorises (vpmovzxbd on AVX-512):
// __builtin_convertvector on a 16-byte vector was scalarised by GCC 12 and cost 0.45 of those
// 0.55 ms; with the loop the pass takes 0.18 ms (x86-64-v4, this machine).
RLKERN_INLINE vint load_mask16(const uint8_t* m) {
  int32_t wide[kLanes];
  for (int j = 0; j < kLanes; ++j) wide[j] = m[j];
  vint v;
  std::memcpy(&v, wide, sizeof(v));
  return v != 0;
}
RLKERN_INLINE vint load_mask_tail(const uint8_t* m, int64_t n) {
  vbyte b{};
  for (int64_t j = 0; j < n; ++j) b[j] = m[j];
  return __builtin_convertvector(b, vint) != 0;
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

// Adds 16 lanes to the masked sum and count.
template <typename T>
RLKERN_INLINE void add_sum(vfloat xv, vint valid, vfloat& vs, vfloat& vc) {
  vs += valid ? xv : splat(0.f);
  vc += valid ? splat(1.f) : splat(0.f);
}
RLKERN_INLINE void add_m2(vfloat xv, vint valid, vfloat mean, vfloat& vm2) {
  const vfloat d = xv - mean;
  vm2 += valid ? d * d : splat(0.f);
}

template <typename T, bool kM2>
RLKERN_INLINE Moments chunk_moments(const T* x, const uint8_t* m, int64_t len) {
  const int64_t full = len - len % kLanes, tail = len - full;
  vfloat vs = splat(0.f), vc = splat(0.f);
  for (int64_t j = 0; j < full; j += kLanes) add_sum<T>(load16(x + j), load_mask16(m + j), vs, vc);
  if (tail) add_sum<T>(load_tail(x + full, tail, 0.f), load_mask_tail(m + full, tail), vs, vc);
  const float count = hsum(vc), sum = hsum(vs);
  if (!kM2 || count == 0.f) return {count, sum, 0.0};
  const vfloat mean = splat(sum / count);
  vfloat vm2 = splat(0.f);
  for (int64_t j = 0; j < full; j += kLanes) add_m2(load16(x + j), load_mask16(m + j), mean, vm2);
  if (tail) add_m2(load_tail(x + full, tail, 0.f), load_mask_tail(m + full, tail), mean, vm2);
  return {count, sum, hsum(vm2)};
}

template <typename T, bool kM2>
RLKERN_INLINE Moments segment_moments(const T* x, const uint8_t* m, int64_t len) {
  Moments acc;
  for (int64_t c = 0; c < len; c += kChunk) acc = merge(acc, chunk_moments<T, kM2>(x + c, m + c, std::min(kChunk, len - c)));
  return acc;
}

template <typename T>
RLKERN_INLINE void moments_range(int64_t b, int64_t e, int64_t seg, int64_t numel, const T* x, const uint8_t* m,
                                 bool want_m2, Moments* out) {
  for (int64_t r = b; r < e; ++r) {
    const int64_t o = r * seg, len = std::min(seg, numel - o);
    out[r] = want_m2 ? segment_moments<T, true>(x + o, m + o, len) : segment_moments<T, false>(x + o, m + o, len);
  }
}

// S1 = sum gy, S2 = sum gy (x - mu) over a segment: fp32 per chunk, float64 across chunks.
template <typename T>
RLKERN_INLINE void dot_range(int64_t b, int64_t e, int64_t seg, int64_t numel, const float* gy, const T* x,
                             const float* mu, bool one_mean, double* s1, double* s2) {
  for (int64_t r = b; r < e; ++r) {
    const int64_t o = r * seg, len = std::min(seg, numel - o);
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

struct AffineCoefficients {
  const float *mu, *a, *b, *c;
};

template <typename T, typename O>
RLKERN_INLINE void affine_range(int64_t begin, int64_t end, int64_t seg, const T* x, const uint8_t* m,
                                const float* gy, const AffineCoefficients& k, O* out) {
  for (int64_t i = begin; i < end;) {
    const int64_t r = i / seg;
    const int64_t stop = std::min(end, (r + 1) * seg);
    const vfloat mu = splat(k.mu[r]), a = splat(k.a[r]), b = splat(k.b[r]), c = splat(k.c[r]);
    const int64_t full = stop - (stop - i) % kLanes;
    if (m != nullptr && gy != nullptr) {
      for (int64_t j = i; j < full; j += kLanes) {
        const vfloat affine = load_mask16(m + j) ? a + b * (load16(x + j) - mu) : splat(0.f);
        store16(out + j, load16(gy + j) * c + affine);
      }
    } else if (m != nullptr) {
      for (int64_t j = i; j < full; j += kLanes) {
        const vfloat affine = load_mask16(m + j) ? a + b * (load16(x + j) - mu) : splat(0.f);
        store16(out + j, c + affine);
      }
    } else {
      for (int64_t j = i; j < full; j += kLanes) store16(out + j, c + (a + b * (load16(x + j) - mu)));
    }
    if (full < stop) {
      const int64_t n = stop - full;
      vfloat affine = a + b * (load_tail(x + full, n, 0.f) - mu);
      if (m != nullptr) affine = load_mask_tail(m + full, n) ? affine : splat(0.f);
      const vfloat base = gy != nullptr ? load_tail(gy + full, n, 0.f) * c : c;
      store_tail(out + full, base + affine, n);
    }
    i = stop;
  }
}


#define RLKERN_MASKED_KERNELS(T, SUFFIX)                                                                      \
  RLKERN_AT_LEVELS(moments_##SUFFIX,                                                                                 \
                   (int64_t b, int64_t e, int64_t seg, int64_t numel, const T* x, const uint8_t* m, bool want_m2,   \
                    Moments* out),                                                                                  \
                   (b, e, seg, numel, x, m, want_m2, out), (moments_range<T>(b, e, seg, numel, x, m, want_m2, out))) \
  RLKERN_AT_LEVELS(dot_##SUFFIX,                                                                                     \
                   (int64_t b, int64_t e, int64_t seg, int64_t numel, const float* gy, const T* x, const float* mu, \
                    bool one_mean, double* s1, double* s2),                                                         \
                   (b, e, seg, numel, gy, x, mu, one_mean, s1, s2),                                                 \
                   (dot_range<T>(b, e, seg, numel, gy, x, mu, one_mean, s1, s2)))                                   \
  RLKERN_AT_LEVELS(affine_f32_##SUFFIX,                                                                              \
                   (int64_t b, int64_t e, int64_t seg, const T* x, const uint8_t* m, const float* gy,               \
                    const AffineCoefficients& k, float* out),                                                       \
                   (b, e, seg, x, m, gy, k, out), (affine_range<T, float>(b, e, seg, x, m, gy, k, out)))            \
  RLKERN_AT_LEVELS(affine_same_##SUFFIX,                                                                             \
                   (int64_t b, int64_t e, int64_t seg, const T* x, const uint8_t* m, const float* gy,               \
                    const AffineCoefficients& k, T* out),                                                           \
                   (b, e, seg, x, m, gy, k, out), (affine_range<T, T>(b, e, seg, x, m, gy, k, out)))                \
  void moments_any(int64_t b, int64_t e, int64_t seg, int64_t numel, const T* x, const uint8_t* m, bool w,     \
                   Moments* out) {                                                                             \
    moments_##SUFFIX(b, e, seg, numel, x, m, w, out);                                                          \
  }                                                                                                            \
  void dot_any(int64_t b, int64_t e, int64_t seg, int64_t numel, const float* gy, const T* x, const float* mu, \
               bool one, double* s1, double* s2) {                                                             \
    dot_##SUFFIX(b, e, seg, numel, gy, x, mu, one, s1, s2);                                                    \
  }                                                                                                            \
  void affine_any(int64_t b, int64_t e, int64_t seg, const T* x, const uint8_t* m, const float* gy,            \
                  const AffineCoefficients& k, float* out) {                                                   \
    affine_f32_##SUFFIX(b, e, seg, x, m, gy, k, out);                                                          \
  }
RLKERN_MASKED_KERNELS(float, f32)
RLKERN_MASKED_KERNELS(c10::BFloat16, bf16)
RLKERN_MASKED_KERNELS(c10::Half, f16)
#undef RLKERN_MASKED_KERNELS

void affine_any(int64_t b, int64_t e, int64_t seg, const c10::BFloat16* x, const uint8_t* m, const float* gy,
                const AffineCoefficients& k, c10::BFloat16* out) {
  affine_same_bf16(b, e, seg, x, m, gy, k, out);
}
void affine_any(int64_t b, int64_t e, int64_t seg, const c10::Half* x, const uint8_t* m, const float* gy,
                const AffineCoefficients& k, c10::Half* out) {
  affine_same_f16(b, e, seg, x, m, gy, k, out);
}

// Rows of the data and the segment length: per-row (merge_all = false) the input is [rows, N] and a
// segment is a row; global (merge_all = true) it is any contiguous tensor cut into kSegment runs.
struct Segments {
  int64_t numel, seg, count;
};
Segments segments_of(const at::Tensor& x, bool merge_all) {
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  const int64_t numel = x.numel();
  if (merge_all) return {numel, kSegment, (numel + kSegment - 1) / kSegment};
  TORCH_CHECK(x.dim() == 2, "per-row statistics need a 2-d [rows, N] tensor");
  const int64_t seg = std::max<int64_t>(x.size(1), 1);
  return {numel, seg, x.size(0)};
}

const uint8_t* mask_of(const at::Tensor& mask, const at::Tensor& x) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.sizes() == x.sizes(),
              "mask must be a contiguous bool tensor shaped like x");
  return reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
}

double* f64_out(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.is_contiguous() && t.numel() == n, name,
              " must be a contiguous float64 tensor of ", n, " elements");
  return t.data_ptr<double>();
}

const float* f32_in(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, name,
              " must be a contiguous float32 tensor of ", n, " elements");
  return t.data_ptr<float>();
}

int64_t grain_segments(int64_t seg) { return std::max<int64_t>(1, 65536 / seg); }

}  // namespace

void masked_moments(const at::Tensor& x, const at::Tensor& mask, bool merge_all, bool want_m2, at::Tensor count,
                    at::Tensor sum, at::Tensor m2) {
  const Segments s = segments_of(x, merge_all);
  const uint8_t* m = mask_of(mask, x);
  const int64_t outs = merge_all ? 1 : s.count;
  double* n_out = f64_out(count, outs, "count");
  double* s_out = f64_out(sum, outs, "sum");
  double* m2_out = f64_out(m2, outs, "m2");
  std::vector<Moments> parts(s.count);
  dispatch_storage_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    at::parallel_for(0, s.count, grain_segments(s.seg), [&](int64_t b, int64_t e) {
      moments_any(b, e, s.seg, s.numel, xp, m, want_m2, parts.data());
    });
  });
  if (merge_all) {
    Moments total;
    for (const Moments& p : parts) total = merge(total, p);  // in segment order: thread-count independent
    parts.assign(1, total);
  }
  for (int64_t r = 0; r < outs; ++r) {
    n_out[r] = parts[r].n;
    s_out[r] = parts[r].s;
    m2_out[r] = parts[r].m2;
  }
}

void masked_dot(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& mean, bool merge_all, at::Tensor s1,
                at::Tensor s2) {
  const Segments s = segments_of(x, merge_all);
  const float* g = f32_in(gy, s.numel, "grad");
  const int64_t outs = merge_all ? 1 : s.count;
  const float* mu = f32_in(mean, outs, "mean");
  double* s1_out = f64_out(s1, outs, "s1");
  double* s2_out = f64_out(s2, outs, "s2");
  std::vector<double> p1(s.count), p2(s.count);
  dispatch_storage_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    at::parallel_for(0, s.count, grain_segments(s.seg), [&](int64_t b, int64_t e) {
      dot_any(b, e, s.seg, s.numel, g, xp, mu, merge_all, p1.data(), p2.data());
    });
  });
  if (merge_all) {
    double a = 0, b = 0;
    for (int64_t r = 0; r < s.count; ++r) a += p1[r], b += p2[r];
    s1_out[0] = a;
    s2_out[0] = b;
  } else {
    std::copy(p1.begin(), p1.end(), s1_out);
    std::copy(p2.begin(), p2.end(), s2_out);
  }
}

// out = (gy or 1) * c + [mask] (a + b (x - mu)); `mask` / `gy` may be empty (absent). The output is
// float32 or x's dtype.
void masked_affine(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& gy, const at::Tensor& mu,
                   const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool merge_all, at::Tensor out) {
  const Segments s = segments_of(x, merge_all);
  const int64_t coefs = merge_all ? 1 : s.count;
  const int64_t seg = merge_all ? std::max<int64_t>(s.numel, 1) : s.seg;
  const uint8_t* m = mask.numel() > 0 ? mask_of(mask, x) : nullptr;
  const float* g = gy.numel() > 0 ? f32_in(gy, s.numel, "grad") : nullptr;
  const AffineCoefficients k{f32_in(mu, coefs, "mu"), f32_in(a, coefs, "a"), f32_in(b, coefs, "b"),
                             f32_in(c, coefs, "c")};
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == x.scalar_type()),
              "out must be a contiguous float32 or x-typed tensor shaped like x");
  dispatch_storage_type(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    at::parallel_for(0, s.numel, 32768, [&](int64_t begin, int64_t end) {
      if (out.scalar_type() == at::kFloat) affine_any(begin, end, seg, xp, m, g, k, out.data_ptr<float>());
      else affine_any(begin, end, seg, xp, m, g, k, static_cast<T*>(out.data_ptr()));
    });
  });
}

}  // namespace rlkern
