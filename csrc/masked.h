// The kernels of csrc/masked.cpp, bound to Python in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace rlkern {

void masked_moments(const at::Tensor& x, const at::Tensor& mask, bool merge_all, bool want_m2, at::Tensor count, at::Tensor sum, at::Tensor m2);
void masked_dot(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& mean, bool merge_all, at::Tensor s1, at::Tensor s2);
void masked_affine(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& gy, const at::Tensor& mu, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool merge_all, at::Tensor out);

}  // namespace rlkern
