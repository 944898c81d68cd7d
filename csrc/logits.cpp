// Token log-probs and entropy from logits in one streaming pass: the C++ CPU kernels.
//
// Forward, per row of V logits x and label y, with z = x / temperature and m = max_j z_j:
//   S = sum_j e^{z_j - m},  T = sum_j e^{z_j - m} (z_j - m)     online over blocks of the row
//   lse = m + log S,  logp = (z_y - m) - log S (0 where y == ignore_index),  H = log S - T / S
//   and, on request, Q = sum_j e^{2 (z_j - m)}: sum_j p_j^2 = Q / S^2 (not differentiated)
// Backward, with p = exp(z - lse), upstream grads g (log-prob) and h (entropy):
//   d z_j = g (1[j=y] - p_j) - h p_j (z_j - lse + H),   d x = d z / temperature.
// Only lse and H (fp32, one each per row) are saved between the two; nothing of size V.
// The temperature is one scalar or one per row (`temperatures`, float32 [rows]); every temperature
// is checked before any row runs (a CPU pass over rows floats, no cost next to the logits).
//
// Accuracy: everything is relative to the row max in natural units, and z is the correctly
// rounded quotient x / T that torch's `logits / temperature` gives, so z_y - m is exactly torch's
// and logp = 0 exactly at the argmax at any scale (|z| up to 3e38). An earlier version worked in
// log2 units (z log2 e - m log2 e): its error grew like |m| 2^-23 (logp > 0 once |z| ~ 1e2..1e9).
//
// Non-finite inputs, the same on every backend (see rlkern/ops/logits.py): a NaN or +inf
// logit anywhere in a row makes that row's lse, logp (unless ignored), entropy and whole gradient
// row NaN, as float64 torch.log_softmax does; -inf logits are banned tokens (p = 0); a row of
// only -inf has lse = logp = -inf and entropy 0. The 16-lane padding of a row's tail reads as
// -inf and contributes exactly 0 (see kMinExp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "logits.h"
#include "dispatch.h"
#include "outputs.h"
#include "simd.h"

// ISA levels. The row kernels are compiled once per level L, each under a plain target attribute
// (RLKERN_LEVEL_* below), and isa_level() picks one per process:
//   5: AVX-512 (x86-64-v4) + AVX512-BF16, 4: AVX-512, 3: AVX2 + FMA (x86-64-v3), 0: baseline x86-64
//   (and every non-GCC or non-x86 build).
// GCC 12 lowers a select (c ? a : b) of 16-lane vectors lane by lane when the target has no 512-bit
// registers: the AVX2 clone ran every clamp, max and NaN guard as 16 scalar compares and cmovs
// (seen with objdump). The helpers below spell those per level: at L3 on two native 8-lane halves,
// at L4+ as vmaxps (one instruction where the select was a compare and a masked move), and at L5
// the bf16 rounding of the gradient is vcvtne2ps2bf16. At L4+ the exps are table-driven (exp_table,
// exp_table32: vpermps / vpermt2ps + vscalefps, under MXCSR.FTZ), so the levels agree to a few ulp,
// not bit for bit (tests/test_logits_hostile.py::test_every_isa_level_agrees). They call GCC's __builtin_ia32_* directly:
// the _mm* intrinsics are always_inline functions with their own target, which GCC refuses to
// inline into these generic helpers; a builtin is checked only where it is expanded, inside a
// kernel compiled for a target that has it.
#if defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 12
#include <immintrin.h>
#define RLKERN_LOGITS_X86 1
#else
#define RLKERN_LOGITS_X86 0
#endif

