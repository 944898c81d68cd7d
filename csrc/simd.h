// Portable 16-lane float SIMD for the CPU kernels, written with GCC vector extensions.
//
// Each hot function is compiled three times with RLKERN_CLONES (AVX-512, AVX2+FMA+F16C, baseline
// x86-64) and the loader picks the best one for the CPU, so the wheel runs on any x86-64 and is
// fast on recent ones. The helpers below are always_inline so they take the target of their caller.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && !defined(__clang__)
#define RLKERN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLKERN_CLONES
#endif
#define RLKERN_INLINE inline __attribute__((always_inline))

namespace rlkern {

// The CPU's x86-64 micro-architecture level (4: AVX-512, 3: AVX2+FMA, 0: baseline), probed once.
inline int cpu_level() {
  static const int level = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 0;
  return level;
}

// An alternative to RLKERN_CLONES: builds BODY (a parenthesised call) three times under a plain
// target attribute as NAME_v4 / NAME_v3 / NAME_base and defines NAME dispatching on cpu_level().
// In a standalone test GCC 12 lowered some vector selects (a < b ? x : y) of target_clones
// functions lane by lane, and kept them as mask moves under a target attribute.
#define RLKERN_AT_LEVELS(NAME, PARAMS, ARGS, BODY)                                      \
  __attribute__((target("arch=x86-64-v4"))) void NAME##_v4 PARAMS { return BODY; }    \
  __attribute__((target("arch=x86-64-v3"))) void NAME##_v3 PARAMS { return BODY; }    \
  void NAME##_base PARAMS { return BODY; }                                              \
  void NAME PARAMS {                                                                    \
    switch (::rlkern::cpu_level()) {                                                    \
      case 4: return NAME##_v4 ARGS;                                                    \
      case 3: return NAME##_v3 ARGS;                                                    \
      default: return NAME##_base ARGS;                                                 \
    }                                                                                   \
  }

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
typedef uint32_t vuint __attribute__((vector_size(64)));
typedef uint16_t vushort __attribute__((vector_size(32)));
typedef _Float16 vhalf __attribute__((vector_size(32)));

constexpr float kInf = std::numeric_limits<float>::infinity();

RLKERN_INLINE vfloat splat(float x) { return vfloat{} + x; }

RLKERN_INLINE vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }

RLKERN_INLINE float hsum(vfloat v) {
  // Fixed pairwise order: the result depends only on the lanes, never on threads or batch.
  float acc[kLanes];
  std::memcpy(acc, &v, sizeof(acc));
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) acc[i] += acc[i + w];
  return acc[0];
}

RLKERN_INLINE float hmax(vfloat v) {
  float acc[kLanes];
  std::memcpy(acc, &v, sizeof(acc));
  float m = acc[0];
  for (int i = 1; i < kLanes; ++i) m = acc[i] > m ? acc[i] : m;
  return m;
}

