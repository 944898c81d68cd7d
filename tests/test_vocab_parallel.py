"""rlkern.ops.vocab_parallel with 2 gloo processes on CPU against the single-process results.

Every rank draws the same full tensors (same seed), keeps its vocabulary shard (rank r: ids
[r*ceil(V/2), (r+1)*ceil(V/2)), the last shard shorter when V is odd) and must reproduce the
single-process log-probs, entropy and gradients. Tolerance: fp32 atol 2e-5 / rtol 1e-5: the
sharded path combines per-shard sums with a few extra fp32 exp/log roundings (lse, the mixture
weights of the entropy), each ~1 ulp of quantities <~ 20; fp64 (the torch backend): 1e-10.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
BACKENDS = ["torch", "cpp", "triton"]


def _rendezvous(tmp_path) -> str:
    # A FileStore rather than a TCP store: the TCP store's server thread lives in rank 0 and, torn
    # down while rank 1 is still disconnecting, once aborted rank 0 at exit ("terminate called
    # without an active exception").
    return f"file://{tmp_path / 'gloo-store'}"


def _tol(dtype):
    return dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-5)


def _linear_case(rank, backend, dtype, vocab, chunk_size, bias_on, group):
    import rlkern
    from rlkern.ops.vocab_parallel import shard_range

    gen = torch.Generator().manual_seed(1234 + vocab)
    hidden = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, 16, generator=gen, dtype=torch.float64) * 0.7).to(dtype)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype) if bias_on else None
    labels = torch.randint(0, vocab, (3, 5), generator=gen)
    labels[0, :2] = -100
    g_lp, g_ent = torch.randn(3, 5, generator=gen).to(dtype), torch.randn(3, 5, generator=gen).to(dtype)
    start, end = shard_range(vocab, WORLD, rank)

    def run(w, b, group_):
        h = hidden.clone().requires_grad_(True)
        w = w.clone().requires_grad_(True)
        b = b.clone().requires_grad_(True) if b is not None else None
        with rlkern.use_backend(backend):
            lp, ent = rlkern.ops.linear_logprobs(
                h,
                w,
                labels,
                bias=b,
                temperature=0.8,
                return_entropy=True,
                chunk_size=chunk_size,
                process_group=group_,
            )
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        return lp, ent, h.grad, w.grad, (b.grad if b is not None else None)

    full = run(weight, bias, None)
    shard = run(weight[start:end], bias[start:end] if bias is not None else None, group)
    tol = _tol(dtype)
    for name, a, e in zip(("logp", "entropy", "d hidden"), shard[:3], full[:3]):
        torch.testing.assert_close(a, e, **tol, msg=lambda m, name=name: f"rank {rank} {backend} {name}: {m}")
    torch.testing.assert_close(shard[3], full[3][start:end], **tol)
    if bias is not None:
        torch.testing.assert_close(shard[4], full[4][start:end], **tol)


def _nan_case(rank, backend, dtype, group):
    """A NaN token and a NaN vocabulary row on rank 0's shard only: every rank returns the
    single-process NaN pattern (the NaN crosses the all-reduces) and NaN gradient rows."""
    import rlkern
    from rlkern.ops.vocab_parallel import shard_range

    gen = torch.Generator().manual_seed(7)
    vocab = 37
    hidden = torch.randn(4, 16, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(vocab, 16, generator=gen, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, vocab, (4,), generator=gen)
    hidden[2] = float("nan")
    start, end = shard_range(vocab, WORLD, rank)
    for w_nan in (False, True):
        w = weight.clone()
        if w_nan:
            w[3, 0] = float("nan")  # id 3 lives on rank 0's shard
        h = hidden.clone().requires_grad_(True)
        with rlkern.use_backend(backend):
            lp, ent = rlkern.ops.linear_logprobs(
                h, w[start:end], labels, return_entropy=True, process_group=group
            )
        (lp.nan_to_num(0.0).sum() + ent.nan_to_num(0.0).sum()).backward()
        expect = torch.ones(4, dtype=torch.bool) if w_nan else torch.tensor([False, False, True, False])
        assert torch.equal(lp.isnan(), expect) and torch.equal(ent.isnan(), expect), (rank, backend, lp, ent)
        assert torch.equal(h.grad.isnan().any(1), expect), (rank, backend, h.grad)


def _logits_case(rank, backend, dtype, vocab, group):
    import rlkern
    from rlkern.ops.vocab_parallel import shard_range, vocab_parallel_logprobs

    gen = torch.Generator().manual_seed(99 + vocab)
    logits = (torch.randn(4, 3, vocab, generator=gen, dtype=torch.float64) * 3).to(dtype)
    logits[1, 1, ::4] = float("-inf")  # banned tokens, some on each shard
    labels = torch.randint(0, vocab, (4, 3), generator=gen)
    labels[2, 0] = -100
    g_lp, g_ent = torch.randn(4, 3, generator=gen).to(dtype), torch.randn(4, 3, generator=gen).to(dtype)
    start, end = shard_range(vocab, WORLD, rank)

    x_full = logits.clone().requires_grad_(True)
    with rlkern.use_backend(backend):
        lp_full, ent_full = rlkern.ops.logprobs_and_entropy(x_full, labels, temperature=1.3)
    ((lp_full * g_lp).sum() + (ent_full * g_ent).sum()).backward()

    x = logits[..., start:end].clone().requires_grad_(True)
    with rlkern.use_backend(backend):
        lp, ent = vocab_parallel_logprobs(x, labels, group, temperature=1.3, want_entropy=True)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    tol = _tol(dtype)
    torch.testing.assert_close(lp, lp_full, **tol)
    torch.testing.assert_close(ent, ent_full, **tol)
    torch.testing.assert_close(x.grad, x_full.grad[..., start:end], **tol)

    # Entropy alone (no labels) and log-probs alone.
    with rlkern.use_backend(backend):
        none_lp, only_ent = vocab_parallel_logprobs(
            logits[..., start:end], None, group, temperature=1.3, want_entropy=True
        )
        only_lp, none_ent = vocab_parallel_logprobs(logits[..., start:end], labels, group, temperature=1.3)
    assert none_lp is None and none_ent is None
    torch.testing.assert_close(only_ent, ent_full.detach(), **tol)
    torch.testing.assert_close(only_lp, lp_full.detach(), **tol)

    # The public ops take the same route with process_group=.
    shard = logits[..., start:end]
    with rlkern.use_backend(backend):
        torch.testing.assert_close(
            rlkern.ops.logprobs(shard, labels, temperature=1.3, process_group=group), lp_full.detach(), **tol
        )
        torch.testing.assert_close(
            rlkern.ops.entropy(shard, temperature=1.3, process_group=group), ent_full.detach(), **tol
        )
        pair = rlkern.ops.logprobs_and_entropy(shard, labels, temperature=1.3, process_group=group)
    torch.testing.assert_close(pair[0], lp_full.detach(), **tol)
    torch.testing.assert_close(pair[1], ent_full.detach(), **tol)


def _row_temps(gen, lead, kind):
    """Per-row temperatures in [0.5, 1.5]: one per token, or one per sequence ([B, 1])."""
    shape = lead if kind == "token" else (*lead[:-1], 1)
    return torch.rand(shape, generator=gen) + 0.5


def _options_tol(dtype):
    """_tol, except float64 with a temperature tensor: the single-device torch backend of the LM head
    divides by float32(1 / float32(1 / T)) and the sharded one multiplies by float32(1 / T) (the
    kernels' convention), two fp32 roundings of the temperature apart: ~1e-7 relative in the logits."""
    return dict(atol=1e-6, rtol=1e-6) if dtype == torch.float64 else _tol(dtype)


def _check_oracle(name, got, oracle):
    """Against the float64 oracle, atol 5e-5 / rtol 1e-5 on every backend: the LM head multiplies the
    logits by float32(1 / T) for float64 inputs too (a relative change of ~6e-8, as the single-device
    op does), and fp32 adds the rounding of _tol. The tight check is the one against the
    single-device op."""
    torch.testing.assert_close(got.double(), oracle.double(), atol=5e-5, rtol=1e-5,
                               msg=lambda m: f"{name} vs fp64: {m}")


def _linear_options_case(rank, backend, dtype, vocab, temp_kind, group):
    """A per-row temperature tensor and return_sum_p2 on the vocabulary-parallel head: log-probs,
    entropy and sum p^2 equal the single-device op's (and the float64 oracle's); d hidden, d weight
    and d bias of the shard equal the single-device gradients (sum p^2 has none)."""
    import rlkern
    from rlkern import reference
    from rlkern.ops.vocab_parallel import shard_range

    gen = torch.Generator().manual_seed(4321 + vocab)
    hidden = torch.randn(3, 5, 16, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, 16, generator=gen, dtype=torch.float64) * 0.7).to(dtype)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64).to(dtype)
    bias[::5] = float("-inf")  # banned tokens on every shard
    labels = torch.randint(0, vocab, (3, 5), generator=gen)
    labels[0, :2] = -100
    temps = _row_temps(gen, (3, 5), temp_kind)
    g_lp, g_ent = torch.randn(3, 5, generator=gen).to(dtype), torch.randn(3, 5, generator=gen).to(dtype)
    start, end = shard_range(vocab, WORLD, rank)

    def run(w, b, group_):
        h = hidden.clone().requires_grad_(True)
        w = w.clone().requires_grad_(True)
        b = b.clone().requires_grad_(True)
        with rlkern.use_backend(backend):
            lp, ent, p2 = rlkern.ops.linear_logprobs(
                h, w, labels, bias=b, temperature=temps, return_entropy=True, return_sum_p2=True,
                process_group=group_,
            )
        assert not p2.requires_grad
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        return lp, ent, p2, h.grad, w.grad, b.grad

    full = run(weight, bias, None)
    shard = run(weight[start:end], bias[start:end], group)
    tol = _options_tol(dtype)
    for name, a, e in zip(("logp", "entropy", "sum p^2", "d hidden"), shard[:4], full[:4]):
        torch.testing.assert_close(a, e, **tol, msg=lambda m, name=name: f"rank {rank} {backend} {name}: {m}")
    torch.testing.assert_close(shard[4], full[4][start:end], **tol)
    torch.testing.assert_close(shard[5], full[5][start:end], **tol)
    oracle = reference.linear_logprobs_options(
        hidden.double(), weight.double(), labels, bias=bias.double(), temperature=temps.double().expand(3, 5),
        return_entropy=True, return_sum_p2=True,
    )
    for name, a, e in zip(("logp", "entropy", "sum p^2"), shard[:3], oracle):
        _check_oracle(f"rank {rank} {backend} {name}", a, e)
    # A NaN hidden row: its log-prob, entropy and sum p^2 are NaN on every rank, the others are not.
    bad = hidden.clone()
    bad[1, 3, 0] = float("nan")
    with rlkern.use_backend(backend):
        lp, p2 = rlkern.ops.linear_logprobs(bad, weight[start:end], labels, bias=bias[start:end],
                                            temperature=temps, return_sum_p2=True, process_group=group)
    nan_at = torch.zeros(3, 5, dtype=torch.bool)
    nan_at[1, 3] = True
    assert torch.equal(lp.isnan(), nan_at) and torch.equal(p2.isnan(), nan_at), (rank, backend, lp, p2)


