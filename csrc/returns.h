// The kernels of csrc/returns.cpp, bound to Python in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace rlkern {

void gae_fwd(const at::Tensor& rewards, const at::Tensor& values, const at::Tensor& mask, double gamma, double lam, at::Tensor adv, at::Tensor ret);
void discounted_returns_fwd(const at::Tensor& rewards, const at::Tensor& mask, double gamma, at::Tensor ret);

}  // namespace rlkern
