// rlkern._C: importing this module loads the shared library, whose static initialisers register
// every C++ kernel with the PyTorch dispatcher under the `rlkern_C` namespace (one
// TORCH_LIBRARY_FRAGMENT per csrc/<family>.cpp). Python calls them as torch.ops.rlkern_C.<name>.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) { m.doc() = "rlkern C++ CPU kernels, registered as torch.ops.rlkern_C.*"; }