def _logits_options_case(rank, backend, dtype, vocab, temp_kind, group):
    """rlkern.ops.logprobs_and_entropy / entropy / logprobs with process_group, a per-row temperature
    tensor and return_sum_p2 against the single-device ops and the float64 oracle, with banned
    tokens, a dead row (every logit -inf on every rank: log-prob -inf, entropy 0, sum p^2 0) and
    the gradient of the shard."""
    import rlkern
    from rlkern import reference
    from rlkern.ops.vocab_parallel import shard_range

    gen = torch.Generator().manual_seed(77 + vocab)
    logits = (torch.randn(4, 3, vocab, generator=gen, dtype=torch.float64) * 3).to(dtype)
    logits[1, 1, ::4] = float("-inf")
    logits[3, 2] = float("-inf")
    labels = torch.randint(0, vocab, (4, 3), generator=gen)
    labels[2, 0] = -100
    temps = _row_temps(gen, (4, 3), temp_kind)
    temps_full = temps.expand(4, 3).contiguous()  # the single-device ops take the rows' shape
    g_lp, g_ent = torch.randn(4, 3, generator=gen).to(dtype), torch.randn(4, 3, generator=gen).to(dtype)
    g_lp[3, 2] = g_ent[3, 2] = 0.0  # d(-inf) of the dead row: 0 * -inf would make the sums NaN
    start, end = shard_range(vocab, WORLD, rank)

    x_full = logits.clone().requires_grad_(True)
    with rlkern.use_backend(backend):
        lp_full, ent_full, p2_full = rlkern.ops.logprobs_and_entropy(
            x_full, labels, temperature=temps_full, return_sum_p2=True
        )
    ((lp_full * g_lp).sum() + (ent_full * g_ent).sum()).backward()
    x = logits[..., start:end].clone().requires_grad_(True)
    with rlkern.use_backend(backend):
        lp, ent, p2 = rlkern.ops.logprobs_and_entropy(
            x, labels, temperature=temps_full, return_sum_p2=True, process_group=group
        )
    assert not p2.requires_grad
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    tol = _options_tol(dtype)
    for name, a, e in (("logp", lp, lp_full), ("entropy", ent, ent_full), ("sum p^2", p2, p2_full),
                       ("d logits", x.grad, x_full.grad[..., start:end])):
        torch.testing.assert_close(a, e, **tol, msg=lambda m, name=name: f"rank {rank} {backend} {name}: {m}")
    assert lp[3, 2] == float("-inf") and ent[3, 2] == 0 and p2[3, 2] == 0
    t64 = temps_full.double()
    _check_oracle("logp", lp, reference.logprobs(logits.double(), labels, temperature=t64))
    _check_oracle("entropy", ent, reference.entropy(logits.double(), temperature=t64))
    _check_oracle("sum p^2", p2, reference.sum_p2(logits.double(), temperature=t64))
    # Each public op alone, and the broadcast [B, 1] temperature through vocab_parallel_logprobs.
    shard = logits[..., start:end]
    with rlkern.use_backend(backend):
        ent_only, p2_only = rlkern.ops.entropy(shard, temperature=temps_full, return_sum_p2=True,
                                               process_group=group)
        lp_only, p2_b = rlkern.ops.logprobs(shard, labels, temperature=temps_full, return_sum_p2=True,
                                            process_group=group)
        from rlkern.ops.vocab_parallel import vocab_parallel_logprobs

        none_lp, none_ent, p2_c = vocab_parallel_logprobs(shard, None, group, temperature=temps,
                                                          want_sum_p2=True)
    assert none_lp is None and none_ent is None
    for a, e in ((ent_only, ent), (lp_only, lp), (p2_only, p2), (p2_b, p2), (p2_c, p2)):
        torch.testing.assert_close(a, e.detach(), **tol)
    # A NaN logit in row (0, 1) on rank 0's shard only: that row's outputs are NaN on every rank.
    bad = logits.clone()
    bad[0, 1, 0] = float("nan")
    with rlkern.use_backend(backend):
        lp_n, ent_n, p2_n = rlkern.ops.logprobs_and_entropy(
            bad[..., start:end], labels, temperature=temps_full, return_sum_p2=True, process_group=group
        )
    nan_at = torch.zeros(4, 3, dtype=torch.bool)
    nan_at[0, 1] = True
    for out in (lp_n, ent_n, p2_n):
        assert torch.equal(out.isnan(), nan_at), (rank, backend, out)


