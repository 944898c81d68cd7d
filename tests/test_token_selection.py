"""rlkern.ops token selection (kl_cov_mask, clip_cov_mask, high_entropy_mask) against the peers' real code.

* high_entropy_mask vs TRL 1.16 ``GRPOTrainer.get_high_entropy_mask`` with a real single-process
  ``accelerate.Accelerator``: bitwise equal masks (same float32 threshold) on fresh random inputs,
  ties, NaN, all masked, q = 0 / 1, bf16 / fp16, bool / int / float masks.
* kl_cov_mask / clip_cov_mask vs verl 0.9.1 ``compute_policy_loss_kl_cov`` / ``_clip_cov``: verl's
  selection is read off its real function through the gradient of the loss with respect to
  ``rollout_is_weights`` (``token-sum``: d loss / d w = verl's per-token loss at valid tokens).
  KL-Cov: the same tokens without ties at the k-th value; with ties, the same covariance values.
  Clip-Cov: verl draws with ``torch.randperm``, rlkern with float64 keys: the same candidates and
  count always, the same set whenever every candidate is taken, and both uniform over subsets (a
  5-sigma frequency check over many draws of each).
* kl_cov_rows (KL-Cov's fused token losses, summed per row) on every backend against a float64
  oracle of verl's token formula, forward and gradient, weights, bf16 / fp16, NaN in padding.
* no host sync: each op traces with ``torch.compile(fullgraph=True)`` (``.item()``, ``nonzero`` or a
  data-dependent shape would break the graph), and the torch code of the torch backend and of the
  GPU selection (kernels/token_selection.py) runs under a dispatch mode that fails on any op reading
  a value back to the host (``_local_scalar_dense``: ``.item()``, ``int()``, ``bool()``) or sizing its
  output by the data (``nonzero``, ``masked_select``, ``unique``).
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import rlkern
from rlkern import ops
from tests.conftest import DTYPES, KERNEL_BACKENDS

warnings.filterwarnings("ignore", category=FutureWarning)

# The peers are test dependencies (`make setup` installs TRL 1.16 and verl 0.9.1): imported outright,
# after the filter above (verl warns at import).
import verl.trainer.ppo.core_algos as core  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


# ------------------------------------------------------------------------------------------------
# TRL get_high_entropy_mask
# ------------------------------------------------------------------------------------------------


class _TrainerSelf:
    """The ``self`` that get_high_entropy_mask reads: only ``accelerator`` (one real process)."""

    accelerator = None


@pytest.fixture(scope="module")
def trl_self():
    me = _TrainerSelf()
    me.accelerator = Accelerator(cpu=True)
    return me


def _trl_mask(me, entropies, mask, q):
    return GRPOTrainer.get_high_entropy_mask(me, entropies, mask, q)


# The backends: cpp runs csrc/token_selection.cpp's selection, torch and triton the sort (the GPU's path).
@pytest.mark.parametrize("case", range(40))
def test_high_entropy_mask_matches_trl(trl_self, case, backend):
    seed = _fresh_seed()
    g = _gen(seed)
    b, t = int(torch.randint(1, 9, (), generator=g)), int(torch.randint(1, 70, (), generator=g))
    entropies = torch.rand(b, t, generator=g) * 4
    if case % 3 == 0:
        entropies = entropies.round()  # many ties, also at the threshold
    dtype = (torch.float32, torch.bfloat16, torch.float16)[case % 3]
    entropies = entropies.to(dtype)
    mask = torch.rand(b, t, generator=g) < 0.6
    mask = (mask, mask.long(), mask.float(), mask.int(), mask.to(torch.uint8), mask.bfloat16())[case % 6]
    q = float(torch.rand((), generator=g)) if case % 5 else (0.0, 1.0)[case % 2]
    want = _trl_mask(trl_self, entropies, mask, q)
    got = ops.high_entropy_mask(entropies, mask, q)
    assert got.dtype == torch.bool and got.shape == entropies.shape
    assert torch.equal(got, want), f"seed {seed}"


@pytest.mark.parametrize("what", ["all_masked", "nan_valid", "nan_padding", "inf_valid", "sentinel",
                                  "one_token", "empty"])
def test_high_entropy_mask_edges_match_trl(trl_self, what, backend):
    g = _gen(_fresh_seed())
    entropies = torch.rand(4, 9, generator=g) * 3
    mask = torch.rand(4, 9, generator=g) < 0.7
    mask[0, 0] = True
    if what == "all_masked":
        mask[:] = False
    elif what == "nan_valid":
        entropies[0, 0] = math.nan
    elif what == "nan_padding":
        mask[1, 1] = False
        entropies[1, 1] = math.nan
    elif what == "inf_valid":
        entropies[0, 0] = math.inf
    elif what == "sentinel":  # TRL drops gathered values equal to its pad value -1e9
        entropies[0, 0] = -1e9
        entropies[2, 3] = -2e9
        mask[2, 3] = True
    elif what == "one_token":
        mask[:] = False
        mask[3, 8] = True
    elif what == "empty":
        entropies, mask = entropies[:0], mask[:0]
    for q in (0.0, 0.2, 0.5, 0.97, 1.0):
        want = _trl_mask(trl_self, entropies, mask, q)
        assert torch.equal(ops.high_entropy_mask(entropies, mask, q), want), (what, q)


@pytest.mark.parametrize("q", [1.0, 1.0 - 2.0**-24, 0.5])
def test_high_entropy_mask_past_2_24_tokens_selects_as_the_sort_does(q):
    """2^24 + 4 live tokens (beyond torch.quantile's limit, so against the sort path): float32(n - 1)
    rounds up to n there, so at q = 1 the quantile rank points past the last value, at the +inf that
    follows the values in the sort (the C++ selection must not read past them)."""
    g = _gen(_fresh_seed())
    entropies = torch.rand(2, 2**23 + 2, generator=g) * 4
    mask = torch.ones(entropies.shape, dtype=torch.bool)
    with rlkern.use_backend("cpp"):
        got = ops.high_entropy_mask(entropies, mask, q)
    with rlkern.use_backend("torch"):
        want = ops.high_entropy_mask(entropies, mask, q)
    assert torch.equal(got, want)
    if q == 0.5:
        assert 0.49 < float(got.float().mean()) < 0.51


def test_high_entropy_mask_rejects_bad_arguments():
    e, m = torch.rand(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="threshold"):
        ops.high_entropy_mask(e, m, 1.5)
    with pytest.raises(ValueError, match="mask"):
        ops.high_entropy_mask(e, m[:, :2], 0.5)


# ------------------------------------------------------------------------------------------------
# verl KL-Cov / Clip-Cov: the selection read off verl's real functions
# ------------------------------------------------------------------------------------------------


def _config(**policy):
    return ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, clip_ratio=0.2,
                       policy_loss=PolicyLossConfig(**policy))


def _inputs(seed: int, b: int, t: int, ties: bool = False, dtype=torch.float32):
    g = _gen(seed)
    logp = -torch.rand(b, t, generator=g) * 3
    if ties:
        logp = logp.mul(4).round().div(4)
    # |log r| in [0.05, 0.5]: KL-Cov's penalty ppo_kl_coef * |log r| marks every selected token
    sign = torch.where(torch.rand(b, t, generator=g) < 0.5, -1.0, 1.0)
    step = (torch.rand(b, t, generator=g) * 0.45 + 0.05) * sign
    old = logp + step
    adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous() * 2  # per-sequence, as GRPO's
    mask = (torch.rand(b, t, generator=g) < 0.7).float()
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


def _verl_token_losses(fn, old, logp, adv, mask, config):
    """verl's per-token loss at valid tokens: d (token-sum loss) / d rollout_is_weights."""
    w = torch.ones(logp.shape, dtype=logp.dtype, requires_grad=True)
    loss, _ = fn(old, logp, adv, mask, "token-sum", config, w)
    (grad,) = torch.autograd.grad(loss, w)
    return grad


def _verl_kl_cov_selection(logp, old, adv, mask, ratio):
    coef = 1000.0  # |log r| >= 0.05: a selected token's loss is >= 50 above -A r
    per_token = _verl_token_losses(core.compute_policy_loss_kl_cov, old, logp, adv, mask,
                                   _config(kl_cov_ratio=ratio, ppo_kl_coef=coef))
    surrogate = -adv * torch.exp(logp - old)
    return ((per_token - surrogate * mask) > 10.0) & (mask > 0)


@pytest.mark.parametrize("ratio", [0.0002, 0.01, 0.1, 0.5])
@pytest.mark.parametrize("size", [(1, 1), (3, 17), (16, 200), (64, 300)])
def test_kl_cov_mask_matches_verl(backend, ratio, size):
    seed = _fresh_seed()
    logp, old, adv, mask = _inputs(seed, *size)
    want = _verl_kl_cov_selection(logp, old, adv, mask, ratio)
    got = ops.kl_cov_mask(adv, logp, mask, ratio)
    assert got.dtype == torch.bool and got.shape == logp.shape
    assert torch.equal(got, want), f"seed {seed}: {int(got.sum())} vs {int(want.sum())} selected"


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5])
def test_kl_cov_mask_ties_select_the_same_values_as_verl(backend, ratio):
    """Quantised log-probs and per-row advantages: many exactly equal covariances, also at the k-th.
    verl's host topk takes tied tokens in an unspecified order: the same count and the same
    multiset of covariance values must come out."""
    seed = _fresh_seed()
    logp, old, adv, mask = _inputs(seed, 24, 80, ties=True)
    want = _verl_kl_cov_selection(logp, old, adv, mask, ratio)
    got = ops.kl_cov_mask(adv, logp, mask, ratio)
    cov = ops.token_covariance(adv, logp, mask)
    assert int(got.sum()) == int(want.sum()), f"seed {seed}"
    torch.testing.assert_close(cov[got].sort().values, cov[want].sort().values, rtol=0, atol=0)
    # rlkern's rule among ties: row-major order (a stable descending sort of the valid covariances)
    valid = (mask > 0).reshape(-1)
    order = torch.sort(torch.where(valid, cov.reshape(-1), -math.inf), descending=True, stable=True).indices
    assert torch.equal(got.reshape(-1).nonzero().reshape(-1), order[: int(got.sum())].sort().values)


