// The kernels of csrc/token_selection.cpp, bound to Python in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace rlkern {

void kl_cov_select(const at::Tensor& advantages, const at::Tensor& logp, const at::Tensor& mask, double ratio, at::Tensor chosen);
void kl_cov_fwd(const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask, const std::optional<at::Tensor>& weights, double ratio, double coef, at::Tensor chosen, at::Tensor rows);
void kl_cov_bwd(const at::Tensor& grad_rows, const at::Tensor& logp, const at::Tensor& old_logp, const at::Tensor& advantages, const at::Tensor& mask, const std::optional<at::Tensor>& weights, const at::Tensor& chosen, double coef, at::Tensor grad_logp);
void entropy_quantile_bounds(const at::Tensor& entropies, const at::Tensor& mask, double q, at::Tensor bounds, at::Tensor count);

}  // namespace rlkern
