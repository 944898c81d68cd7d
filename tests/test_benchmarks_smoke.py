"""The benchmark machinery works: the memory probe measures a known allocation exactly, the timer
takes medians of >= 5 samples, the peers compute what they claim (so a speedup over them is a
speedup at equal maths), the RL-maths cases run with fp32, int64 and bool masks (every
implementation of a case receiving the same mask tensor), the overhead and first-call sections
produce their tables, and ``python -m benchmarks``'s report runs end to end on tiny shapes (tables,
JSON, markdown, PNG) in well under a minute. No timing is asserted: the machine may be loaded.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

import rlkern
from benchmarks import firstcall, harness, linear, logprobs, overhead, peers, policy_variants, report, rlmath
from rlkern import reference

TINY = {
    "logprobs": [logprobs.Shape(5, 37, torch.float32), logprobs.Shape(3, 70, torch.bfloat16)],
    "rlmath": [rlmath.Shape(4, 37, mask=m) for m in rlmath.MASKS],
    "linear": [linear.Shape(16, 8, 40, torch.float32)],
    "policy_variants": [policy_variants.Shape(4, 37)],
    "overhead": [overhead.Tiny(2, 5, 7)],
    "firstcall": ["kl_penalty"],
}
MASK_LABELS = ("fp32", "int64", "bool")
FAST = harness.TimingConfig(warmup=1, repeats=5, min_sample_ms=0.0)


def test_memory_probe_measures_a_known_allocation():
    measured = harness.validate_memory_probe(4 * harness.MIB)
    assert measured["measured_bytes"] == measured["known_bytes"] == 4 * harness.MIB + 4
    assert measured["allocation_free_bytes"] == 0
    # Transient buffers count at their peak, not their sum: two 1 MiB buffers alive one after the other.
    def sequential():
        for _ in range(2):
            torch.ones(harness.MIB // 4)
    assert harness.peak_extra_bytes(sequential) == harness.MIB


def test_timer_reports_the_median_of_at_least_five_samples():
    calls = []
    timing = harness.time_call(lambda: calls.append(1), FAST)
    assert len(timing.samples_ms) == 5 and timing.inner == 1
    assert timing.median_ms == sorted(timing.samples_ms)[2]
    assert len(calls) == 1 + 1 + 5  # first call, sizing call, five samples
    with pytest.raises(ValueError, match="repeats must be >= 5"):
        harness.TimingConfig(repeats=3)
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        harness.TimingConfig(warmup=-1)


def test_streaming_probe_moves_the_stated_bytes():
    probe = harness.streaming_probe(4000, 1000)
    assert probe() is not None  # the read of the 3000 bytes not copied
    assert harness.streaming_probe(64, 64)() is None  # all bytes copied, nothing left to read
    with pytest.raises(ValueError, match="must not exceed read_bytes"):
        harness.streaming_probe(10, 20)
    # the fallback for a machine where torch.sum does not reach a copy's rate: one copy, same traffic
    harness.set_floor_probe("copy")
    try:
        assert harness.streaming_probe(4000, 1000)() is None  # a copy of 2500 bytes, no sum
    finally:
        harness.set_floor_probe("sum")
    with pytest.raises(ValueError, match="floor probe must be one of"):
        harness.set_floor_probe("memcpy")


def test_targets_are_reported_not_asserted():
    case = harness.Case("f", "op", "s", "fwd", [], work=1.0, rows=4, targets=[
        harness.Target("t1", "a", "x_floor", 1.5), harness.Target("t2", "a", "speedup", 2.0, "b"),
        harness.Target("t3", "a", "mem_per_row", 16.0), harness.Target("t4", "missing", "x_floor", 1.0)])
    def row(impl, kind, ms, peak_mb=None):
        return harness.Row("f", case.label, "op", "s", "fwd", impl, kind, ms, [ms] * 5, 1, 0.0, None, "GB/s",
                           None, peak_mb, None if peak_mb is None else peak_mb * harness.MIB / 4)
    rows = [row("floor", "floor", 1.0), row("a", "rlkern", 2.0, 1e-5), row("b", "peer", 3.0)]
    met = {r.text: r.met for r in harness.evaluate_targets(case, rows)}
    assert met == {"t1": False, "t2": False, "t3": True, "t4": None}
    with pytest.raises(ValueError, match="target metric must be one of"):
        harness.Target("t", "a", "fastest", 1.0)
    with pytest.raises(ValueError, match="needs other implementation"):
        harness.Target("t", "a", "speedup", 1.0)


def test_run_cases_filters_implementations_but_keeps_the_floor():
    def case():
        yield harness.Case("f", "op", "s", "fwd", [
            harness.Impl("floor: probe", harness.streaming_probe(1024), "floor"),
            harness.Impl("rlkern (cpp)", lambda: torch.ones(4), "rlkern"),
            harness.Impl("peer loop", lambda: torch.ones(4))], work=1024.0, rows=4)
    rows, _, _ = harness.run_cases(case(), FAST, impl_patterns=["rlkern"], log=lambda *_: None)
    assert [r.impl for r in rows] == ["floor: probe", "rlkern (cpp)"]
    assert rows[1].extra_peak_mb * harness.MIB == 16 and rows[1].bytes_per_row == 4  # its 4-float output
    assert rows[1].pct_of_floor == pytest.approx(100 * rows[0].median_ms / rows[1].median_ms)


def test_gae_peers_agree_with_each_other():
    rewards, values = torch.randn(3, 50, dtype=torch.float64), torch.randn(3, 50, dtype=torch.float64)
    mask = torch.rand(3, 50) < 0.8
    ones = torch.ones(3, 50, dtype=torch.float64)
    trl = peers.trl_gae_loop(rewards, values, 0.99, 0.95)
    verl_all_valid = peers.verl_gae_loop(rewards, values, ones, 0.99, 0.95)
    for a, b in zip(trl, verl_all_valid):
        torch.testing.assert_close(a, b)
    verl = peers.verl_gae_loop(rewards, values, mask.double(), 0.99, 0.95)
    scan = peers.math_gae(rewards, values, mask, 0.99, 0.95)  # eager; the report compiles it
    for a, b in zip(verl, scan):
        torch.testing.assert_close(a, b)


def test_logprob_peers_agree_with_the_reference():
    logits, labels = torch.randn(6, 33) * 3, torch.randint(0, 33, (6,))
    want_lp = reference.logprobs(logits.double(), labels).float()
    want_h = reference.entropy(logits.double()).float()
    for got in (peers.naive_logprobs(logits, labels), peers.trl_selective_log_softmax(logits, labels),
                peers.math_logprobs(logits, labels)):
        torch.testing.assert_close(got, want_lp, atol=1e-5, rtol=1e-5)
    for got in (peers.naive_entropy(logits), peers.trl_entropy_from_logits(logits),
                peers.math_entropy(logits)):
        torch.testing.assert_close(got, want_h, atol=1e-5, rtol=1e-5)


def test_linear_peers_agree_with_each_other():
    hidden, weight = torch.randn(10, 8), torch.randn(40, 8)
    labels = torch.randint(0, 40, (10,))
    want = peers.naive_logprobs(hidden @ weight.t(), labels)
    torch.testing.assert_close(peers.naive_linear_logprobs(hidden, weight, labels), want)
    torch.testing.assert_close(peers.trl_chunked_logprobs(hidden, weight, labels), want, atol=1e-5, rtol=1e-5)


def test_loss_peers_match_the_formulas():
    b, t = 3, 11
    logp, old, ref = (-torch.rand(b, t, dtype=torch.float64) for _ in range(3))
    adv, mask = torch.randn(b, t, dtype=torch.float64), (torch.rand(b, t) < 0.7).double()
    mask[:, 0] = 1
    ratio = (logp - old).exp()
    per_tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    per_tok = torch.where(adv < 0, torch.minimum(per_tok, -adv * 3.0), per_tok)
    torch.testing.assert_close(peers.verl_policy_loss(old, logp, adv, mask)[0],
                               (per_tok * mask).sum() / (mask.sum() + 1e-8))
    adv_seq = torch.randn(b, dtype=torch.float64)
    r = (logp - old).exp()
    kl3 = (ref - logp).exp() - (ref - logp) - 1
    tok = -torch.minimum(r * adv_seq[:, None], r.clamp(0.8, 1.2) * adv_seq[:, None]) + 0.04 * kl3
    torch.testing.assert_close(peers.trl_grpo_loss(logp, old, ref, adv_seq, mask),
                               ((tok * mask).sum(-1) / mask.sum(-1)).mean())
    x = torch.randn(b, t, dtype=torch.float64)
    valid = x[mask.bool()]
    torch.testing.assert_close(peers.verl_masked_whiten(x, mask)[mask.bool()],
                               (valid - valid.mean()) / (valid.var() + 1e-8).sqrt())


def test_report_runs_end_to_end_on_tiny_shapes(tmp_path):
    out = report.run_report(list(report.EVERYTHING), cfg=FAST, out_dir=tmp_path, compile=False,
                            shapes_override=TINY, probe_bytes=harness.MIB, log=lambda *_: None)
    # logprobs; rlmath's per-mask summary, then its full table; linear; policy_variants; overhead; firstcall
    assert len(out["tables"]) == 7
    summary, family_tables = out["tables"][1], [out["tables"][i] for i in (0, 2, 3, 4)]
    for fam, table in zip(report.FAMILIES, family_tables):
        assert table.startswith(f"### {fam}")
        assert "| case | implementation | median ms |" in table
        assert "| % of floor | extra peak MB | x torch.compile |" in table
    assert summary.startswith("#### RL maths at B=4,T=37 fp32")
    for m in MASK_LABELS:
        assert f"| rlkern ms, mask={m} | x compile, mask={m} | x eager, mask={m} |" in summary
    assert out["tables"][5].startswith("### Per-call overhead") and "| rlkern / eager |" in out["tables"][5]
    assert out["tables"][6].startswith("### First call in a fresh process")
    assert "| sympy |" in out["tables"][6]
    assert set(out["sections"]) == set(report.SECTIONS)
    md = out["markdown"].read_text()
    assert all(table in md for table in out["tables"])
    failed = [(r.case, r.impl, r.error) for r in out["rows"] if r.error]
    assert not failed, failed
    rows = out["rows"]
    assert {r.family for r in rows} == set(report.FAMILIES)
    assert all(r.median_ms > 0 and len(r.samples_ms) == 5 for r in rows)
    # every case has exactly one floor row, and the floor's own % of floor is 100
    for case in {r.case for r in rows}:
        floors = [r for r in rows if r.case == case and r.kind == "floor"]
        assert len(floors) == 1 and floors[0].pct_of_floor == pytest.approx(100.0)
    if hasattr(rlkern.ops, "logprobs"):
        assert any(r.impl == logprobs.RLKERN for r in rows)
    # the rlkern logprobs forward allocates its outputs only: 4 B/row logp + 4 B/row lse
    fwd = [r for r in rows if r.family == "logprobs" and r.impl == logprobs.RLKERN and r.mode == "fwd"
           and r.op == "logprobs"]
    assert fwd and all(r.bytes_per_row <= 16 for r in fwd), [(r.case, r.bytes_per_row) for r in fwd]
    # with inplace_backward the [N, V] gradient is not allocated: less extra memory than without
    for case in {r.case for r in rows if r.family == "logprobs" and r.mode == "fwd+bwd"}:
        mb = {r.impl: r.extra_peak_mb for r in rows if r.case == case}
        assert mb[logprobs.RLKERN_INPLACE] < mb[logprobs.RLKERN], (case, mb)
    saved = json.loads(out["json"].read_text())
    assert len(saved["rows"]) == len(rows) and saved["meta"]["memory_probe"]["measured_bytes"] > 0
    assert set(saved["meta"]["sections"]) == set(report.SECTIONS)
    assert out["png"].exists() and out["png"].stat().st_size > 10_000


def test_cli_rejects_fewer_than_five_repeats(capsys):
    assert report.main(["--repeats", "2", "--no-plot"]) == 2
    assert "repeats must be >= 5" in capsys.readouterr().err


def test_pytest_benchmark_cases_cover_every_implementation(monkeypatch):
    from benchmarks import pytest_cases

    monkeypatch.setitem(rlmath.SHAPES, "quick", TINY["rlmath"])
    monkeypatch.setenv("RLKERN_BENCH_SHAPES", "quick")
    params = pytest_cases.params("rlmath")
    ids = [p.id for p in params]
    assert len(ids) == len(set(ids))
    for op in ("gae", "kl", "policy_loss", "value_loss", "grpo_loss"):
        assert any(i.startswith(op) and "| floor:" in i for i in ids), op

    class FakeBenchmark:  # the slice of pytest-benchmark's fixture that pytest_cases.run uses
        def __init__(self):
            self.extra_info, self.calls = {}, 0

        def __call__(self, fn):
            self.calls += 1
            return fn()

    bench = FakeBenchmark()
    shape_index, case_index, impl = params[0].values
    pytest_cases.run(bench, "rlmath", shape_index, case_index, impl)
    assert bench.calls == 1 and bench.group.startswith("gae") and bench.extra_info["unit"] == "GB/s"
    monkeypatch.setenv("RLKERN_BENCH_SHAPES", "huge")
    with pytest.raises(ValueError, match="RLKERN_BENCH_SHAPES must be one of"):
        pytest_cases.params("rlmath")


def _tensors_reached(fn, depth: int = 4) -> list[torch.Tensor]:
    """The tensors a benchmark call closes over: functools.partial arguments, closure cells, and the
    lists / tuples / functions inside them (the rlkern call is a partial of a closure)."""
    found, todo = [], [(fn, 0)]
    while todo:
        obj, d = todo.pop()
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif d < depth:
            if isinstance(obj, functools.partial):
                todo += [(a, d + 1) for a in (obj.func, *obj.args, *obj.keywords.values())]
            elif isinstance(obj, (list, tuple)):
                todo += [(a, d + 1) for a in obj]
            elif callable(obj) and getattr(obj, "__closure__", None):
                todo += [(c.cell_contents, d + 1) for c in obj.__closure__ if c.cell_contents is not None]
    return found


def test_rlmath_runs_every_op_with_each_mask_dtype_given_to_every_implementation(monkeypatch):
    masks = []
    make_inputs = rlmath._inputs

    def inputs(shape):
        x = make_inputs(shape)
        masks.append(x["mask"])
        return x

    monkeypatch.setattr(rlmath, "_inputs", inputs)
    seen = set()
    for shape, case in ((s, c) for s in TINY["rlmath"] for c in rlmath.cases([s], compile=True)):
        mask = masks[-1]
        assert mask.dtype == shape.mask and f"mask={rlmath.mask_label(shape.mask)}" in case.label
        seen.add((case.op, case.mode, rlmath.mask_label(mask.dtype)))
        kinds = {i.kind for i in case.impls}
        assert {"floor", "peer", "compile"} <= kinds, case.label
        if hasattr(rlkern.ops, case.op):
            assert "rlkern" in kinds, case.label
        for impl in case.impls:
            if impl.kind == "floor" or impl.name == rlmath.TRL_GAE or case.op == "kl":
                continue  # the floor moves bytes; TRL's GAE loop and k3 KL take no mask
            reached = _tensors_reached(impl.fn)
            assert any(t is mask for t in reached), (case.label, impl.name)
            others = [t for t in reached if t.shape == mask.shape and t.dtype in (torch.bool, torch.int64)
                      and t is not mask]
            assert not others, (case.label, impl.name, "a second mask tensor")
    expected = {(op, "fwd+bwd" if op.endswith("_loss") else "fwd", m)
                for op in rlmath.OPS for m in MASK_LABELS}
    assert seen == expected


def test_rlmath_peers_accept_every_mask_dtype_with_the_same_result():
    x, v = torch.randn(3, 20, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64)
    valid = torch.rand(3, 20) < 0.7
    valid[:, 0] = True
    want = peers.verl_gae_loop(x, v, valid.double(), 1.0, 0.95)
    for dtype in (torch.int64, torch.bool):
        for a, b in zip(peers.verl_gae_loop(x, v, valid.to(dtype), 1.0, 0.95), want):
            torch.testing.assert_close(a, b)
    returns = peers.verl_reinforce_returns_loop(x, valid.double(), 0.9)
    torch.testing.assert_close(returns, reference.discounted_returns(x, valid, gamma=0.9))
    torch.testing.assert_close(peers.math_discounted_returns(x, valid, 0.9), returns)
    logp, ref = -torch.rand(3, 20, dtype=torch.float64), -torch.rand(3, 20, dtype=torch.float64)
    scores = x[:, 0]
    for dtype in (torch.float64, torch.int64, torch.bool):
        torch.testing.assert_close(peers.verl_token_rewards(scores, logp, ref, valid.to(dtype), 0.05),
                                   reference.token_rewards(scores, logp, ref, valid, kl_coef=0.05))
        torch.testing.assert_close(peers.verl_masked_sum(x, valid.to(dtype)), reference.masked_sum(x, valid))


def test_overhead_section_reports_every_op_in_microseconds():
    rows = overhead.run_rows(TINY["overhead"], rounds=5, min_sample_ms=0.0, log=lambda *_: None)
    assert not [(r.op, r.mode, r.error) for r in rows if r.error]
    ops = {"kl", "token_rewards", "gae", "discounted_returns", "masked_sum", "masked_mean", "masked_var",
           "masked_whiten", "policy_loss", "value_loss", "grpo_loss", "logprobs", "entropy"}
    assert {r.op for r in rows} == ops
    assert {r.op for r in rows if r.mode == "fwd+bwd"} == ops - {"token_rewards", "gae", "discounted_returns"}
    for r in rows:
        assert r.rlkern_us > 0 and r.eager_us > 0 and r.reference_us > 0
        assert r.ratio == pytest.approx(r.rlkern_us / r.eager_us)
        assert r.met == (r.ratio <= overhead.TARGET_RATIO or r.diff_us <= overhead.TARGET_US)
    table = overhead.markdown_table(rows)
    assert ("| op | mode | rlkern us | eager torch us | eager torch = | rlkern / eager | "
            "rlkern - eager us |") in table
    assert table.count("\n| ") == 1 + len(rows)  # the header, then one line per row


def test_firstcall_section_measures_a_fresh_process():
    record = firstcall.measure("kl_penalty")
    assert not record.get("error"), record
    assert record["op"] == "kl" and record["first_call_s"] > 0 and record["first_backward_s"] > 0
    for point in ("after_import_torch", "after_import_rlkern", "after_first_call", "after_all"):
        assert set(record[point]) == set(firstcall.WATCHED)
    assert record["rss_torch_mb"] > 10  # the RSS probe sees torch's import
    table = firstcall.markdown_table([record, {"family": "dpo", "op": "dpo_loss", "error": "exit 1: boom"}])
    assert "| first call s | first backward s |" in table
    assert "| triton | sympy | torch._dynamo | target |" in table
    assert "| dpo | dpo_loss | failed: exit 1: boom" in table
    with pytest.raises(ValueError, match="unknown family"):
        firstcall._inputs("nope")