def test_kl_cov_mask_edges(backend):
    logp, old, adv, mask = _inputs(_fresh_seed(), 5, 11)
    none = torch.zeros_like(mask)
    assert not ops.kl_cov_mask(adv, logp, none, 0.5).any()  # n = 0: verl's k = min(ratio, 0) = 0
    assert not _verl_kl_cov_selection(logp, old, adv, none, 0.5).any()
    # the smallest ratio still selects one token (verl: max(1, int(n * ratio)))
    assert int(ops.kl_cov_mask(adv, logp, mask, 1e-9).sum()) == 1
    assert int(ops.kl_cov_mask(adv, logp, mask, 1.0).sum()) == int(mask.sum())
    assert ops.kl_cov_mask(adv[:0], logp[:0], mask[:0], 0.5).shape == (0, 11)
    for dtype in (torch.bool, torch.int64, torch.bfloat16):
        got = ops.kl_cov_mask(adv, logp, mask.to(dtype), 0.3)
        assert torch.equal(got, ops.kl_cov_mask(adv, logp, mask, 0.3))
    with pytest.raises(ValueError, match="ratio"):
        ops.kl_cov_mask(adv, logp, mask, 0.0)
    # NaN at a valid token: every covariance is NaN (verl's loss is NaN too); no error, valid tokens only
    logp[0, 0] = math.nan
    assert not (ops.kl_cov_mask(adv, logp, mask, 0.3) & (mask == 0)).any()