namespace rlkern {
namespace {

// The level the row kernels run at: the CPU's, capped by RLKERN_LOGITS_ISA (an integer) if set, so
// tests can run the AVX2 and baseline kernels on an AVX-512 machine.
int isa_level() {
  static const int level = [] {
    int l = 0;
#if RLKERN_LOGITS_X86
    l = cpu_level();
    if (l == 4 && __builtin_cpu_supports("avx512bf16")) l = 5;
#endif
    if (const char* cap = std::getenv("RLKERN_LOGITS_ISA")) l = std::min(l, std::atoi(cap));
    return l;
  }();
  return level;
}

// Halves of a 16-lane vector (4-byte lanes) as native AVX2 vectors, and back.
template <typename V>
RLKERN_INLINE auto lo8(V v) {
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
}
template <typename V>
RLKERN_INLINE auto hi8(V v) {
  return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}
// Joined through a union: __builtin_shufflevector stored the lanes one by one (vextractps) at L3.
template <typename V8>
RLKERN_INLINE auto join16(V8 lo, V8 hi) {
  typedef decltype(lo[0]) E;
  typedef std::remove_cv_t<std::remove_reference_t<E>> Elem;
  typedef Elem V16 __attribute__((vector_size(2 * sizeof(V8))));
  union {
    V8 h[2];
    V16 v;
  } u{{lo, hi}};
  return u.v;
}

// a > b ? a : b, and b where either is NaN (the x86 max instruction's rule, and simd.h's vmax).
template <int L>
RLKERN_INLINE vfloat max_at(vfloat a, vfloat b) {
#if RLKERN_LOGITS_X86
  if constexpr (L >= 4) {
    return __builtin_ia32_maxps512_mask(a, b, a, static_cast<__mmask16>(-1), _MM_FROUND_CUR_DIRECTION);
  } else if constexpr (L == 3) {
    return join16(__builtin_ia32_maxps256(lo8(a), lo8(b)), __builtin_ia32_maxps256(hi8(a), hi8(b)));
  }
#endif
  return vmax(a, b);
}

// z, or q in the lanes where z is NaN.
template <int L>
RLKERN_INLINE vfloat unless_nan(vfloat z, vfloat q) {
  if constexpr (L == 3) {
    const auto zl = lo8(z), zh = hi8(z), ql = lo8(q), qh = hi8(q);
    return join16(zl == zl ? zl : ql, zh == zh ? zh : qh);
  } else {
    return z == z ? z : q;
  }
}

// Horizontal sum and max of the 16 lanes as a tree of halves: the pairs and order of simd.h's hsum
// (lane i + lane i + w for w = 8, 4, 2, 1), so the same bits, but in registers: its scalar loop went
// through the stack with store-forwarding stalls, the largest cost of a row at small V.
template <int L>
RLKERN_INLINE float hsum_at(vfloat v) {
  if constexpr (L >= 3) {
    const auto s8 = lo8(v) + hi8(v);
    const auto s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
    const auto s2 = __builtin_shufflevector(s4, s4, 0, 1) + __builtin_shufflevector(s4, s4, 2, 3);
    return s2[0] + s2[1];
  } else {
    return hsum(v);
  }
}
// Lanes holding NaN may win or lose here (unlike hmax, which skips them unless lane 0 holds one):
// a NaN logit makes its row NaN whichever maximum the row then uses.
template <int L>
RLKERN_INLINE float hmax_at(vfloat v) {
  if constexpr (L >= 3) {
    auto m8 = lo8(v), h8 = hi8(v);
    m8 = m8 > h8 ? m8 : h8;
    auto m4 = __builtin_shufflevector(m8, m8, 0, 1, 2, 3), h4 = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
    m4 = m4 > h4 ? m4 : h4;
    const float a = m4[0] > m4[1] ? m4[0] : m4[1], b = m4[2] > m4[3] ? m4[2] : m4[3];
    return a > b ? a : b;
  } else {
    return hmax(v);
  }
}

// 16 floats to memory; at L3 as two halves (a whole 64-byte vector went through the stack there).
template <int L>
RLKERN_INLINE void store_at(float* p, vfloat v) {
  if constexpr (L == 3) {
    const auto lo = lo8(v), hi = hi8(v);
    std::memcpy(p, &lo, sizeof(lo));
    std::memcpy(p + kLanes / 2, &hi, sizeof(hi));
  } else {
    store16(p, v);
  }
}

// 2048 logits (8 KiB of fp32) per block: the block is read from memory once for its max, then again
// from L1 for the exponentials, so the whole row costs one pass over memory and one exp per logit.
constexpr int64_t kBlock = 2048;
// How far ahead (in logits) the passes over a row prefetch: the backward 2048 logits (8 KiB of fp32,
// 4 KiB of bf16), the forward two blocks. A prefetch never faults, so running past the row's end is
// harmless (and warms the next row). Without them the exp loops, ~20 instructions per 16 logits,
// keep too few cache lines in flight: fp32 forward + in-place backward went from 1.6x to ~1.2x of
// its streaming floor on this 2-core machine.
constexpr int64_t kPrefetch = 2048;
constexpr int64_t kAheadFwd = 2 * kBlock;
// ln(2^-127): d = z - m is clamped here, so d * log2 e >= -127.00001, which vexp2_clamped rounds to
// the exponent -127, whose biased field 0 builds the scale +0.0: e^{d} is then exactly 0 (and
// e * d too), so -inf logits and the padding lanes of a row's tail add exactly nothing. Terms
// between e^-88.03 and e^-87.3 are lost with them: relative 1e-38 of a sum that holds e^0 = 1.
constexpr float kMinExp = -88.0296919f;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

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

// z = x / temperature rounded as float32 division rounds it (torch divides the logits). When 1/T is
// a power of two the product x * (1/T) is that quotient; otherwise Markstein's correction makes it
// so: q = RN(x * RN(1/T)) is within one ulp, r = x - q T is exact in one FMA, and RN(q + r RN(1/T))
// is the correctly rounded quotient (Muller et al., Handbook of Floating-Point Arithmetic, 2nd ed.,
// Thm 4.10). Where q is not finite (x = +-inf, NaN, or x / T overflows) r is NaN or the sum is
// inf - inf, and q itself is the answer. vfma is vfmadd at AVX-512 and a per-lane __builtin_fmaf
// loop below that (vfmadd at AVX2; the baseline kernels call fmaf, slower but exact).
struct Temperature {
  float temp;  // float32(T)
  float inv;   // RN(1 / float32(T))
};

template <int L>
RLKERN_INLINE vfloat vfma(vfloat a, vfloat b, vfloat c) {
#if RLKERN_LOGITS_X86
  if constexpr (L >= 4) {  // the lane loop below became scalar vfmadd132ss + valignd at AVX-512
    return __builtin_ia32_vfmaddps512_mask(a, b, c, static_cast<__mmask16>(-1), _MM_FROUND_CUR_DIRECTION);
  } else if constexpr (L == 3) {  // and scalar vfmadd132ss at AVX2
    return join16(__builtin_ia32_vfmaddps256(lo8(a), lo8(b), lo8(c)),
                  __builtin_ia32_vfmaddps256(hi8(a), hi8(b), hi8(c)));
  }
#endif
  vfloat out;
  for (int i = 0; i < kLanes; ++i) out[i] = __builtin_fmaf(a[i], b[i], c[i]);
  return out;
}

// e^d at AVX-512 (L >= 4), for d <= 0 (clamped, see min_exp_at) or NaN, as 2^{d log2 e} = 2^b 2^r:
// b = d log2 e rounded to a multiple of 1/16 (t = d log2 e + 1.5 * 2^19 has ulp 1/16, and
// b = t - 1.5 * 2^19 exactly), r = d log2 e - b in [-1/32, 1/32] (one FMA, exact product).
// 2^b = 2^{floor b} 2^{k/16} with k = 16 (b - floor b), the low 4 bits of t's mantissa: vpermps reads
// 2^{k/16} from a 16-entry table and vscalefps applies 2^{floor b}. 2^r = 1 + r q(r), q of degree 2
// (minimax for the relative error of 2^r on [-1/32, 1/32]: 1.6e-9, 0.03 ulp), summed as
// 2^{k/16} + (2^{k/16} r) q in one FMA. Nine vector instructions per 16 exps where vexp2_clamped's
// reduction to [-1/2, 1/2] needs a degree-6 polynomial and takes eleven. Error against float64 exp
// (a float32 simulation of both over 2e6 d in [-1, 0]): max 1.09 ulp here, 1.13 for vexp2_clamped;
// over d in [-40, 0] both reach ~10 ulp from float32's log2 e (1.3e-8 relative, times |d log2 e|).
// A result below 2^-126 (b < -126) is 0: the AVX-512 row loops run with MXCSR.FTZ set (FlushToZero
// below); without it each such result takes a microcode assist (~150 cycles per instruction,
// measured on this machine's Sapphire Rapids), and -inf logits or padding would crawl.
// d = NaN gives NaN; d = +inf gives +inf, not NaN (r is NaN, but vscalefps(NaN, +inf) is +inf, seen
// here): the forward passes +inf only in a block whose max lane lost it to a NaN logit (S is NaN
// then anyway), the backward only for a +inf logit against a finite lse, which no forward gives.
#if RLKERN_LOGITS_X86
constexpr float kExpShift16 = 786432.f;  // 1.5 * 2^19
constexpr vfloat kExp2Sixteenths = {0x1.000000p+0f, 0x1.0b5586p+0f, 0x1.172b84p+0f, 0x1.2387a6p+0f,
                                    0x1.306fe0p+0f, 0x1.3dea64p+0f, 0x1.4bfdaep+0f, 0x1.5ab07ep+0f,
                                    0x1.6a09e6p+0f, 0x1.7a1148p+0f, 0x1.8ace54p+0f, 0x1.9c4918p+0f,
                                    0x1.ae89fap+0f, 0x1.c199bep+0f, 0x1.d5818ep+0f, 0x1.ea4afap+0f};
template <int L>
RLKERN_INLINE vfloat exp_table(vfloat d, vfloat table) {
  const vfloat t = vfma<L>(d, splat(kLog2e), splat(kExpShift16));
  const vfloat b = t - splat(kExpShift16);
  const vfloat r = vfma<L>(d, splat(kLog2e), -b);
  const vfloat q = vfma<L>(vfma<L>(splat(0x1.c6ac6cp-5f), r, splat(0x1.ebfff4p-3f)), r, splat(0x1.62e430p-1f));
  vint k;
  std::memcpy(&k, &t, sizeof(k));
  const vfloat tk = __builtin_ia32_permvarsf512_mask(table, k, table, static_cast<__mmask16>(-1));
  const vfloat m = vfma<L>(tk * r, q, tk);  // 2^{k/16} (1 + r q): one rounding after the table's
  return __builtin_ia32_scalefps512_mask(m, b, b, static_cast<__mmask16>(-1), _MM_FROUND_CUR_DIRECTION);
}

// exp_table with 32 entries (vpermt2ps over two registers) and q of degree 1, for the one place whose
// result is stored as bf16: the backward's d logits. r lies in [-1/64, 1/64], where 1 + r q(r) is
// within 5.3e-8 (0.9 of a float32 half-ulp) of 2^r, minimax; the float32 result within 1.9 ulp
// of float64 exp on [-1, 0] (simulated, 2e6 values), against 1.1 ulp for exp_table. Rounded to
// bf16, whose half-ulp is 2^8 float32 ulps, it differs from the bf16 rounding of the correctly
// rounded float32 e^d in 6e-6 of the values (exp_table: 3.5e-6; both off by one bf16 ulp there).
constexpr float kExpShift32 = 393216.f;  // 1.5 * 2^18: t's ulp is 1/32
struct ExpTable32 {
  vfloat lo, hi;  // 2^{k/32} for k = 0..15 and 16..31, or a times those (softmax_grad's kFold)
};
template <int L>
RLKERN_INLINE vfloat exp_table32(vfloat d, const ExpTable32& table) {
  const vfloat t = vfma<L>(d, splat(kLog2e), splat(kExpShift32));
  const vfloat b = t - splat(kExpShift32);
  const vfloat r = vfma<L>(d, splat(kLog2e), -b);
  const vfloat q = vfma<L>(splat(0x1.ebfc02p-3f), r, splat(0x1.62e584p-1f));
  vint k;
  std::memcpy(&k, &t, sizeof(k));
  const vfloat tk = __builtin_ia32_vpermt2varps512_mask(k, table.lo, table.hi, static_cast<__mmask16>(-1));
  const vfloat m = vfma<L>(tk * r, q, tk);
  return __builtin_ia32_scalefps512_mask(m, b, b, static_cast<__mmask16>(-1), _MM_FROUND_CUR_DIRECTION);
}
constexpr ExpTable32 kExp2ThirtySeconds = {
    {0x1.0p+0f, 0x1.059b0ep+0f, 0x1.0b5586p+0f, 0x1.11301ep+0f, 0x1.172b84p+0f, 0x1.1d4874p+0f, 0x1.2387a6p+0f,
     0x1.29e9e0p+0f, 0x1.306fe0p+0f, 0x1.371a74p+0f, 0x1.3dea64p+0f, 0x1.44e086p+0f, 0x1.4bfdaep+0f, 0x1.5342b6p+0f,
     0x1.5ab07ep+0f, 0x1.6247ecp+0f},
    {0x1.6a09e6p+0f, 0x1.71f75ep+0f, 0x1.7a1148p+0f, 0x1.82589ap+0f, 0x1.8ace54p+0f, 0x1.93737cp+0f, 0x1.9c4918p+0f,
     0x1.a5503cp+0f, 0x1.ae89fap+0f, 0x1.b7f770p+0f, 0x1.c199bep+0f, 0x1.cb720ep+0f, 0x1.d5818ep+0f, 0x1.dfc974p+0f,
     0x1.ea4afap+0f, 0x1.f50766p+0f}};
#endif

// Where d = z - max (or z - lse) is clamped so that e^d is exactly 0 there (-inf logits, padding):
// kMinExp for vexp2_clamped; at AVX-512 -177, where d log2 e < -255 and even |a| 2^{k/16} 2^{floor b}
// (|a| < 2^126, softmax_grad's kFold) is below 2^-129, flushed to 0. Both clamp only terms < 2^-126.
template <int L>
constexpr float min_exp_at() {
  return L >= 4 ? -177.f : kMinExp;
}

// e^d for d clamped at min_exp_at<L>: exp_table at AVX-512, vexp2_clamped below it.
template <int L>
RLKERN_INLINE vfloat exp_at(vfloat d) {
#if RLKERN_LOGITS_X86
  if constexpr (L >= 4) return exp_table<L>(d, kExp2Sixteenths);
#endif
  return vexp2_clamped(d * splat(kLog2e));
}

// MXCSR.FTZ for the AVX-512 row loops (see exp_table), set once per range of rows and restored on
// exit. The per-row scalar maths runs under it too: any of its results below 2^-126 (a rescale
// factor of sums that then hold a term 1, a label gradient of magnitude < 1.2e-38) becomes 0.
struct FlushToZero {
#if RLKERN_LOGITS_X86
  unsigned saved = __builtin_ia32_stmxcsr();
  FlushToZero() { __builtin_ia32_ldmxcsr(saved | 0x8000u); }
  ~FlushToZero() { __builtin_ia32_ldmxcsr(saved); }
#endif
};

template <bool kExact, int L>
RLKERN_INLINE vfloat scaled(vfloat x, const Temperature& t) {
  const vfloat q = x * splat(t.inv);
  if constexpr (kExact) {
    return q;
  } else {
    return unless_nan<L>(vfma<L>(vfma<L>(-q, splat(t.temp), x), splat(t.inv), q), q);
  }
}

template <bool kExact>
RLKERN_INLINE float scaled(float x, const Temperature& t) {
  const float q = x * t.inv;
  if constexpr (kExact) {
    return q;
  } else {
    const float z = __builtin_fmaf(__builtin_fmaf(-q, t.temp, x), t.inv, q);
    return z == z ? z : q;
  }
}

// 32 consecutive values as two vectors, for the hot loops. bf16 widens with one shift or one mask
// per 16 values: a 64-byte load holds 16 (even, odd) pairs, `bits << 16` is the even elements as
// float32 and `bits & 0xFFFF0000` the odd ones. Reductions do not care about that lane order, and
// store32 undoes it, so a loop body may treat (a, b) as any two 16-value vectors.
RLKERN_INLINE void load32(const float* p, vfloat& a, vfloat& b) {
  a = load16(p);
  b = load16(p + kLanes);
}
RLKERN_INLINE void load32(const c10::Half* p, vfloat& a, vfloat& b) {
  a = load16(p);
  b = load16(p + kLanes);
}
RLKERN_INLINE void load32(const c10::BFloat16* p, vfloat& a, vfloat& b) {
  vuint w;
  std::memcpy(&w, p, sizeof(w));
  const vuint even = w << 16, odd = w & 0xFFFF0000u;
  std::memcpy(&a, &even, sizeof(a));
  std::memcpy(&b, &odd, sizeof(b));
}
template <int L>
RLKERN_INLINE void store32(float* p, vfloat a, vfloat b) {
  store_at<L>(p, a);
  store_at<L>(p + kLanes, b);
}
template <int L>
RLKERN_INLINE void store32(c10::Half* p, vfloat a, vfloat b) {
  store16(p, a);
  store16(p + kLanes, b);
}
// float32 -> bf16 rounding to nearest even, as torch's .to(bfloat16): the result in the top 16 bits.
// A NaN becomes the quiet NaN 0x7FC0: rounding its bits could carry into an infinity.
template <int L>
RLKERN_INLINE vuint round_to_bf16(vfloat v) {
  vuint bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const vuint rounded = bits + 0x7FFFu + ((bits >> 16) & 1u), nan = vuint{} + 0x7FC00000u;
  if constexpr (L == 3) {
    const auto vl = lo8(v), vh = hi8(v);
    return join16(vl != vl ? lo8(nan) : lo8(rounded), vh != vh ? hi8(nan) : hi8(rounded));
  } else {
    return v != v ? nan : rounded;
  }
}
template <int L>
RLKERN_INLINE void store32(c10::BFloat16* p, vfloat a, vfloat b) {
#if RLKERN_LOGITS_X86
  if constexpr (L >= 5) {
    // One instruction rounds all 32 to nearest even as torch does (a NaN stays a NaN; values below
    // 2^-126, which no gradient here reaches above 0, become 0): words 0-15 from a, 16-31 from b.
    // vpermw interleaves them back into memory order (a holds the even elements, b the odd).
    typedef int16_t v32 __attribute__((vector_size(64)));
    constexpr v32 kInterleave = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    v32 words;  // vcvtne2ps2bf16 as inline asm: its builtin's name changed in GCC 13
    asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(words) : "v"(b), "v"(a));
    const v32 out = __builtin_ia32_permvarhi512_mask(words, kInterleave, v32{}, static_cast<__mmask32>(-1));
    std::memcpy(p, &out, sizeof(out));
    return;
  }
#endif
  const vuint w = (round_to_bf16<L>(a) >> 16) | (round_to_bf16<L>(b) & 0xFFFF0000u);
  std::memcpy(p, &w, sizeof(w));
}

struct RowStats {
  float m;      // max_j z_j (-inf for a fully banned row)
  float log_s;  // log sum_j e^{z_j - m}; NaN for a row holding a NaN or +inf logit
  float entropy;
  float sum_p2;  // sum_j p_j^2 (0 for a fully banned row, as its entropy)
  float lse() const { return m + log_s; }
};

// Adds e = e^{d} to vs and, for entropy, e * d to vt, where d = z - m <= 0. d is clamped at
// min_exp_at<L> so that -inf logits add exactly 0 and e * d stays 0 rather than 0 * -inf = NaN; the
// clamp is max_at(min, d), which returns d where d is NaN: a NaN logit passes through into the sums
// instead of being clamped away.
// With kP2 also e^2 to vq (e^{2d} = 0 where e is 0: banned logits and padding add nothing there too).
template <bool kEntropy, bool kP2, bool kExact, int L>
RLKERN_INLINE void accumulate_exp(vfloat xv, const Temperature& t, vfloat vm, vfloat& vs, vfloat& vt,
                                  vfloat& vq) {
  const vfloat d = max_at<L>(splat(min_exp_at<L>()), scaled<kExact, L>(xv, t) - vm);
  const vfloat e = exp_at<L>(d);
  vs += e;
  if constexpr (kEntropy) vt += e * d;
  if constexpr (kP2) vq += e * e;
}

template <typename T, int L>
RLKERN_INLINE float block_max(const T* xb, int64_t len) {
  // Four accumulators: the max pass is bound by the latency of vmax, not by loads. vmax ignores NaN
  // (a NaN operand loses every comparison); NaN is caught by the exp pass or has_nan below.
  vfloat m0 = splat(-kInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 * kLanes <= len; j += 4 * kLanes) {
    vfloat a, b, c, d;
    load32(xb + j, a, b);
    load32(xb + j + 2 * kLanes, c, d);
    m0 = max_at<L>(m0, a);
    m1 = max_at<L>(m1, b);
    m2 = max_at<L>(m2, c);
    m3 = max_at<L>(m3, d);
  }
  for (; j + kLanes <= len; j += kLanes) m0 = max_at<L>(m0, load16(xb + j));
  if (j < len) m1 = max_at<L>(m1, load_tail(xb + j, len - j, -kInf));
  return hmax_at<L>(max_at<L>(max_at<L>(m0, m1), max_at<L>(m2, m3)));
}

// Only reached for blocks that the exp pass skips (every non-NaN logit so far is -inf).
template <typename T>
bool has_nan(const T* xb, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    const float v = static_cast<float>(xb[j]);
    if (v != v) return true;
  }
  return false;
}

