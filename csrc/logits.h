// The kernels of csrc/logits.cpp, bound to Python in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rlkern {

// logits: [outer, inner, V] (unit stride over V); labels: flat int64 [rows] or None (entropy only).
// temperatures: flat float32 [rows], one temperature per row, or None: every row uses `temperature`.
// Forward writes lse, and logp / ent / sum_p2 (sum_v softmax_v^2) where given (logp needs labels).
// Backward writes d logits into grad_logits (which may be logits itself); an absent upstream
// gradient is None.
void logprobs_fwd(const at::Tensor& logits, const std::optional<at::Tensor>& labels, double temperature,
                  const std::optional<at::Tensor>& temperatures, int64_t ignore_index,
                  const std::optional<at::Tensor>& logp, const at::Tensor& lse,
                  const std::optional<at::Tensor>& ent, const std::optional<at::Tensor>& sum_p2);
void logprobs_bwd(const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_ent,
                  const at::Tensor& logits, const std::optional<at::Tensor>& labels, const at::Tensor& lse,
                  const std::optional<at::Tensor>& ent, double temperature,
                  const std::optional<at::Tensor>& temperatures, int64_t ignore_index,
                  const at::Tensor& grad_logits);
// logprobs_fwd with autograd (the eager path when the logits require grad): allocates and returns
// (logp, lse, entropy, sum_p2), an output not asked for as an empty [0] tensor; a C++ node whose
// backward runs logprobs_bwd into a new buffer, or into the logits with inplace_backward.
// logits: contiguous [..., V]; labels: flat int64; temperatures: flat float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_autograd(
    const at::Tensor& logits, const std::optional<at::Tensor>& labels, double temperature,
    const std::optional<at::Tensor>& temperatures, int64_t ignore_index, bool want_entropy, bool want_p2,
    bool inplace_backward, bool poison);

}  // namespace rlkern