def test_kl_cov_mask_bf16_computes_in_float32(backend):
    """bf16 inputs are ranked in float32 (rlkern's rule; verl ranks in the inputs' dtype, where ties
    are common): the selection is verl's on the same values upcast to float32."""
    logp, old, adv, mask = _inputs(_fresh_seed(), 16, 120, dtype=torch.bfloat16)
    got = ops.kl_cov_mask(adv, logp, mask, 0.05)
    assert torch.equal(got, ops.kl_cov_mask(adv.float(), logp.float(), mask, 0.05))
    want = _verl_kl_cov_selection(logp.float(), old.float(), adv.float(), mask, 0.05)
    cov = ops.token_covariance(adv, logp, mask)
    torch.testing.assert_close(cov[got].sort().values, cov[want].sort().values, rtol=0, atol=0)


def _kl_cov_oracle(logp, old, adv, mask, coef, weights, chosen):
    """verl's KL-Cov token losses in float64 on the given selection, summed per row; the per-token
    gradient d l / d logp; the |d| sums and counts."""
    valid = mask != 0
    d = logp.double() - old.double()
    surrogate = -adv.double() * torch.exp(d)
    tok = torch.where(chosen, surrogate + coef * d.abs(), surrogate)
    local = torch.where(chosen, surrogate + coef * torch.sign(d), surrogate)
    w = torch.ones_like(d) if weights is None else weights.double()
    tok, local = torch.where(valid, tok * w, 0), torch.where(valid, local * w, 0)
    return tok.sum(-1), local, torch.where(valid, d.abs(), 0).sum(-1), valid.sum(-1).double()