// The softmax statistics of one row: the online (max, S, T) recurrence over blocks.
template <typename T, bool kEntropy, bool kP2, bool kExact, int L>
RLKERN_INLINE RowStats row_stats(const T* x, int64_t vocab, const Temperature& t) {
  float m = -kInf, S = 0.f, T1 = 0.f, Q = 0.f;
  bool saw_nan = false;
  for (int64_t j0 = 0; j0 < vocab; j0 += kBlock) {
    const int64_t len = std::min(kBlock, vocab - j0);
    const T* xb = x + j0;
    // x -> x / T is monotone (T > 0, and rounding is monotone), so max(x) / T is max(x / T).
    const float new_max = scaled<kExact>(block_max<T, L>(xb, len), t);
    if (new_max > m) {
      if (S > 0.f) {  // rescale the running sums from the old max to the new one
        const float shift = m - new_max;
        const float c = std::exp(shift);
        // c == 0 when the old terms vanish next to the new max; shift * S could then be -inf.
        T1 = c > 0.f ? c * (T1 + shift * S) : 0.f;
        S *= c;
        if constexpr (kP2) Q *= c * c;
      }
      m = new_max;
    }
    if (m == -kInf) {  // every logit so far is -inf (banned) or NaN: no exp pass, so look for NaN
      saw_nan = saw_nan || has_nan(xb, len);
      continue;
    }
    const vfloat vm = splat(m);
    // Two independent accumulator pairs hide the latency of the vector adds.
    vfloat vs0 = splat(0.f), vt0 = splat(0.f), vs1 = splat(0.f), vt1 = splat(0.f);
    vfloat vq0 = splat(0.f), vq1 = splat(0.f);  // unused (and optimised away) without kP2
    int64_t j = 0;
    for (; j + 2 * kLanes <= len; j += 2 * kLanes) {
      // Keep the memory stream two blocks ahead while this block is in the exp loop, so the stream
      // and the arithmetic overlap instead of alternating.
      __builtin_prefetch(xb + kAheadFwd + j, 0, 3);
      if constexpr (sizeof(T) == 4) __builtin_prefetch(xb + kAheadFwd + j + kLanes, 0, 3);
      vfloat a, b;
      load32(xb + j, a, b);
      accumulate_exp<kEntropy, kP2, kExact, L>(a, t, vm, vs0, vt0, vq0);
      accumulate_exp<kEntropy, kP2, kExact, L>(b, t, vm, vs1, vt1, vq1);
    }
    if (j + kLanes <= len) {
      accumulate_exp<kEntropy, kP2, kExact, L>(load16(xb + j), t, vm, vs0, vt0, vq0);
      j += kLanes;
    }
    if (j < len) accumulate_exp<kEntropy, kP2, kExact, L>(load_tail(xb + j, len - j, -kInf), t, vm, vs1, vt1, vq1);
    S += hsum_at<L>(vs0 + vs1);
    if constexpr (kEntropy) T1 += hsum_at<L>(vt0 + vt1);
    if constexpr (kP2) Q += hsum_at<L>(vq0 + vq1);
  }
  // A +inf logit makes m = +inf (float64 log_softmax gives NaN there: inf - inf); a NaN logit
  // reached the sums through d, or was found by has_nan.
  if (saw_nan || m == kInf || S != S) return {m, kNaN, kNaN, kNaN};
  if (m == -kInf) return {-kInf, 0.f, 0.f, 0.f};  // a fully banned row: no distribution, entropy 0
  const float log_s = std::log(S);
  // Q / S / S: S^2 would overflow only past V ~ 2^64, but dividing twice costs nothing per row.
  return {m, log_s, kEntropy ? log_s - T1 / S : 0.f, kP2 ? Q / S / S : 0.f};
}

