// Outputs that the C++ entry points allocate themselves (the eager paths that skip Python's
// allocations: csrc/logits.cpp logprobs_autograd, csrc/losses.cpp losses_fwd_new).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <limits>

namespace rlkern {

// A buffer a kernel writes in full: uninitialised, or NaN when the tests poison outputs
// (rlkern/ops/_common.py POISON_OUTPUTS), so an element a kernel misses shows.
inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options, bool poison) {
  at::Tensor out = at::empty(shape, options);
  if (poison) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace rlkern