def _rows_inputs(seed, size, dtype=torch.float32):
    rows = math.prod(size[:-1])
    logp, old, adv, mask = (x.reshape(size) for x in _inputs(seed, rows, size[-1], dtype=dtype))
    adv = adv + 0.3 * torch.randn(size, generator=_gen(seed + 1)).to(dtype)  # per-token advantages
    return logp, old, adv, mask


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(1, 1), (3, 17), (2, 5, 40), (16, 1100)])
def test_kl_cov_rows_matches_oracle(backend, size, dtype, weighted):
    """Row sums, |d| sums, counts and the gradient against float64 on the same inputs and selection.
    Tolerance: each token is computed in float32 (a few ulps) and summed, so a row sum may be off by
    ~T * 2^-24 * sum|l| (a bound, 1e-5 relative to sum|l|); the gradient is stored in the input
    dtype: 2 ulps of it."""
    seed = _fresh_seed()
    logp, old, adv, mask = _rows_inputs(seed, size, dtype)
    weights = torch.rand(size, generator=_gen(seed + 2)) * 2 if weighted else None
    leaf = logp.clone().requires_grad_(True)
    sums, abs_kl, counts, chosen = ops.kl_cov_rows(leaf, old, adv, mask, ratio=0.01, coef=0.7,
                                                   weights=weights)
    assert chosen.dtype == torch.bool and chosen.shape == size
    assert torch.equal(chosen, ops.kl_cov_mask(adv, logp, mask, 0.01))
    want, local, want_abs, want_n = _kl_cov_oracle(logp, old, adv, mask, 0.7, weights, chosen)
    for got, ref in ((sums, want), (abs_kl, want_abs), (counts, want_n)):
        assert got.shape == size[:-1] and got.dtype == torch.float32
        scale = ref.abs() + 1.0
        assert ((got.double() - ref).abs() <= 1e-5 * scale * max(1.0, size[-1] / 1000)).all(), f"seed {seed}"
    up = torch.rand(size[:-1], generator=_gen(seed + 3)) + 0.5
    (grad,) = torch.autograd.grad((sums * up).sum(), leaf)
    assert grad.dtype == dtype and grad.shape == size
    want_grad = up.double()[..., None] * local
    eps = torch.finfo(dtype).eps
    atol = 2 * eps * float(want_grad.abs().max())
    torch.testing.assert_close(grad.double(), want_grad, rtol=2 * eps, atol=atol,
                               msg=lambda m: f"seed {seed}: {m}")


def test_kl_cov_rows_nan_and_padding(backend):
    """NaN / inf in padding reach nothing (values and gradient equal the clean ones); a NaN at a valid
    token makes its row NaN and leaves the other rows finite."""
    logp, old, adv, mask = _rows_inputs(_fresh_seed(), (4, 30))
    clean = ops.kl_cov_rows(logp, old, adv, mask, ratio=0.05, coef=0.5)
    pad = mask == 0
    dirty = [torch.where(pad, v, x) for x, v in ((logp, math.nan), (old, math.inf), (adv, math.nan))]
    leaf = dirty[0].clone().requires_grad_(True)
    got = ops.kl_cov_rows(leaf, dirty[1], dirty[2], mask, ratio=0.05, coef=0.5,
                          weights=torch.where(pad, math.nan, torch.ones(4, 30)))
    for g, w in zip(got, clean):
        assert torch.equal(g, w) if g.dtype == torch.bool else torch.allclose(g, w, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(got[0].sum(), leaf)
    assert torch.isfinite(grad).all() and (grad[pad] == 0).all()
    valid_at = mask[2].nonzero()[0, 0]
    nan_logp = logp.clone()
    nan_logp[2, valid_at] = math.nan
    sums = ops.kl_cov_rows(nan_logp, old, adv, mask, ratio=0.05, coef=0.5)[0]
    assert sums[2].isnan() and torch.isfinite(sums[[0, 1, 3]]).all()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64, torch.bfloat16,
                                        torch.float16])
