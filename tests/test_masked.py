"""rlkern.ops.masked_sum / mean / var / whiten against the float64 oracle, every backend.

Tolerances, on top of the error of plain torch in float32 on the same (fp32-exact) inputs:
* statistics: atol 1e-6 + rtol 1e-5. The kernels sum fp32 chunks and merge them in float64, so
  they are at least as accurate as torch's fp32 sum; a few ulp of the result either way.
* whitened values and all gradients: atol 1e-5 + rtol 1e-5 (the whitening multiplies by
  rstd ~ 1 / std, and the gradients combine two reductions; whiten's gradient atol is scaled by
  the largest rstd, see _check_grad). Gradients are compared against plain
  torch in the input's dtype (see _check_grad), plus, for a bf16/fp16 gradient, one rounding to
  that dtype (rtol 2^-7 / 2^-10).
"""

from __future__ import annotations

import pytest
import torch

import rlkern
from rlkern import reference
from tests.conftest import ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, assert_close_to_oracle

ops = rlkern.ops

DIMS = [None, -1, 0]
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _inputs(shape, dtype, p_valid=0.7, scale=3.0, shift=1.0):
    x = (torch.randn(shape) * scale + shift).to(dtype)
    mask = torch.rand(shape) < p_valid
    # Every row along every reduced dim keeps at least two selected elements (the ops refuse fewer).
    if len(shape) >= 1 and shape[-1] >= 2:
        mask[..., :2] = True
    if len(shape) >= 2 and shape[0] >= 2:
        mask[:2] = True
    return x, mask


def _oracle(fn_name, x, mask, **kw):
    fn = getattr(reference, fn_name)
    return fn(x.double(), mask, **kw), fn(x.float(), mask, **kw)


def _check(fn_name, x, mask, *, atol, rtol=1e-5, **kw):
    got = getattr(ops, fn_name)(x, mask, **kw)
    oracle, same = _oracle(fn_name, x, mask, **kw)
    assert got.dtype == torch.float32
    assert_close_to_oracle(got, oracle, same, atol=atol, rtol=rtol, what=fn_name)
    return got


def _check_grad(fn_name, x, mask, **kw):
    leaf = x.detach().clone().requires_grad_()
    out = getattr(ops, fn_name)(leaf, mask, **kw)
    g = torch.randn(out.shape)
    out.backward(g)
    x64 = x.detach().double().requires_grad_()
    getattr(reference, fn_name)(x64, mask, **kw).backward(g.double())
    # Baseline: plain torch on the same-dtype input. The reference upcasts x once per statistic it
    # feeds, so in bf16/fp16 autograd rounds each path's gradient to that dtype before summing them.
    same = x.detach().clone().requires_grad_()
    getattr(reference, fn_name)(same, mask, **kw).backward(g)
    assert leaf.grad.dtype == x.dtype
    atol = 1e-5
    if fn_name == "masked_whiten":
        # d whiten = gy r + [m] (a + b (x - mean)): terms of size |gy| r, r = 1/std, that cancel
        # (exactly so for two selected elements, whose whitened values are +-1/sqrt(2) whatever x),
        # so the fp32 error scales with r. The largest r over the rows sets the slack.
        var = reference.masked_var(x.double(), mask, dim=kw.get("dim"), unbiased=kw.get("unbiased", True))
        atol *= max(1.0, float((var + kw.get("eps", 1e-8)).rsqrt().max()))
    assert_close_to_oracle(leaf.grad, x64.grad, same.grad, atol=atol, rtol=GRAD_RTOL[x.dtype],
                           what=f"d {fn_name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", DIMS)