// What the forward and backward kernels read and write, for the rows [begin, end) a call is given.
template <typename T>
struct ForwardArgs {
  const T* logits;
  RowGeometry geometry;
  const int64_t* labels;  // nullptr: entropy only
  int64_t ignore_index;
  Temperature temperature;  // every row's, unless temps is given
  bool exact;  // 1 / temperature is a power of two: plain-multiply scaling
  const float* temps;  // one temperature per row (checked), or nullptr
  float* logp;  // nullptr without labels
  float* lse;
  float* ent;  // nullptr: no entropy wanted
  float* sum_p2;  // nullptr: no sum p^2 wanted
};

template <typename T>
struct BackwardArgs {
  const T* logits;
  RowGeometry geometry;
  T* grad;  // may be logits itself (inplace_backward)
  RowGeometry grad_geometry;
  const int64_t* labels;
  int64_t ignore_index;
  Temperature temperature;
  bool exact;
  const float* temps;
  const float* grad_logp;  // nullptr: no log-prob gradient
  const float* grad_ent;   // nullptr: no entropy gradient
  const float* lse;
  const float* ent;
};

// The row statistics with the sums a call wants (entropy, sum p^2), picked once per row.
template <typename T, bool kExact, int L>
RLKERN_INLINE RowStats row_stats_for(const T* x, int64_t vocab, const Temperature& t, bool want_entropy,
                                     bool want_p2) {
  if (want_p2) {
    return want_entropy ? row_stats<T, true, true, kExact, L>(x, vocab, t)
                        : row_stats<T, false, true, kExact, L>(x, vocab, t);
  }
  return want_entropy ? row_stats<T, true, false, kExact, L>(x, vocab, t)
                      : row_stats<T, false, false, kExact, L>(x, vocab, t);
}

