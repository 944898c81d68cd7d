// The kernels of csrc/kl_penalty.cpp, bound to Python in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace rlkern {

void kl_fwd(const at::Tensor& logp, const at::Tensor& ref, int64_t estimator, bool straight_through, double lo, double hi, double value_bound, at::Tensor out);
void kl_bwd(const at::Tensor& grad, const at::Tensor& logp, const at::Tensor& ref, int64_t estimator, bool straight_through, double lo, double hi, double value_bound, at::Tensor grad_logp);
void token_rewards_fwd(const at::Tensor& scores, const at::Tensor& logp, const at::Tensor& ref, const at::Tensor& mask, double kl_coef, int64_t estimator, double lo, double hi, double value_bound, at::Tensor out);

}  // namespace rlkern
