// The kernels of csrc/lm_head.cpp, bound to Python in csrc/bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace rlkern {

// Tile primitives (the fp32 single-pass policy loss and the vocabulary-parallel logits path use them).
// inv_temp_rows: fp32 [rows] per-row inverse temperatures replacing inv_temp, or None; q: fp32 [rows]
// running Q = sum e^{2(z-m)} (for sum p^2 = Q / S^2), folded like S, or None.
void lm_fold(const at::Tensor& tile, const std::optional<at::Tensor>& bias, const at::Tensor& labels, double inv_temp,
             int64_t ignore_index, int64_t vocab_start, bool want_entropy, at::Tensor m, at::Tensor s, at::Tensor t,
             at::Tensor zy, const std::optional<at::Tensor>& inv_temp_rows, const std::optional<at::Tensor>& q);
void lm_grad(at::Tensor tile, const std::optional<at::Tensor>& bias, const at::Tensor& labels,
             const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_ent, const at::Tensor& lse,
             const std::optional<at::Tensor>& ent, double inv_temp, int64_t ignore_index, int64_t vocab_start,
             const std::optional<at::Tensor>& inv_temp_rows);
void lm_accumulate(at::Tensor acc, const at::Tensor& part);
void lm_logits(const at::Tensor& hidden, const at::Tensor& weight, at::Tensor out);

// The whole-op kernels, called exactly as kernels/lm_head.py's launchers of the same names (None for an
// absent tensor; the C++ side uses the tile sizes, the Triton side the precision). inv_temp_rows: fp32 [N]
// per-token inverse temperatures (replacing inv_temp) or None; sum_p2: fp32 [N] output (sum_v p_v^2) or None.
void linear_logprobs_fwd(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& labels, double inv_temp, int64_t ignore_index, int64_t vocab_start,
                         bool want_entropy, int64_t token_tile, int64_t vocab_tile, const std::string& precision,
                         at::Tensor lse, const std::optional<at::Tensor>& ent, at::Tensor zy,
                         const std::optional<at::Tensor>& inv_temp_rows, const std::optional<at::Tensor>& sum_p2);
void linear_logprobs_bwd(const std::optional<at::Tensor>& grad_logp, const std::optional<at::Tensor>& grad_ent,
                         const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& labels, const at::Tensor& lse, const std::optional<at::Tensor>& ent,
                         double inv_temp, int64_t ignore_index, int64_t vocab_start, int64_t token_tile,
                         int64_t vocab_tile, const std::string& precision, at::Tensor grad_hidden, at::Tensor grad_weight,
                         const std::optional<at::Tensor>& grad_bias, const std::optional<at::Tensor>& inv_temp_rows);

}  // namespace rlkern
