// The kernels of csrc/logits.cpp, bound to Python in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace rlkern {

void logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels, double temperature, int64_t ignore_index, at::Tensor logp, at::Tensor lse, at::Tensor ent);
void logprobs_bwd(const at::Tensor& grad_logp, const at::Tensor& grad_ent, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& ent, double temperature, int64_t ignore_index, at::Tensor grad_logits);

}  // namespace rlkern
