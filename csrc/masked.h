// The kernels of csrc/masked.cpp, bound to Python in csrc/bindings.cpp (kernels/masked.py has the
// same functions for Triton). x is contiguous; merge_all reduces everything to one statistic, else
// each row of the last dim to one. mask is x-shaped, contiguous, any dtype of dispatch_mask_type,
// nonzero = valid. The forwards also return the smallest selected count (inf when there is no statistic).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace rlkern {

// kind 0 sum, 1 mean, 2 var (divided by n - ddof). Returns (out: float32 [stats], saved: float64
// [2, stats] (the mean that centres x, the gradient's scale), smallest count); masked_stat_bwd reads saved.
// poison: outputs start NaN-filled (tests). The forwards allocate what they return.
std::tuple<at::Tensor, at::Tensor, double> masked_stat_fwd(const at::Tensor& x, const at::Tensor& mask,
                                                            bool merge_all, int64_t kind, int64_t ddof, bool poison);
// grad: float32 [stats]. Returns d x: x-shaped, x's dtype.
at::Tensor masked_stat_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
                           const at::Tensor& saved, bool merge_all, int64_t kind, bool poison);
// Returns (y: float32 like x, saved: float64 [4, stats] (mean, rstd, n, n - ddof), smallest count).
std::tuple<at::Tensor, at::Tensor, double> masked_whiten_fwd(const at::Tensor& x, const at::Tensor& mask,
                                                              bool merge_all, bool shift_mean, int64_t ddof,
                                                              double eps, bool poison);
// grad: float32 like x. Returns d x: x-shaped, x's dtype.
at::Tensor masked_whiten_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mask,
                             const at::Tensor& saved, bool merge_all, bool shift_mean, bool poison);
// masked_stat_fwd with autograd: a C++ node whose backward runs masked_stat_bwd (the eager path when
// x requires grad). Same arguments and returns; d x flows to x.
std::tuple<at::Tensor, at::Tensor, double> masked_stat_autograd(const at::Tensor& x, const at::Tensor& mask,
                                                                 bool merge_all, int64_t kind, int64_t ddof,
                                                                 bool poison);

}  // namespace rlkern
