// The kernels of csrc/losses.cpp, bound to Python in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rlkern {

void losses_fwd(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& w, const at::Tensor& mask, int64_t kind, double clip_low, double clip_high, double dual_clip, double beta, double value_clip, bool per_row_mean, double denom, at::Tensor loss, at::Tensor stats, at::Tensor row_scale, const std::optional<at::Tensor>& saved, int64_t variant, int64_t level, double delta, double tau_pos, double tau_neg, at::Tensor row_aux, const std::optional<at::Tensor>& row_in, double vespo_k_pos, double vespo_lambda_pos, double vespo_k_neg, double vespo_lambda_neg);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> losses_fwd_new(const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& w, const at::Tensor& mask, int64_t kind, double clip_low, double clip_high, double dual_clip, double beta, double value_clip, bool per_row_mean, double denom, int64_t save_grad, int64_t variant, int64_t level, double delta, double tau_pos, double tau_neg, const std::optional<at::Tensor>& row_in, double vespo_k_pos, double vespo_lambda_pos, double vespo_k_neg, double vespo_lambda_neg, bool poison);
void losses_bwd(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& y, const at::Tensor& a, const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& w, const at::Tensor& mask, const at::Tensor& row_scale, int64_t kind, double clip_low, double clip_high, double dual_clip, double beta, double value_clip, at::Tensor grad_x, int64_t variant, int64_t level, double delta, double tau_pos, double tau_neg, const at::Tensor& row_aux, const std::optional<at::Tensor>& row_in, double vespo_k_pos, double vespo_lambda_pos, double vespo_k_neg, double vespo_lambda_neg);
void losses_bwd_saved(const at::Tensor& grad_loss, const std::optional<at::Tensor>& saved, const at::Tensor& mask, const at::Tensor& row_scale, at::Tensor grad_x, const std::optional<at::Tensor>& row_aux);

}  // namespace rlkern
