// The kernels of csrc/lm_head.cpp, bound to Python in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace rlkern {

void lm_fold(const at::Tensor& tile, const at::Tensor& bias, const at::Tensor& labels, double inv_temp, int64_t ignore_index, int64_t vocab_start, bool want_entropy, at::Tensor m, at::Tensor s, at::Tensor t, at::Tensor zy);
void lm_grad(at::Tensor tile, const at::Tensor& bias, const at::Tensor& labels, const at::Tensor& grad_logp, const at::Tensor& grad_ent, const at::Tensor& lse, const at::Tensor& ent, double inv_temp, int64_t ignore_index, int64_t vocab_start);
void lm_accumulate(at::Tensor acc, const at::Tensor& part);
void lm_logits(const at::Tensor& hidden, const at::Tensor& weight, at::Tensor out);

}  // namespace rlkern