// exp(x) for x <= 0, the only range softmax needs (arguments are always z - max or z - lse).
// Cody-Waite reduction x = n*ln2 + r, |r| <= ln2/2, then Cephes' degree-6 minimax polynomial for
// e^r (max relative error ~1.5 ulp), then 2^n written into the exponent bits. The rounding
// constant 1.5*2^23 + 127 leaves n + 127 (the biased exponent) in the low mantissa bits of t, so
// a single shift builds 2^n. Arguments are clamped at ln(FLT_MIN) ~ -87.3: below it the result is
// ~1.2e-38 instead of 0, which cannot move a float32 sum that holds the max term e^0 = 1; callers
// that need an exact 0 for -inf logits mask it themselves.
RLKERN_INLINE vfloat vexp_nonpos(vfloat x) {
  const vfloat xc = vmax(x, splat(-87.33654f));
  const vfloat shifter = splat(12582912.0f + 127.0f);
  const vfloat t = xc * splat(1.44269504088896341f) + shifter;
  const vfloat n = t - shifter;
  vfloat r = xc - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.0f);
  vint bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = bits << 23;  // n + 127 in [1, 127]: a normal float's exponent field, mantissa 0
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 2^x for x in [-126, 0] (callers clamp: softmax works in log2 units, d2 = (z - max) * log2(e)).
// The rounding constant 1.5*2^23 + 127 leaves n + 127 = round(x) + 127, the biased exponent of
// 2^n, in the low mantissa bits of t, so one shift builds 2^n; r = x - n in [-1/2, 1/2] is exact.
// 2^r is a degree-6 polynomial fitted for relative error on [-1/2, 1/2] (max 1.6 ulp in float32
// Horner form). Cheaper than vexp_nonpos: no Cody-Waite two-step reduction.
RLKERN_INLINE vfloat vexp2_clamped(vfloat x) {
  const vfloat shifter = splat(12582912.0f + 127.0f);
  const vfloat t = x + shifter;
  const vfloat r = x - (t - shifter);
  vfloat p = splat(1.5353361959569156e-4f);
  p = p * r + splat(1.3398875016719103e-3f);
  p = p * r + splat(9.61843691766262e-3f);
  p = p * r + splat(5.5503323674201965e-2f);
  p = p * r + splat(2.4022647738456726e-1f);
  p = p * r + splat(6.931471824645996e-1f);
  p = p * r + splat(1.0f);
  vint bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = bits << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kMinLog2 = -126.0f;  // 2^-126 = FLT_MIN: below it e^{z-max} cannot move a sum >= 1

// Loads 16 values of any supported storage type as float32.
RLKERN_INLINE vfloat load16(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
RLKERN_INLINE vfloat load16(const c10::BFloat16* p) {
  vushort h;
  std::memcpy(&h, p, sizeof(h));
  vuint bits = __builtin_convertvector(h, vuint) << 16;  // bf16 is the top half of a float32
  vfloat v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
RLKERN_INLINE vfloat load16(const c10::Half* p) {
  vhalf h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, vfloat);
}

// Stores 16 float32 values in a storage type, rounding to nearest even like torch's .to(dtype).
RLKERN_INLINE void store16(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
RLKERN_INLINE void store16(c10::BFloat16* p, vfloat v) {
  vuint bits;
  std::memcpy(&bits, &v, sizeof(bits));
  vuint rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const vint is_nan = v != v;  // rounding must not turn a NaN payload into an infinity
  rounded = is_nan ? vuint{} + 0x7FC0u : rounded;
  vushort h = __builtin_convertvector(rounded, vushort);
  std::memcpy(p, &h, sizeof(h));
}
RLKERN_INLINE void store16(c10::Half* p, vfloat v) {
  vhalf h = __builtin_convertvector(v, vhalf);
  std::memcpy(p, &h, sizeof(h));
}

// Tail handling: copy the last n < 16 elements into a padded float buffer (pad = `fill`).
template <typename T>
RLKERN_INLINE vfloat load_tail(const T* p, int64_t n, float fill) {
  float buf[kLanes];
  for (int i = 0; i < kLanes; ++i) buf[i] = i < n ? static_cast<float>(p[i]) : fill;
  return load16(buf);
}
template <typename T>
RLKERN_INLINE void store_tail(T* p, vfloat v, int64_t n) {
  float buf[kLanes];
  store16(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);
}

// Masks are read in the caller's dtype, "nonzero = valid" (verl passes float masks, TRL int64,
// others bool): no conversion pass in Python. Storage types: bool and uint8 (as uint8_t), int32_t,
// int64_t, float, c10::BFloat16, c10::Half (csrc/dispatch.h dispatches on them). A NaN mask value
// is nonzero, so valid; -0.0 is zero.
//
// mask16 gives the 16 lanes as float 1/0. The values are converted to float first and compared
// there: a nonzero int of any size converts to a nonzero float, and an integer-vector `!= 0` is what
// GCC 12 scalarises inside target_clones (a float compare is not).
template <typename M>
RLKERN_INLINE vfloat mask_values16(const M* p) {
  if constexpr (std::is_same_v<M, float> || std::is_same_v<M, c10::BFloat16> || std::is_same_v<M, c10::Half>) {
    return load16(p);
  } else {
    typedef M vm __attribute__((vector_size(sizeof(M) * kLanes)));
    vm raw;
    std::memcpy(&raw, p, sizeof(raw));
    return __builtin_convertvector(raw, vfloat);
  }
}
template <typename M>
RLKERN_INLINE vfloat mask16(const M* p) {
  return -__builtin_convertvector(mask_values16(p) != splat(0.f), vfloat);
}
template <typename M>
RLKERN_INLINE vfloat mask_tail(const M* p, int64_t n) {
  M buf[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
  return mask16(buf);
}
// One mask element, for scalar loops.
template <typename M>
RLKERN_INLINE bool mask_at(const M* p) {
  return static_cast<float>(*p) != 0.f;
}

}  // namespace rlkern