// Rows [begin, end) at temperature t (the call's, or one row's own).
template <typename T, bool kExact, int L>
RLKERN_INLINE void forward_rows(int64_t begin, int64_t end, const ForwardArgs<T>& args, const Temperature t) {
  // Local copies: the output stores could alias the caller's structs, which would make the compiler
  // reload (and re-broadcast) their fields in every iteration of the inner loops.
  const RowGeometry g = args.geometry;
  const T* logits = args.logits;
  const int64_t* labels = args.labels;
  const int64_t ignore_index = args.ignore_index;
  float *logp = args.logp, *lse = args.lse, *ent = args.ent, *sum_p2 = args.sum_p2;
  const bool want_entropy = ent != nullptr, want_p2 = sum_p2 != nullptr;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = g.row(logits, r);
    const RowStats st = row_stats_for<T, kExact, L>(x, g.vocab, t, want_entropy, want_p2);
    lse[r] = st.lse();
    if (want_entropy) ent[r] = st.entropy;
    if (want_p2) sum_p2[r] = st.sum_p2;
    if (labels != nullptr) {
      const int64_t y = labels[r];
      // torch's log_softmax order, (z_y - m) - log S: exactly -log S at the argmax, never > 0.
      // A fully banned row has log-prob -inf for every label, never -inf - -inf = NaN.
      const float zy = scaled<kExact>(static_cast<float>(x[y == ignore_index ? 0 : y]), t);
      logp[r] = y == ignore_index ? 0.f : st.m == -kInf ? (st.log_s == st.log_s ? -kInf : kNaN)
                                                         : (zy - st.m) - st.log_s;
    }
  }
}

// Per-row constants of the backward, with d = z - lse:
//   d x = p (a + b d),  p = e^{d},  a = -(g + h H) / T,  b = -h / T
// which is d z = -p (g + h (z - lse + H)) scaled by 1/T, without the label's 1[j=y] g term.
struct GradCoefficients {
  vfloat lse, a, b;
  vfloat table;  // with kFold 1: a 2^{k/16}, k = 0..15 (exp_table's table with the factor a in it)
#if RLKERN_LOGITS_X86
  ExpTable32 table32;  // with kFold 2: a 2^{k/32}, k = 0..31
#endif
};