def test_kl_cov_rows_reads_every_mask_dtype(backend, mask_dtype):
    """Each mask storage type the kernels read (a separate instantiation per CPU level in C++) gives
    the float mask's results bit for bit; T = 300 has full 16-lane steps, a second 256-token span
    and a row tail, and ratio 0.002 fills the selection heap early, so its skip test decides."""
    logp, old, adv, mask = _rows_inputs(_fresh_seed(), (7, 300))
    results = []
    for m in (mask, mask.to(mask_dtype)):
        leaf = logp.clone().requires_grad_(True)
        out = ops.kl_cov_rows(leaf, old, adv, m, ratio=0.002, coef=0.4)
        results.append((*out, torch.autograd.grad(out[0].sum(), leaf)[0]))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_kl_cov_rows_rejects_bad_arguments():
    logp, old, adv, mask = _rows_inputs(0, (3, 8))
    with pytest.raises(ValueError, match="ratio"):
        ops.kl_cov_rows(logp, old, adv, mask, ratio=0.0)
    with pytest.raises(ValueError, match="old_logp"):
        ops.kl_cov_rows(logp, old[:, :4], adv, mask)
    with pytest.raises(ValueError, match="weights"):
        ops.kl_cov_rows(logp, old, adv, mask, weights=torch.ones(3, 7))
    with pytest.raises(ValueError, match="mask"):
        ops.kl_cov_rows(logp, old, adv, mask[:2])
    with pytest.raises(ValueError, match="logp"):
        ops.kl_cov_rows(logp[0, 0], old[0, 0], adv[0, 0], mask[0, 0])
    with pytest.raises(TypeError, match="coef"):
        ops.kl_cov_rows(logp, old, adv, mask, coef="1")
    empty = ops.kl_cov_rows(logp[:0], old[:0], adv[:0], mask[:0])
    assert empty[0].shape == (0,) and empty[3].shape == (0, 8)


def test_kl_cov_rows_gradcheck_reference():
    logp, old, adv, mask = (x.double() for x in _rows_inputs(_fresh_seed(), (3, 9)))
    with rlkern.use_backend("torch"):
        leaf = logp.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: ops.kl_cov_rows(x, old, adv, mask, ratio=0.2, coef=0.3)[0],
                                        (leaf,))


def _clip_cov_parts(logp, old, adv, mask, lb, ub, low=0.2, high=0.2):
    ratio = torch.exp(logp - old)
    pg1, pg2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - low, 1 + high)
    clipped = pg2 > pg1
    cov = ops.token_covariance(adv, logp, mask)
    candidates = (mask > 0) & ~clipped & (cov > lb) & (cov < ub)
    return clipped, candidates, torch.maximum(pg1, pg2)


def _verl_clip_cov_selection(logp, old, adv, mask, ratio, lb, ub):
    per_token = _verl_token_losses(core.compute_policy_loss_clip_cov, old, logp, adv, mask,
                                   _config(clip_cov_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub))
    _, _, full = _clip_cov_parts(logp, old, adv, mask, lb, ub)
    return (per_token == 0) & (full != 0) & (mask > 0)


