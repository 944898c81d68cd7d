"""Triton kernels, one module per op family (shipped as ``rlkern.kernels``).

Each module holds ``@triton.jit`` kernels and launchers that take torch tensors. They are written
for GPUs (one pass over HBM, fp32 accumulation, int64 offsets) and are checked on CPU tensors with
``TRITON_INTERPRET=1``. Importing a module here imports triton; ``rlkern.backend`` decides when.
"""