// Without an entropy gradient (b = 0) the factor is a alone: one FMA less per 16 logits. With kFold
// (AVX-512, no entropy gradient, |a| < 2^126 so that a 2^{k/16} stays finite) a rides in exp_table's
// table: p a = 2^{floor b} (a 2^{k/16}) (1 + r q), one multiply less again; the extra rounding of
// a 2^{k/16} (half an ulp) replaces that of p * a. kFold 2 (bf16 gradients) is exp_table32's.
template <bool kExact, bool kEntropyGrad, int kFold, int L>
RLKERN_INLINE vfloat softmax_grad(vfloat xv, const Temperature& t, const GradCoefficients& c) {
  // Clamped at min_exp_at<L>, where e^d is exactly 0: so is the gradient of a -inf logit (d = -inf)
  // and of any logit below e^-88.03 (-177 at AVX-512), and a + b d stays finite. A NaN d passes the clamp.
  const vfloat d = max_at<L>(splat(min_exp_at<L>()), scaled<kExact, L>(xv, t) - c.lse);
#if RLKERN_LOGITS_X86
  if constexpr (kFold == 1) return exp_table<L>(d, c.table);
  if constexpr (kFold == 2) return exp_table32<L>(d, c.table32);
#endif
  const vfloat p = exp_at<L>(d);
  if constexpr (kEntropyGrad) {
    return p * (c.a + c.b * d);
  } else {
    return p * c.a;
  }
}

// a 2^{k/16} for softmax_grad's kFold (unused below AVX-512).
template <int L>
RLKERN_INLINE vfloat fold_table(float a) {
#if RLKERN_LOGITS_X86
  if constexpr (L >= 4) return splat(a) * kExp2Sixteenths;
#endif
  return splat(a);
}

// d logits of one row but the label's term: dx = softmax_grad(x) over the row's vocab.
template <typename T, bool kExact, bool kEntropyGrad, int kFold, int L>
RLKERN_INLINE void backward_row(const T* x, T* dx, int64_t vocab, const Temperature& t, const GradCoefficients& c) {
  int64_t j = 0;
  for (; j + 2 * kLanes <= vocab; j += 2 * kLanes) {
    // Software prefetch far ahead: the loop body is long enough (two exps per 32 logits) that the
    // out-of-order window alone keeps few cache lines in flight, and the stream stalls on memory.
    __builtin_prefetch(x + j + kPrefetch, 0, 3);
    if constexpr (sizeof(T) == 4) __builtin_prefetch(x + j + kPrefetch + kLanes, 0, 3);
    if (dx != x) {
      __builtin_prefetch(dx + j + kPrefetch, 1, 3);
      if constexpr (sizeof(T) == 4) __builtin_prefetch(dx + j + kPrefetch + kLanes, 1, 3);
    }
    vfloat a, b;
    load32(x + j, a, b);
    store32<L>(dx + j, softmax_grad<kExact, kEntropyGrad, kFold, L>(a, t, c),
               softmax_grad<kExact, kEntropyGrad, kFold, L>(b, t, c));
  }
  for (; j + kLanes <= vocab; j += kLanes) {
    store16(dx + j, softmax_grad<kExact, kEntropyGrad, kFold, L>(load16(x + j), t, c));
  }
  if (j < vocab) {
    const int64_t n = vocab - j;
    store_tail(dx + j, softmax_grad<kExact, kEntropyGrad, kFold, L>(load_tail(x + j, n, -kInf), t, c), n);
  }
}

template <typename T, bool kExact, bool kEntropyGrad, int L>
RLKERN_INLINE void backward_rows(int64_t begin, int64_t end, const BackwardArgs<T>& args, const Temperature t) {
  const RowGeometry g = args.geometry, gg = args.grad_geometry;  // local copies, as in forward_rows
  const T* logits = args.logits;
  T* grad = args.grad;
  const int64_t* labels = args.labels;
  const int64_t ignore_index = args.ignore_index;
  const float *grad_logp = args.grad_logp, *grad_ent = args.grad_ent, *lse = args.lse, *ent = args.ent;
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
    const float zy = has_label ? scaled<kExact>(static_cast<float>(x[y]), t) : 0.f;
    if (row_lse == -kInf || row_lse != row_lse) {
      // A fully banned row gets no gradient; a row with a NaN / +inf logit gets NaN everywhere,
      // as torch's log_softmax backward gives (NaN * 0 is NaN even where the upstream grad is 0).
      const T fill = T(row_lse == -kInf ? 0.f : kNaN);
      for (int64_t j = 0; j < g.vocab; ++j) dx[j] = fill;
      continue;
    }
    const float a = -(gl + gh * row_h) * t.inv;
    GradCoefficients c{splat(row_lse), splat(a), splat(-gh * t.inv), fold_table<L>(a)};
    // kFold: 0 none, 1 exp_table with a, 2 exp_table32 with a (bf16 gradients).
    constexpr int kFold = kEntropyGrad || L < 4 ? 0 : std::is_same_v<T, c10::BFloat16> ? 2 : 1;
#if RLKERN_LOGITS_X86
    if constexpr (kFold == 2) c.table32 = {splat(a) * kExp2ThirtySeconds.lo, splat(a) * kExp2ThirtySeconds.hi};
#endif
    if (kFold != 0 && std::fabs(a) < 0x1p126f) {
      backward_row<T, kExact, kEntropyGrad, kFold, L>(x, dx, g.vocab, t, c);
    } else {
      backward_row<T, kExact, kEntropyGrad, 0, L>(x, dx, g.vocab, t, c);
    }
    if (has_label) {
      const float d = zy - row_lse;
      const float p = std::exp(d);
      const float entropy_term = p > 0.f ? gh * p * (d + row_h) : 0.f;
      dx[y] = T((gl * (1.f - p) - entropy_term) * t.inv);
    }
  }
}

// x * (1/T) is exactly x / T when T is a power of two (T = 1, 0.5, 2, ...): 1/T is then exact too.
bool is_exact_scale(const Temperature& t) {
  int exponent = 0;
  return std::frexp(t.temp, &exponent) == 0.5f;
}

// Rows [begin, end) at temperature t with the scaling variant kExact, forward or backward.
template <typename T, bool kExact, int L>
RLKERN_INLINE void rows_at(int64_t begin, int64_t end, const ForwardArgs<T>& a, const Temperature& t) {
  [[maybe_unused]] std::conditional_t<(L >= 4), FlushToZero, int> ftz{};
  forward_rows<T, kExact, L>(begin, end, a, t);
}
template <typename T, bool kExact, int L>
RLKERN_INLINE void rows_at(int64_t begin, int64_t end, const BackwardArgs<T>& a, const Temperature& t) {
  [[maybe_unused]] std::conditional_t<(L >= 4), FlushToZero, int> ftz{};
  if (a.grad_ent != nullptr) backward_rows<T, kExact, true, L>(begin, end, a, t);
  else backward_rows<T, kExact, false, L>(begin, end, a, t);
}