@pytest.mark.parametrize("ratio", [0.0002, 0.02, 0.3, 1.0])
@pytest.mark.parametrize("size", [(1, 1), (4, 33), (32, 150)])
def test_clip_cov_mask_matches_verl(ratio, size):
    seed = _fresh_seed()
    logp, old, adv, mask = _inputs(seed, *size)
    lb, ub = 0.1, 3.0
    clipped, candidates, _ = _clip_cov_parts(logp, old, adv, mask, lb, ub)
    want = _verl_clip_cov_selection(logp, old, adv, mask, ratio, lb, ub)
    got = ops.clip_cov_mask(adv, logp, mask, ratio, lb, ub, exclude=clipped)
    k = max(int(ratio * float(mask.sum())), 1)
    count = min(k, int(candidates.sum()))
    assert int(got.sum()) == int(want.sum()) == count, f"seed {seed}"
    assert not (got & ~candidates).any() and not (want & ~candidates).any(), f"seed {seed}"
    if count == int(candidates.sum()):  # every candidate taken: no randomness left
        assert torch.equal(got, want), f"seed {seed}"


def test_clip_cov_mask_draws_uniform_subsets_like_verl():
    """5 candidates, k = 2: each of the 10 subsets has probability 0.1 under verl's randperm and
    under rlkern's keys; both within 5 sigma of it (a false alarm has probability ~1e-5)."""
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -2.5, -0.2, -1.2, -0.7, -2.2]])
    adv = torch.tensor([[2.0, -2.0, 2.0, -2.0, 2.0, -2.0, 2.0, -2.0, 2.0, -2.0]])
    old = logp.clone()  # r = 1: nothing clipped
    mask = torch.ones_like(logp)
    cov = ops.token_covariance(adv, logp, mask)
    lb, ub = float(cov.reshape(-1).sort().values[5]) - 1e-6, 100.0  # the 5 largest covariances are candidates
    ratio = 0.2  # k = int(0.2 * 10) = 2
    _, candidates, _ = _clip_cov_parts(logp, old, adv, mask, lb, ub)
    assert int(candidates.sum()) == 5
    subsets = {s: i for i, s in enumerate(itertools.combinations(candidates.reshape(-1).nonzero().reshape(-1)
                                                                 .tolist(), 2))}
    for name, draws in (("rlkern", 4000), ("verl", 1000)):
        counts = torch.zeros(len(subsets))
        for _ in range(draws):
            if name == "rlkern":
                sel = ops.clip_cov_mask(adv, logp, mask, ratio, lb, ub)
            else:
                sel = _verl_clip_cov_selection(logp, old, adv, mask, ratio, lb, ub)
            counts[subsets[tuple(sel.reshape(-1).nonzero().reshape(-1).tolist())]] += 1
        sigma = math.sqrt(0.1 * 0.9 / draws)
        assert ((counts / draws - 0.1).abs() < 5 * sigma).all(), (name, counts.tolist())


