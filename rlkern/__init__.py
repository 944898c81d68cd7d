"""rlkern: fused kernels for the hot loops of RL post-training of language models."""

import torch  # noqa: F401  (rlkern._C links against libc10: torch must be loaded first)

from rlkern import ops
from rlkern.backend import BACKENDS, BackendUnavailable, use_backend

__version__ = "0.1.0"
__all__ = ["ops", "use_backend", "BACKENDS", "BackendUnavailable", "__version__"]