def _worker(rank, init_method, backend):
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined in this fresh process
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        group = dist.group.WORLD
        dtypes = [torch.float64] if backend == "torch" else [torch.float32]
        for dtype in dtypes:
            for vocab, chunk, bias_on in [(37, 8, True), (40, None, False), (3, None, True)]:
                _linear_case(rank, backend, dtype, vocab, chunk, bias_on, group)
            for vocab in (37, 2):
                _logits_case(rank, backend, dtype, vocab, group)
            _nan_case(rank, backend, dtype, group)
            for vocab, temp_kind in [(37, "token"), (40, "sequence"), (3, "token")]:
                _linear_options_case(rank, backend, dtype, vocab, temp_kind, group)
            for vocab, temp_kind in [(37, "sequence"), (2, "token")]:
                _logits_options_case(rank, backend, dtype, vocab, temp_kind, group)
        dist.barrier()  # leave the group together
    finally:
        dist.destroy_process_group()
    # Every check passed: leave without running the interpreter's teardown, where the spawned
    # process once aborted in a C++ destructor ("terminate called without an active exception",
    # 1 run in ~15 on this machine with the Triton interpreter loaded) after all checks had passed.
    os._exit(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_matches_single_process(backend, tmp_path):
    mp.spawn(_worker, args=(_rendezvous(tmp_path), backend), nprocs=WORLD, join=True)


def _bad_layout_worker(rank, init_method):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        import rlkern

        # 10 ids split 4 + 6: rank 0 must hold ceil(10/2) = 5.
        weight = torch.randn(4 if rank == 0 else 6, 8)
        with pytest.raises(ValueError, match=r"ceil\(V/world\) = 5"):
            rlkern.ops.linear_logprobs(
                torch.randn(3, 8), weight, torch.zeros(3, dtype=torch.long), process_group=dist.group.WORLD
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_bad_shard_layout_is_a_clear_error(tmp_path):
    mp.spawn(_bad_layout_worker, args=(_rendezvous(tmp_path),), nprocs=WORLD, join=True)
