// Dispatch on the storage types every rlkern kernel accepts: float32, bfloat16, float16.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace rlkern {

// Calls f(T{}) with T the C++ type of `dtype`; any other dtype is a clear error naming `what`.
template <typename F>
void dispatch_storage_type(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", dtype);
  }
}

// Calls f(M{}) with M the C++ storage type of a mask of `dtype` (see mask16 in simd.h): bool and
// uint8 as uint8_t, int32, int64, float32, bfloat16, float16. Other dtypes are converted to bool in
// Python (rlkern/ops/_common.py, token_mask) before they reach a kernel.
template <typename F>
void dispatch_mask_type(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kBool:
    case at::kByte: f(uint8_t{}); break;
    case at::kInt: f(int32_t{}); break;
    case at::kLong: f(int64_t{}); break;
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default:
      TORCH_CHECK(false, what, " must be bool, uint8, int32, int64, float32, bfloat16 or float16, got ", dtype);
  }
}

// The mask's data as M (bool storage is one byte of 0 or 1, read as uint8_t).
template <typename M>
const M* mask_data(const at::Tensor& mask) {
  return static_cast<const M*>(mask.const_data_ptr());
}

}  // namespace rlkern
