// Reverse scans over [rows, T]: masked GAE and REINFORCE++ discounted returns, the C++ CPU kernels.
//
// GAE (verl's masked recursion; t = T-1 .. 0, next_value = running = 0 at the end of the row):
//   delta = r_t + gamma * next_value - v_t
//   a     = delta + gamma * lam * running
//   if mask_t: next_value = v_t, running = a          (a masked token carries both through)
//   adv_t = running,  ret_t = running + v_t
// Discounted returns (verl's REINFORCE++; reset after each sequence's end):
//   running = r_t + gamma * running;  ret_t = running;  if !mask_t: running = 0
//
// The mask is read in its own dtype, nonzero = valid (simd.h mask_at; dispatch.h dispatch_mask_type).
//
// The scan is sequential in t: each row is one chain of dependent multiply-adds (~8 cycles a
// step), rows run in parallel. Walking two rows side by side in the inner loop overlaps their
// chains; more does not pay. Measured on this machine (one thread, min of 200 runs, B=256 x
// T=4096): 1 row at a time 1.45 ms, 2 rows 1.02 ms, 8 rows 16 ms, 16 rows 18 ms. Rows whose
// length is a multiple of 1024 floats sit a multiple of 4 KiB apart, so each row's 5 streams
// (rewards, values, mask, advantages, returns) land in the same L1 sets: 2 rows fit the 12 ways,
// 8 rows thrash them.
//
// Contraction into FMAs is off for this file: a row gets the same bits whether it runs in a pair
// or alone (odd row counts; batch invariance), and the same roundings as the eager reference.
// (FMAs would shorten the chain: 2 rows 0.93 ms instead of 1.02.)
#pragma GCC optimize("fp-contract=off")

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>

#include "dispatch.h"
#include "returns.h"
#include "simd.h"

namespace rlkern {
namespace {

constexpr int kPair = 2;

template <int G, typename M>
RLKERN_INLINE void gae_rows(int64_t row0, int64_t len, const float* rewards, const float* values, const M* mask, float gamma, float gamma_lam, float* adv, float* ret) {
  float next_value[G], running[G];
  for (int g = 0; g < G; ++g) next_value[g] = running[g] = 0.f;
  const int64_t base = row0 * len;
  for (int64_t t = len - 1; t >= 0; --t) {
    for (int g = 0; g < G; ++g) {
      const int64_t i = base + g * len + t;
      const float v = values[i];
      const float a = (rewards[i] + gamma * next_value[g] - v) + gamma_lam * running[g];
      const bool valid = mask_at(mask + i);
      next_value[g] = valid ? v : next_value[g];
      running[g] = valid ? a : running[g];
      adv[i] = running[g];
      ret[i] = running[g] + v;
    }
  }
}

template <int G, typename M>
RLKERN_INLINE void returns_rows(int64_t row0, int64_t len, const float* rewards, const M* mask, float gamma,
                                float* ret) {
  float running[G];
  for (int g = 0; g < G; ++g) running[g] = 0.f;
  const int64_t base = row0 * len;
  for (int64_t t = len - 1; t >= 0; --t) {
    for (int g = 0; g < G; ++g) {
      const int64_t i = base + g * len + t;
      const float run = rewards[i] + gamma * running[g];
      ret[i] = run;
      running[g] = mask_at(mask + i) ? run : 0.f;
    }
  }
}

template <typename M>
void gae_range(int64_t b, int64_t e, int64_t len, const float* r, const float* v, const M* m, float gamma,
               float gamma_lam, float* adv, float* ret) {
  int64_t row = b;
  for (; row + kPair <= e; row += kPair) gae_rows<kPair>(row, len, r, v, m, gamma, gamma_lam, adv, ret);
  if (row < e) gae_rows<1>(row, len, r, v, m, gamma, gamma_lam, adv, ret);
}

template <typename M>
void returns_range(int64_t b, int64_t e, int64_t len, const float* r, const M* m, float gamma, float* ret) {
  int64_t row = b;
  for (; row + kPair <= e; row += kPair) returns_rows<kPair>(row, len, r, m, gamma, ret);
  if (row < e) returns_rows<1>(row, len, r, m, gamma, ret);
}

void check_rows(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.sizes() == shape, name,
              " must be a contiguous ", dtype, " tensor of shape ", shape);
}

// Rows per parallel task: an even number (whole pairs), about 64k elements.
int64_t grain_rows(int64_t len) { return kPair * std::max<int64_t>(1, 32768 / std::max<int64_t>(len, 1)); }

}  // namespace

void gae_fwd(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma, double lam,
             at::Tensor adv, at::Tensor ret) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be a 2-d [rows, T] tensor");
  const auto shape = rewards.sizes();
  check_rows(rewards, "rewards", shape, at::kFloat);
  check_rows(values, "values", shape, at::kFloat);
  TORCH_CHECK(mask.is_contiguous() && mask.sizes() == shape, "mask must be a contiguous tensor shaped like rewards");
  check_rows(adv, "advantages", shape, at::kFloat);
  check_rows(ret, "returns", shape, at::kFloat);
  const int64_t len = shape[1];
  const float* r = rewards.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  float* a = adv.data_ptr<float>();
  float* y = ret.data_ptr<float>();
  // gamma * lam is rounded to float once, as torch does with the Python product in the reference.
  const float g = static_cast<float>(gamma), gl = static_cast<float>(gamma * lam);
  dispatch_mask_type(mask.scalar_type(), "mask", [&](auto tag) {
    const auto* m = mask_data<decltype(tag)>(mask);
    at::parallel_for(0, shape[0], grain_rows(len), [&](int64_t b, int64_t e) { gae_range(b, e, len, r, v, m, g, gl, a, y); });
  });
}

void discounted_returns_fwd(const at::Tensor& rewards, const at::Tensor& mask, double gamma, at::Tensor ret) {
  TORCH_CHECK(rewards.dim() == 2, "rewards must be a 2-d [rows, T] tensor");
  const auto shape = rewards.sizes();
  check_rows(rewards, "rewards", shape, at::kFloat);
  TORCH_CHECK(mask.is_contiguous() && mask.sizes() == shape, "mask must be a contiguous tensor shaped like rewards");
  check_rows(ret, "returns", shape, at::kFloat);
  const int64_t len = shape[1];
  const float* r = rewards.data_ptr<float>();
  float* y = ret.data_ptr<float>();
  const float g = static_cast<float>(gamma);
  dispatch_mask_type(mask.scalar_type(), "mask", [&](auto tag) {
    const auto* m = mask_data<decltype(tag)>(mask);
    at::parallel_for(0, shape[0], grain_rows(len), [&](int64_t b, int64_t e) { returns_range(b, e, len, r, m, g, y); });
  });
}

}  // namespace rlkern
