// The kernels of csrc/rollout_correction.cpp, bound to Python in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace rlkern {

void rollout_correction_fwd(const at::Tensor& log_prob, const std::optional<at::Tensor>& rollout_log_prob, const at::Tensor& mask, int64_t level, int64_t mode, int64_t padding, double lower, double upper, double log_clamp, double gate_lo, double gate_hi, std::vector<int64_t> rs_codes, std::vector<double> rs_lo, std::vector<double> rs_hi, const std::optional<at::Tensor>& weights, const std::optional<at::Tensor>& new_mask, at::Tensor stats);

void rollout_weights_fwd(const at::Tensor& log_prob, const std::optional<at::Tensor>& rollout_log_prob, const at::Tensor& mask, int64_t level, int64_t mode, int64_t padding, double lower, double upper, double log_clamp, double gate_lo, double gate_hi, at::Tensor weights);

void trust_region_fwd(const at::Tensor& logp, const at::Tensor& ref_logp, const std::optional<at::Tensor>& advantages, const at::Tensor& mask, int64_t convention, int64_t divergence, int64_t level, double low, double high, double clip_c, at::Tensor weights, at::Tensor stats);

}  // namespace rlkern
