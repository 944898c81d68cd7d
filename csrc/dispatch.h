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

}  // namespace rlkern
