// Masks of any dtype staged as float 1/0 for the RL-maths kernels (csrc/kl_penalty.cpp, csrc/losses.cpp).
#pragma once

#include <cstdint>
#include <type_traits>

#include "simd.h"

namespace rlkern {

// Staging a mask chunk as float 1/0 ("nonzero = valid"): for kernels whose per-token body is too
// large to instantiate once per mask dtype (storage types x kinds x clones). The caller resolves one
// MaskStager per call (mask_stager<M>(), inside dispatch_mask_type), stages up to a few KB of a
// row's mask into an L1-resident float buffer and reads it back with load16. The buffer is filled
// to a multiple of 16 (zeros past n), so full-vector loads of a tail are safe.
template <typename M>
RLKERN_INLINE void mask_to_float(const M* __restrict p, int64_t n, float* __restrict out) {
  if constexpr (std::is_same_v<M, uint8_t>) {
    // bool / uint8: GCC 12 lowers a 16-lane uint8 -> float __builtin_convertvector (mask16) one lane
    // at a time (16 vcvtusi2ss); the auto-vectoriser turns this loop into byte compares and masked
    // moves, 64 tokens an iteration (4-5x faster staging).
    const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
    for (int64_t i = 0; i < n; ++i) out[i] = p[i] != 0 ? 1.f : 0.f;
    for (int64_t i = n; i < padded; ++i) out[i] = 0.f;
  } else {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) store16(out + i, mask16(p + i));
    if (i < n) store16(out + i, mask_tail(p + i, n - i));
  }
}
using MaskStager = void (*)(const void* mask, int64_t n, float* out);
template <typename M>
__attribute__((target("arch=x86-64-v4"))) void stage_mask_v4(const void* p, int64_t n, float* out) {
  mask_to_float(static_cast<const M*>(p), n, out);
}
template <typename M>
__attribute__((target("arch=x86-64-v3"))) void stage_mask_v3(const void* p, int64_t n, float* out) {
  mask_to_float(static_cast<const M*>(p), n, out);
}
template <typename M>
void stage_mask_base(const void* p, int64_t n, float* out) {
  mask_to_float(static_cast<const M*>(p), n, out);
}
template <typename M>
MaskStager mask_stager() {
  switch (cpu_level()) {
    case 4: return &stage_mask_v4<M>;
    case 3: return &stage_mask_v3<M>;
    default: return &stage_mask_base<M>;
  }
}

}  // namespace rlkern