def test_clip_cov_mask_generator_reproducible_and_exclude():
    logp, _, adv, mask = _inputs(_fresh_seed(), 8, 40)
    cov = ops.token_covariance(adv, logp, mask)
    lb, ub = float(cov.min()) - 1, float(cov.max()) + 1  # every valid token is a candidate
    a = ops.clip_cov_mask(adv, logp, mask, 0.1, lb, ub, generator=torch.Generator().manual_seed(7))
    b = ops.clip_cov_mask(adv, logp, mask, 0.1, lb, ub, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and int(a.sum()) == max(1, int(0.1 * float(mask.sum())))
    exclude = torch.rand(mask.shape) < 0.5
    c = ops.clip_cov_mask(adv, logp, mask, 1.0, lb, ub, exclude=exclude)
    assert torch.equal(c, (mask > 0) & ~exclude)  # ratio 1: every candidate
    # strict bounds: lb = ub selects nothing; no valid token selects nothing
    assert not ops.clip_cov_mask(adv, logp, mask, 1.0, 0.5, 0.5).any()
    assert not ops.clip_cov_mask(adv, logp, torch.zeros_like(mask), 1.0, lb, ub).any()
    assert ops.clip_cov_mask(adv[:0], logp[:0], mask[:0], 0.5).shape == (0, 40)
    bf = ops.clip_cov_mask(adv.bfloat16(), logp.bfloat16(), mask.bool(), 1.0, -1e9, 1e9)
    assert torch.equal(bf, mask > 0)


def test_token_covariance_is_verls_centred_product():
    logp, _, adv, mask = _inputs(_fresh_seed(), 6, 21)
    valid = mask > 0
    a, x = adv[valid].double(), logp[valid].double()
    want = (adv.double() - a.mean()) * (logp.double() - x.mean())
    torch.testing.assert_close(ops.token_covariance(adv, logp, mask).double(), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# no host sync: every op traces into one graph
# ------------------------------------------------------------------------------------------------


def test_selection_ops_trace_fullgraph():
    torch._dynamo.reset()
    logp, _, adv, mask = _inputs(_fresh_seed(), 6, 50)
    entropies = torch.rand(6, 50)

    def select(adv, logp, mask, entropies):
        return (ops.kl_cov_mask(adv, logp, mask, 0.05), ops.high_entropy_mask(entropies, mask, 0.8),
                ops.clip_cov_mask(adv, logp, mask, 1.0, -1e9, 1e9))

    compiled = torch.compile(select, fullgraph=True, backend="eager")
    for got, want in zip(compiled(adv, logp, mask, entropies), select(adv, logp, mask, entropies)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_kl_cov_rows_traces_fullgraph_with_backward(backend_name):
    torch._dynamo.reset()
    logp, old, adv, mask = _rows_inputs(_fresh_seed(), (6, 50))

    def loss(logp, old, adv, mask):
        sums, abs_kl, counts, _ = ops.kl_cov_rows(logp, old, adv, mask, ratio=0.05, coef=0.5)
        return sums.sum() / counts.sum(), abs_kl.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="eager")
    with rlkern.use_backend(backend_name):
        grads = []
        for fn in (compiled, loss):
            leaf = logp.clone().requires_grad_(True)
            value, _ = fn(leaf, old, adv, mask)
            grads.append(torch.autograd.grad(value, leaf)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


_SYNCS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "equal")


class _NoHostSync(TorchDispatchMode):
    """Fails on every op that reads a tensor's value back to the host or sizes its output by the
    data: what would stall a GPU stream (on CPU tensors the same ops are the ones that would)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _SYNCS:
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


def test_no_host_sync_detector_catches_item():
    with pytest.raises(AssertionError, match="host sync"), _NoHostSync():
        torch.ones(3).sum().item()
    with pytest.raises(AssertionError, match="host sync"), _NoHostSync():
        torch.ones(3).nonzero()


def test_selection_torch_code_never_syncs():
    """The torch backend's ops and the GPU selection (kernels/token_selection.py, plain torch) under
    _NoHostSync, with their results checked against the default backend's."""
    from rlkern.kernels import token_selection as gpu

    logp, old, adv, mask = _rows_inputs(_fresh_seed(), (8, 300))
    entropies = torch.rand(8, 300)
    want = ops.kl_cov_mask(adv, logp, mask, 0.01)
    chosen = torch.empty(logp.shape, dtype=torch.bool)
    with _NoHostSync():
        gpu.kl_cov_select(adv, logp, mask, 0.01, chosen)
    assert torch.equal(chosen, want)
    with rlkern.use_backend("torch"), _NoHostSync():
        got = ops.kl_cov_mask(adv, logp, mask, 0.01)
        rows = ops.kl_cov_rows(logp.requires_grad_(True), old, adv, mask, ratio=0.01, coef=0.5)
        torch.autograd.grad(rows[0].sum(), logp)
        ops.clip_cov_mask(adv, logp.detach(), mask, 0.01, -1.0, 1.0)
        ops.high_entropy_mask(entropies, mask, 0.8)
    assert torch.equal(got, want) and torch.equal(rows[3], want)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("n,width", [(64 * 300, 20), (64 * 300 + 17, 20), (10_000, 1), (10_000, 39),
                                     (100, 7)])
def test_two_stage_topk_gives_torch_topk_values(n, width, largest):
    """The block-extremum first stage (used when width is small against n): torch.topk's values
    exactly, and indices that point at them, also with many ties and -inf padding."""
    from rlkern.ops.token_selection import _topk

    g = _gen(_fresh_seed())
    for key in (torch.randn(n, generator=g), torch.randint(0, 5, (n,), generator=g).float(),
                torch.where(torch.rand(n, generator=g) < 0.5, torch.randn(n, generator=g), -math.inf)):
        values, index = _topk(key, width, largest=largest)
        want = torch.topk(key, width, largest=largest, sorted=True).values
        assert torch.equal(values, want)
        assert index.max() < n and torch.equal(key[index], values)