// The scaling variant (plain multiply or Markstein-corrected) for rows [begin, end): picked once
// for the call's temperature, or per row (one frexp each) with per-row temperatures.
template <typename T, int L, typename Args>
RLKERN_INLINE void rows_range(int64_t begin, int64_t end, const Args& a) {
  if (a.temps == nullptr) {
    if (a.exact) rows_at<T, true, L>(begin, end, a, a.temperature);
    else rows_at<T, false, L>(begin, end, a, a.temperature);
    return;
  }
  for (int64_t r = begin; r < end; ++r) {
    const Temperature t{a.temps[r], 1.f / a.temps[r]};
    if (is_exact_scale(t)) rows_at<T, true, L>(r, r + 1, a, t);
    else rows_at<T, false, L>(r, r + 1, a, t);
  }
}

// The kernels of one level for one storage type, each covering a range of rows so the level is
// picked once per thread chunk rather than once per row.
#define RLKERN_LEVEL_KERNELS(L, TARGET, T)                                                       \
  TARGET void forward_at_##L(int64_t b, int64_t e, const ForwardArgs<T>& a) {                   \
    rows_range<T, L>(b, e, a);                                                                   \
  }                                                                                              \
  TARGET void backward_at_##L(int64_t b, int64_t e, const BackwardArgs<T>& a) {                 \
    rows_range<T, L>(b, e, a);                                                                   \
  }
#define RLKERN_LEVEL_ALL_TYPES(L, TARGET)       \
  RLKERN_LEVEL_KERNELS(L, TARGET, float)         \
  RLKERN_LEVEL_KERNELS(L, TARGET, c10::BFloat16) \
  RLKERN_LEVEL_KERNELS(L, TARGET, c10::Half)
RLKERN_LEVEL_ALL_TYPES(0, )
#if RLKERN_LOGITS_X86
RLKERN_LEVEL_ALL_TYPES(3, __attribute__((target("arch=x86-64-v3"))))
RLKERN_LEVEL_ALL_TYPES(4, __attribute__((target("arch=x86-64-v4"))))
// Level 5 differs from 4 only where bf16 gradients are stored.
__attribute__((target("arch=x86-64-v4,avx512bf16"))) void backward_at_5(int64_t b, int64_t e,
                                                                      const BackwardArgs<c10::BFloat16>& a) {
  rows_range<c10::BFloat16, 5>(b, e, a);
}
#endif
#undef RLKERN_LEVEL_ALL_TYPES
#undef RLKERN_LEVEL_KERNELS

template <typename T>
void forward_dispatch(int64_t b, int64_t e, const ForwardArgs<T>& a) {
  switch (isa_level()) {
#if RLKERN_LOGITS_X86
    case 5:
    case 4: return forward_at_4(b, e, a);
    case 3: return forward_at_3(b, e, a);
#endif
    default: return forward_at_0(b, e, a);
  }
}

template <typename T>
void backward_dispatch(int64_t b, int64_t e, const BackwardArgs<T>& a) {
  switch (isa_level()) {
#if RLKERN_LOGITS_X86
    case 5:
      if constexpr (std::is_same_v<T, c10::BFloat16>) return backward_at_5(b, e, a);
      [[fallthrough]];
    case 4: return backward_at_4(b, e, a);
    case 3: return backward_at_3(b, e, a);
#endif
    default: return backward_at_0(b, e, a);
  }
}

// float32(T) and its rounded reciprocal; refuses a temperature that is not a positive float32 with
// a finite reciprocal (the Python layer says so first, naming the argument).
Temperature temperature_of(double temperature) {
  const float temp = static_cast<float>(temperature);
  const float inv = 1.f / temp;
  TORCH_CHECK(std::isfinite(temp) && temp > 0.f && std::isfinite(inv),
              "temperature must be a positive float32 whose reciprocal is finite in float32, got ",
              temperature);
  return {temp, inv};
}

RowGeometry geometry_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 3, name, " must be a 3-d [outer, inner, V] view, got ", t.dim(), " dims");
  TORCH_CHECK(t.size(2) == 0 || t.stride(2) == 1, name, " must be contiguous in its last dim");
  return {std::max<int64_t>(t.size(1), 1), t.stride(0), t.stride(1), t.size(2)};
}

const int64_t* checked_labels(const std::optional<at::Tensor>& labels, int64_t rows, int64_t vocab,
                              int64_t ignore_index) {
  if (!labels.has_value()) return nullptr;
  const at::Tensor& t = *labels;
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.numel() == rows,
              "labels must be a contiguous int64 tensor with one entry per row (", rows, " rows)");
  const int64_t* y = t.data_ptr<int64_t>();
  // The kernel reads x[y]: an out-of-range label is an index error here, never an out-of-bounds read.
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_INDEX(y[r] == ignore_index || (y[r] >= 0 && y[r] < vocab), "labels must lie in [0, ", vocab,
                      ") or equal ignore_index=", ignore_index, "; got ", y[r], " at flat position ", r);
  }
  return y;
}

int64_t rows_per_task(int64_t vocab) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(vocab, 1)); }

// A per-row float32 vector, or nullptr when the tensor is absent (None).
float* f32_rows(const std::optional<at::Tensor>& t, int64_t rows, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == rows, name,
              " must be a contiguous float32 tensor with one entry per row (", rows, " rows)");
  return t->data_ptr<float>();
}

// Per-row temperatures as the kernels read them (flat float32, one per row), each checked as
// temperature_of checks the scalar; nullptr when absent.
const float* checked_temperatures(const std::optional<at::Tensor>& temperatures, int64_t rows) {
  const float* p = f32_rows(temperatures, rows, "temperatures");
  for (int64_t r = 0; p != nullptr && r < rows; ++r) {
    TORCH_CHECK_VALUE(std::isfinite(p[r]) && p[r] > 0.f && std::isfinite(1.f / p[r]),
                      "temperature must be a positive float32 whose reciprocal is finite in float32 in every "
                      "row, got ", p[r], " at flat position ", r);
  }
  return p;
}

}  // namespace