def test_statistics_match_oracle(backend, dtype, dim):
    x, mask = _inputs((6, 37), dtype)
    _check("masked_sum", x, mask, dim=dim, atol=1e-5)
    _check("masked_mean", x, mask, dim=dim, atol=1e-6)
    for unbiased in (True, False):
        _check("masked_var", x, mask, dim=dim, unbiased=unbiased, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_oracle(backend, dtype, dim, shift_mean):
    x, mask = _inputs((5, 33), dtype)
    _check("masked_whiten", x, mask, dim=dim, shift_mean=shift_mean, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", DIMS)
def test_gradients_match_reference(backend, dtype, dim):
    x, mask = _inputs((4, 29), dtype)
    _check_grad("masked_sum", x, mask, dim=dim)
    _check_grad("masked_mean", x, mask, dim=dim)
    _check_grad("masked_var", x, mask, dim=dim, unbiased=True)
    _check_grad("masked_whiten", x, mask, dim=dim)
    _check_grad("masked_whiten", x, mask, dim=dim, shift_mean=False, unbiased=False, eps=1e-3)


@pytest.mark.parametrize("shape, dim", [((2,), None), ((1, 2), -1), ((3, 2, 17), 1), ((2, 3, 17), None),
                                        ((4, 5, 6), 0)])
def test_odd_shapes(backend, shape, dim):
    x, mask = _inputs(shape, torch.float32, p_valid=1.0)
    _check("masked_mean", x, mask, dim=dim, atol=1e-6)
    _check("masked_var", x, mask, dim=dim, atol=1e-6)
    _check("masked_whiten", x, mask, dim=dim, atol=1e-5)
    _check_grad("masked_whiten", x, mask, dim=dim)


def test_large_global_reduction(kernel_backend):
    """Several segments merged (C++: 16384-element segments, Triton: 4096), with a large mean."""
    n = 70_001 if kernel_backend == "cpp" else 9_001
    x, mask = _inputs((n,), torch.float32, scale=0.5, shift=1000.0)
    _check("masked_mean", x, mask, atol=1e-6)
    # var = 0.25 under a mean of 1000: E[x^2] - E[x]^2 in fp32 would have no correct digit left.
    _check("masked_var", x, mask, atol=1e-6)
    _check("masked_whiten", x, mask, atol=1e-5)


def test_empty_batch_sums_to_zero(backend):
    for shape in ((0,), (0, 5)):
        assert ops.masked_sum(torch.zeros(shape), torch.zeros(shape, dtype=torch.bool)).item() == 0
    assert ops.masked_sum(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), dim=-1).shape == (0,)


def test_padding_never_enters_a_statistic(backend):
    x, mask = _inputs((3, 20), torch.float32)
    dirty = x.masked_fill(~mask, float("nan"))
    dirty[~mask & (torch.rand(3, 20) < 0.5)] = float("inf")
    for fn in ("masked_sum", "masked_mean", "masked_var"):
        for dim in (None, -1):
            op = getattr(ops, fn)
            torch.testing.assert_close(op(dirty, mask, dim=dim), op(x, mask, dim=dim))
    # The whitened values at valid positions are unaffected; padding is transformed (NaN stays NaN).
    torch.testing.assert_close(ops.masked_whiten(dirty, mask)[mask], ops.masked_whiten(x, mask)[mask])


@pytest.mark.parametrize("dim", [None, -1])
@pytest.mark.parametrize("position", [0, 18, 36])
def test_selected_nan_poisons_the_result_the_same_way_on_every_backend(backend, position, dim):
    """Issue 9: a selected NaN makes the statistic of its selection NaN on every backend. The sum's
    and the mean's gradients are the mask whatever x holds (torch autograd's): the C++ and Triton
    backward used to compute 0 * (x - mean) and gave NaN at every selected position; var and
    whiten read x - mean, so their whole selection's gradient is NaN, and only that selection's."""
    x, mask = _inputs((3, 37), torch.float32)
    mask[1, position] = True
    x[1, position] = float("nan")
    for fn in ("masked_sum", "masked_mean", "masked_var", "masked_whiten"):
        xr = x.clone().requires_grad_()
        out = getattr(ops, fn)(xr, mask, dim=dim)
        (out * (torch.rand(out.shape) + 0.5)).sum().backward()
        poisoned = torch.zeros(3, 37, dtype=torch.bool)
        poisoned[slice(None) if dim is None else 1] = True
        if fn == "masked_whiten":
            assert torch.equal(out.isnan(), poisoned), fn
        else:
            assert out.isnan().all() if dim is None else out.isnan().tolist() == [False, True, False], fn
        if fn in ("masked_sum", "masked_mean"):
            assert xr.grad.isfinite().all() and torch.equal(xr.grad != 0, mask), fn
        else:  # var: masked-out positions get gradient 0; whiten transforms them too
            assert torch.equal(xr.grad.isnan(), poisoned & mask if fn == "masked_var" else poisoned), fn


MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16,
               torch.float16, torch.int8, torch.float64]


