"""Shared test machinery: backends to run, poisoned outputs, the oracle tolerance rule."""

from __future__ import annotations

import os
import zlib

import torch

# Where the suite's tensors live: RLKERN_TEST_DEVICE=cpu (the default, also on a GPU machine) runs
# the Triton kernels on CPU tensors through the interpreter; RLKERN_TEST_DEVICE=cuda (what
# `make gpu-check` sets) makes cuda the default device, so every tensor a test creates is a CUDA
# tensor and the triton backend runs the compiled kernels. TRITON_INTERPRET is read when
# @triton.jit decorates a kernel, so it must be set before any rlkern.kernels import.
TEST_DEVICE = os.environ.get("RLKERN_TEST_DEVICE", "cpu").strip().lower() or "cpu"
if TEST_DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"RLKERN_TEST_DEVICE must be cpu or cuda, got {TEST_DEVICE!r}")
if TEST_DEVICE == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError("RLKERN_TEST_DEVICE=cuda, but torch sees no CUDA device")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("RLKERN_TEST_DEVICE=cuda runs the compiled Triton kernels: unset TRITON_INTERPRET")
    torch.set_default_device("cuda")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import rlkern  # noqa: E402
from rlkern import backend as _backend  # noqa: E402
from rlkern.ops import _common  # noqa: E402

DEVICE = torch.device(TEST_DEVICE)
KERNEL_BACKENDS = [b for b in ("cpp", "triton") if b in _backend.available(DEVICE)]
ALL_BACKENDS = ["torch"] + KERNEL_BACKENDS
# CI installs everything: there a missing backend is a broken install, not a reason to skip its tests.
IN_CI = bool(os.environ.get("CI"))
if IN_CI and TEST_DEVICE == "cpu" and KERNEL_BACKENDS != ["cpp", "triton"]:
    raise RuntimeError(f"CI: expected the cpp and triton backends on the CPU, found {KERNEL_BACKENDS}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel forgets to write fails the test."""
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Runs the test once per backend available here (Triton through the interpreter on CPU)."""
    with rlkern.use_backend(request.param):
        yield request.param


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    with rlkern.use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Fresh random inputs every case, reproducible from the test id (printed on failure)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return seed


def assert_close_to_oracle(actual, oracle, same_dtype, *, atol: float, rtol: float = 0.0,
                           what: str = "output"):
    """The tolerance rule that survives bf16 (Cut Cross-Entropy's): rlkern may be off the float64
    oracle by as much as plain torch in the same dtype is, plus a stated absolute/relative slack.

    |actual - oracle| <= |same_dtype - oracle| + atol + rtol * |oracle|, elementwise; infinities
    must match exactly and NaN is never allowed in `actual`.
    """
    actual, oracle, same_dtype = (t.detach().double().cpu() for t in (actual, oracle, same_dtype))
    assert actual.shape == oracle.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert not actual.isnan().any(), f"{what}: NaN at {actual.isnan().nonzero()[:5].tolist()}"
    inf = oracle.isinf()
    assert torch.equal(actual[inf], oracle[inf]), f"{what}: infinities differ"
    finite = ~inf
    err = (actual - oracle)[finite].abs()
    base = (same_dtype - oracle)[finite].abs().nan_to_num(0.0)
    bound = base + atol + rtol * oracle[finite].abs()
    worst = (err - bound).argmax() if err.numel() else None
    assert err.numel() == 0 or bool((err <= bound).all()), (
        f"{what}: error {err[worst].item():.3e} exceeds bound {bound[worst].item():.3e} "
        f"(same-dtype torch error {base[worst].item():.3e}, atol {atol}, rtol {rtol})")


def pytest_collection_modifyitems(items):
    """Marks every case that runs the triton backend, so `-m triton` (make test-triton) selects them:
    the backend is a parameter (the backend fixtures, or an explicit backend name in the id)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "triton" in callspec.id.split("-"):
            item.add_marker(pytest.mark.triton)