// Writes per-row lse, and logp / entropy where those outputs are given. The caller allocates them.
void logprobs_fwd(const at::Tensor& logits, const std::optional<at::Tensor>& labels, double temperature,
                  const std::optional<at::Tensor>& temperatures, int64_t ignore_index,
                  const std::optional<at::Tensor>& logp, const at::Tensor& lse,
                  const std::optional<at::Tensor>& ent, const std::optional<at::Tensor>& sum_p2) {
  const RowGeometry g = geometry_of(logits, "logits");
  const int64_t rows = logits.size(0) * logits.size(1);
  TORCH_CHECK(g.vocab > 0, "logits must have a non-empty vocabulary dimension");
  TORCH_CHECK(!logp.has_value() || labels.has_value(), "logp needs labels");
  float* lp_ptr = f32_rows(logp, rows, "logp");
  float* lse_ptr = f32_rows(lse, rows, "lse");
  float* ent_ptr = f32_rows(ent, rows, "entropy");
  float* p2_ptr = f32_rows(sum_p2, rows, "sum_p2");
  if (rows == 0) return;
  const int64_t* y = lp_ptr != nullptr ? checked_labels(labels, rows, g.vocab, ignore_index) : nullptr;
  const float* temps = checked_temperatures(temperatures, rows);
  const Temperature t = temperature_of(temps != nullptr ? 1.0 : temperature);
  dispatch_storage_type(logits.scalar_type(), "logits", [&](auto tag) {
    using T = decltype(tag);
    const ForwardArgs<T> args{static_cast<const T*>(logits.data_ptr()), g, y, ignore_index, t, is_exact_scale(t),
                              temps, lp_ptr, lse_ptr, ent_ptr, p2_ptr};
    at::parallel_for(0, rows, rows_per_task(g.vocab), [&](int64_t b, int64_t e) { forward_dispatch(b, e, args); });
  });
}

void logprobs_bwd(const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_ent,
                  const at::Tensor& logits, const std::optional<at::Tensor>& labels, const at::Tensor& lse,
                  const std::optional<at::Tensor>& ent, double temperature,
                  const std::optional<at::Tensor>& temperatures, int64_t ignore_index,
                  const at::Tensor& grad_logits) {
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
  TORCH_CHECK(gh == nullptr || ent_ptr != nullptr, "the entropy gradient needs the saved entropy");
  const int64_t* y = checked_labels(labels, rows, g.vocab, ignore_index);
  const float* temps = checked_temperatures(temperatures, rows);
  const Temperature t = temperature_of(temps != nullptr ? 1.0 : temperature);
  dispatch_storage_type(logits.scalar_type(), "logits", [&](auto tag) {
    using T = decltype(tag);
    const BackwardArgs<T> args{static_cast<const T*>(logits.data_ptr()), g, static_cast<T*>(grad_logits.data_ptr()),
                               gg, y, ignore_index, t, is_exact_scale(t), temps, gl, gh, lse_ptr, ent_ptr};
    at::parallel_for(0, rows, rows_per_task(g.vocab), [&](int64_t b, int64_t e) { backward_dispatch(b, e, args); });
  });
}

namespace {

// A contiguous logits-shaped tensor as the kernels' [outer, inner, V] view (rlkern/ops/logits.py _rows).
at::Tensor rows_of(const at::Tensor& x) { return x.dim() == 3 ? x : x.view({1, -1, x.size(-1)}); }

// An upstream gradient as the kernels read it (flat float32), or none where autograd has none (or
// an empty one, for an output that was not asked for).
std::optional<at::Tensor> present(const at::Tensor& grad) {
  if (!grad.defined() || grad.numel() == 0) return std::nullopt;
  return grad.to(at::kFloat).contiguous();
}

std::optional<at::Tensor> given(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The logprobs_fwd op's eager autograd on the C++ backend as a C++ autograd node (rlkern/ops/logits.py
// registers it with KernelOp.register_native_autograd): the same kernels and outputs as the Python
// torch.autograd.Function of the registered op (logp, lse, entropy, sum_p2; an absent one is an empty
// [0] tensor), without its per-call Python. logits: contiguous; labels: flat int64 or None;
// temperatures: flat float32 or None.
struct LogprobsFunction : torch::autograd::Function<LogprobsFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logits,
                                                const std::optional<at::Tensor>& labels, double temperature,
                                                const std::optional<at::Tensor>& temperatures,
                                                int64_t ignore_index, bool want_entropy, bool want_p2,
                                                bool inplace_backward, bool poison) {
    const auto lead = logits.sizes().slice(0, logits.dim() - 1);
    const auto f32 = logits.options().dtype(at::kFloat);
    const at::Tensor absent = at::Tensor();
    const at::Tensor lse = new_output(lead, f32, poison);
    const at::Tensor logp = labels.has_value() ? new_output(lead, f32, poison) : absent;
    const at::Tensor ent = want_entropy ? new_output(lead, f32, poison) : absent;
    const at::Tensor p2 = want_p2 ? new_output(lead, f32, poison) : absent;
    logprobs_fwd(rows_of(logits), labels, temperature, temperatures, ignore_index, given(logp), lse, given(ent),
                 given(p2));
    ctx->save_for_backward({logits, labels.value_or(absent), lse, ent, temperatures.value_or(absent)});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["inplace"] = inplace_backward;
    ctx->saved_data["poison"] = poison;
    // Each absent output is its own empty tensor (a shared one would alias two outputs).
    auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, f32); };
    torch::autograd::variable_list outs{or_empty(logp), lse, or_empty(ent), or_empty(p2)};
    ctx->mark_non_differentiable({outs[1], outs[3]});
    // An output without a gradient reaches backward undefined, not as materialised zeros.
    ctx->set_materialize_grads(false);
    return outs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &logits = s[0], &labels = s[1], &ent = s[3];
    const auto grad_logp = labels.defined() ? present(grads[0]) : std::nullopt;
    const auto grad_ent = ent.defined() ? present(grads[2]) : std::nullopt;
    const bool poison = ctx->saved_data["poison"].toBool();
    at::Tensor out = ctx->saved_data["inplace"].toBool() ? logits
                                                         : new_output(logits.sizes(), logits.options(), poison);
    logprobs_bwd(grad_logp, grad_ent, rows_of(logits), given(labels), s[2],
                 grad_ent.has_value() ? given(ent) : std::nullopt, ctx->saved_data["temperature"].toDouble(),
                 given(s[4]), ctx->saved_data["ignore_index"].toInt(), rows_of(out));
    torch::autograd::variable_list dx(9);
    dx[0] = out;
    return dx;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_autograd(
    const at::Tensor& logits, const std::optional<at::Tensor>& labels, double temperature,
    const std::optional<at::Tensor>& temperatures, int64_t ignore_index, bool want_entropy, bool want_p2,
    bool inplace_backward, bool poison) {
  TORCH_CHECK(logits.is_contiguous(), "logprobs_autograd: logits must be contiguous");
  auto outs = LogprobsFunction::apply(logits, labels, temperature, temperatures, ignore_index, want_entropy,
                                      want_p2, inplace_backward, poison);
  return {outs[0], outs[1], outs[2], outs[3]};
}

}  // namespace rlkern