def as_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``valid`` in ``dtype`` with nonzero values other than 1 where the dtype has them (2, -3, 0.5,
    NaN) and -0.0 for a float zero: "nonzero = valid" must hold for every value, not only 0/1.
    (tests/test_returns.py uses it too.)"""
    if dtype == torch.bool:
        return valid.clone()
    if dtype.is_floating_point:
        on = torch.tensor([1.0, 2.0, 0.5, -3.0, float("nan")], dtype=dtype)
        off = torch.tensor(-0.0, dtype=dtype)
    else:
        on = torch.tensor([1, 2, 3] if dtype == torch.uint8 else [1, 2, -3], dtype=dtype)
        off = torch.tensor(0, dtype=dtype)
    values = on[torch.randint(0, on.numel(), valid.shape)]
    return torch.where(valid, values, off)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("dim", [None, -1, 0])
def test_every_mask_dtype_is_nonzero_valid(backend, mask_dtype, dim):
    """Masks of any dtype are read as they are, nonzero = valid (2.0, -3, NaN select; 0 and -0.0 do
    not): statistics, whitening and gradients match the float64 oracle on the bool mask."""
    x, valid = _inputs((5, 23), torch.float32)
    mask = as_mask(valid, mask_dtype)
    for fn, kw in (("masked_sum", {}), ("masked_mean", {}), ("masked_var", {}), ("masked_whiten", {}),
                   ("masked_whiten", {"shift_mean": False, "unbiased": False})):
        got = getattr(ops, fn)(x, mask, dim=dim, **kw)
        oracle, same = _oracle(fn, x, valid, dim=dim, **kw)
        assert_close_to_oracle(got, oracle, same, atol=1e-5, rtol=1e-5, what=f"{fn} {mask_dtype}")
        leaf = x.clone().requires_grad_()
        g = torch.randn(got.shape)
        getattr(ops, fn)(leaf, mask, dim=dim, **kw).backward(g)
        x64 = x.double().requires_grad_()
        getattr(reference, fn)(x64, valid, dim=dim, **kw).backward(g.double())
        same = x.clone().requires_grad_()
        getattr(reference, fn)(same, valid, dim=dim, **kw).backward(g)
        atol = 1e-4 if fn == "masked_whiten" else 1e-5  # whiten's gradient scales with rstd (see _check_grad)
        assert_close_to_oracle(leaf.grad, x64.grad, same.grad, atol=atol, rtol=1e-5,
                               what=f"d {fn} {mask_dtype}")


def test_float_and_int_masks_equal_bool(backend):
    x, mask = _inputs((4, 11), torch.float32)
    want = ops.masked_whiten(x, mask, dim=-1)
    for as_dtype in MASK_DTYPES[1:]:
        assert torch.equal(ops.masked_whiten(x, mask.to(as_dtype), dim=-1), want)


def test_mask_values_other_than_0_and_1(backend, monkeypatch):
    """2.0 and -1 select, -0.0 does not; RLKERN_STRICT_MASKS=1 (rlkern.ops._common.STRICT_MASKS)
    refuses anything but 0 and 1, bool masks excepted."""
    x = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    assert ops.masked_sum(x, torch.tensor([[2.0, -0.0, 0.5], [0.0, -1.0, 0.0]])).item() == 1 + 4 + 16
    assert ops.masked_sum(x, torch.tensor([[0, 3, 0], [-1, 0, 0]]), dim=-1).tolist() == [2.0, 8.0]
    from rlkern.ops import _common

    monkeypatch.setattr(_common, "STRICT_MASKS", True)
    for bad in (torch.full((2, 3), 0.5), torch.full((2, 3), -1),
                torch.full((2, 3), 2.0, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 \(RLKERN_STRICT_MASKS=1\)"):
            ops.masked_mean(x, bad)
    assert ops.masked_sum(x, torch.tensor([[1.0, -0.0, 1.0], [0.0, 1.0, 0.0]])).item() == 1 + 4 + 16


def test_gradcheck_reference():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 6) < 0.7
    mask[:, :2] = True
    for dim in (None, -1):
        kw = {"dim": dim}
        kw["shift_mean"] = False
        assert torch.autograd.gradcheck(lambda t, kw=kw: reference.masked_whiten(t, mask, **kw), (x,))
        del kw["shift_mean"]
        assert torch.autograd.gradcheck(lambda t, kw=kw: reference.masked_var(t, mask, **kw), (x,))


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_gradcheck_kernels(backend_name):
    # fp32 kernels: a 1e-2 finite-difference step and loose bounds; a wrong term is off by O(1).
    x = torch.randn(3, 7, requires_grad=True)
    mask = torch.rand(3, 7) < 0.7
    mask[:, :2] = True
    with rlkern.use_backend(backend_name):
        for dim in (None, -1):
            kw = {"dim": dim}
            for fn in (lambda t, kw=kw: ops.masked_whiten(t, mask, shift_mean=False, eps=1e-2, **kw),
                       lambda t, kw=kw: ops.masked_var(t, mask, **kw),
                       lambda t, kw=kw: ops.masked_mean(t, mask, **kw)):
                assert torch.autograd.gradcheck(fn, (x,), eps=1e-2, atol=3e-3, rtol=2e-2, nondet_tol=0.0)


def test_global_statistics_are_thread_count_invariant():
    x, mask = _inputs((40, 4096), torch.bfloat16)
    with rlkern.use_backend("cpp"):
        var, white = ops.masked_var(x, mask), ops.masked_whiten(x, mask)
        torch.set_num_threads(1)
        try:
            assert torch.equal(ops.masked_var(x, mask), var)
            assert torch.equal(ops.masked_whiten(x, mask), white)
        finally:
            torch.set_num_threads(2)
        row = ops.masked_whiten(x, mask, dim=-1)
        assert torch.equal(ops.masked_whiten(x[17:18].clone(), mask[17:18].clone(), dim=-1), row[17:18])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ops.masked_mean(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)), ValueError,
         "masked_mean needs at least 1 selected element, but the mask selects 0"),
        (lambda: ops.masked_mean(torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), dim=-1), ValueError,
         "but a row of the mask selects 0"),
        (lambda: ops.masked_var(torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]])), ValueError,
         "masked_var needs at least 2 selected elements"),
        (lambda: ops.masked_whiten(torch.zeros(2, 3), torch.tensor([[1, 1, 0], [1, 0, 0]]), dim=1),
         ValueError, "masked_whiten needs at least 2 selected elements, but a row of the mask selects 1"),
        (lambda: ops.masked_sum(torch.zeros(2, 3), torch.ones(3, 2)), ValueError,
         r"mask must have shape \(2, 3\)"),
        (lambda: ops.masked_sum(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.complex64)), TypeError,
         "mask must be bool or a real"),
        (lambda: ops.masked_sum(torch.zeros(2, 3), torch.ones(2, 3), dim=2), IndexError,
         r"dim must lie in \[-2, 2\)"),
        (lambda: ops.masked_sum(torch.zeros(2, 3), torch.ones(2, 3), dim=1.0), TypeError,
         "dim must be None or an int"),
        (lambda: ops.masked_whiten(torch.zeros(2, 3), torch.ones(2, 3), eps=-1.0), ValueError, "eps must be"),
        (lambda: ops.masked_sum([1.0], torch.ones(1)), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input(backend, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_backend_follows_rlkern_backend_at_every_call(monkeypatch):
    """pick_backend keeps the default ("auto") answer per device, read without os.environ.get's
    cost: setting or removing RLKERN_BACKEND between two calls must still take effect."""
    monkeypatch.delenv("RLKERN_BACKEND", raising=False)
    x, mask = _inputs((3, 5), torch.float32)
    calls = []
    monkeypatch.setattr(reference, "masked_sum", lambda *a, **k: calls.append(1) or torch.zeros(()))
    ops.masked_sum(x, mask)  # the C++ kernels
    monkeypatch.setenv("RLKERN_BACKEND", "torch")
    ops.masked_sum(x, mask)
    monkeypatch.delenv("RLKERN_BACKEND")
    ops.masked_sum(x, mask)
    assert calls == [1]


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_opcheck(backend_name, mask_dtype):
    x, mask = _inputs((4, 19), torch.float32)
    mask = mask.to(mask_dtype)
    for dim in (None, 1):
        for kind in (0, 1, 2):
            torch.library.opcheck(torch.ops.rlkern.masked_stat.default,
                                  (x.clone().requires_grad_(), mask, dim, kind, True, 1, backend_name))
            _, saved = torch.ops.rlkern.masked_stat(x, mask, dim, kind, True, 1, backend_name)
            torch.library.opcheck(torch.ops.rlkern.masked_stat_bwd.default,
                                  (torch.randn(saved.shape[1:]), x, mask, saved, dim, kind, backend_name))
        _, saved = torch.ops.rlkern.masked_whiten(x, mask, dim, False, True, 1e-8, 2, backend_name)
        torch.library.opcheck(torch.ops.rlkern.masked_whiten.default,
                              (x.clone().requires_grad_(), mask, dim, False, True, 1e-8, 2, backend_name))
        torch.library.opcheck(torch.ops.rlkern.masked_whiten_bwd.default,
                              (torch.randn(4, 19), x, mask, saved, dim, False, backend_name))


def compiled_matches_eager(step, x: torch.Tensor) -> None:
    """torch.compile(step, fullgraph=True) (aot_eager: the custom ops stay calls) gives eager's
    value and gradient w.r.t. x. (tests/test_kl_penalty.py uses it too.)"""
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, out_e = compiled(x1), step(x2)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(x1.grad, x2.grad)


def test_torch_compile_fullgraph():
    x, mask = _inputs((4, 24), torch.float32)

    def step(t):
        w = ops.masked_whiten(t, mask, dim=-1)
        return (w * w.detach()).sum() + ops.masked_var(t, mask) + ops.masked_mean(t, mask, dim=0).sum()

    compiled_matches_eager(step, x)


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_whitened_values_have_zero_mean_unit_variance(backend_name):
    x, mask = _inputs((8, 50), torch.float32)
    with rlkern.use_backend(backend_name):
        w = ops.masked_whiten(x, mask, eps=0.0)
        assert abs(ops.masked_mean(w, mask).item()) < 1e-5
        assert abs(ops.masked_var(w, mask).item() - 1) < 1e-5


def _stat_and_grad(fn, x, mask, dim, grad_seed):
    leaf = x.detach().requires_grad_(True)
    out = fn(leaf, mask, dim=dim)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    (dx,) = torch.autograd.grad(out, leaf, g)
    return out, dx


@pytest.mark.parametrize("fn_name", ["masked_sum", "masked_mean", "masked_var"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64])
@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_cpp_autograd_node_matches_the_python_function(monkeypatch, fn_name, dtype, mask_dtype, dim):
    """Eager calls with a gradient on the C++ backend run one C++ autograd node (masked_stat's
    register_native); it runs the same kernels as the Python torch.autograd.Function it replaces, so
    values and gradients are the same bits (outputs poisoned in both)."""
    from rlkern.ops import masked as m

    x, mask = _inputs((5, 37), dtype)
    mask = mask.to(mask_dtype)
    fn = getattr(ops, fn_name)
    with rlkern.use_backend("cpp"):
        out, dx = _stat_and_grad(fn, x, mask, dim, 1)
        assert type(out.grad_fn).__name__ == "CppFunction"
        monkeypatch.setattr(m._masked_stat, "_native", None)
        out_py, dx_py = _stat_and_grad(fn, x, mask, dim, 1)
        assert type(out_py.grad_fn).__name__ != "CppFunction"
    torch.testing.assert_close(out, out_py, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx_py, rtol=0, atol=0)
    assert dx.dtype == x.dtype and dx.shape == x.shape


def test_cpp_autograd_node_keeps_the_checks():
    """The C++ node path refuses what the Python path refuses: an empty selection (ValueError), x
    modified in place after the forward (autograd's saved-tensor version check), and it gives no
    gradient under no_grad."""
    x = torch.randn(3, 8, requires_grad=True)
    mask = torch.ones(3, 8)
    mask[1] = 0
    with rlkern.use_backend("cpp"):
        with pytest.raises(ValueError, match="masked_mean needs at least 1 selected element"):
            ops.masked_mean(x, mask, dim=1)
        with pytest.raises(ValueError, match="masked_var needs at least 2"):
            ops.masked_var(x, torch.zeros(3, 8))
        y = x.detach().clone().requires_grad_(True)
        z = y * 1.0
        out = ops.masked_var(z, mask)
        z.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()
        with torch.no_grad():
            assert ops.masked_sum(x, mask).grad_fn is None
        # a gradient to the mask, when it asks for one, is None (as from the Python Function)
        fmask = mask.clone().requires_grad_(True)
        out = ops.masked_sum(x, fmask)
        assert torch.autograd.grad(out, (x, fmask), allow_unused=True)[1] is None
