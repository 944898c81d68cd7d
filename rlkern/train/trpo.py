"""TRPO: a natural-gradient step in a trust region (Schulman et al. 2015), critic trained separately.

With the surrogate L(theta) = mean_t r_t A_t (r_t = pi_theta / pi_old on the sampled tokens) and its
gradient g at theta_old, the step solves F x = g by conjugate gradient, where F v is the Hessian-vector
product of the mean KL(pi_old || pi_theta) at theta_old (double backward), scales x to the trust
region, s = sqrt(2 delta / x^T F x) x, and backtracks s <- coef * s until the surrogate improves and
the mean KL stays <= delta (else keeps theta_old).

The KL is the sampled k3 estimator under pi_old, ``ops.kl(old_logp, logp, "k3")`` = r - 1 - log r. Its
Hessian at theta_old is sum_t grad log pi(a_t) grad log pi(a_t)^T / N (the r terms' second
derivative cancels the log term's, leaving the outer product), so F is positive semi-definite for
every batch and CG is well posed. The fused log-prob kernels (and the fused attention) have a
first-order backward only, so the Fisher products run the log-probs and KL on rlkern's torch
backend and attention on PyTorch's math kernel (both twice differentiable); the surrogate gradient
and the line search use the configured kernels.
"""

from __future__ import annotations

import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import rlkern
from rlkern import ops
from rlkern.train.common import Stage, ops_backend
from rlkern.train.onpolicy import OnPolicy, Rollout, critic_values
from rlkern.train.rollout import token_logprobs

__all__ = ["train_trpo", "conjugate_gradient"]


def conjugate_gradient(fvp, b: torch.Tensor, iters: int, tol: float = 1e-10) -> torch.Tensor:
    """Approximately solves ``F x = b`` for a symmetric positive (semi-)definite ``F`` given as ``fvp``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r.dot(r)
    for _ in range(iters):
        if rr <= tol:
            break
        fp = fvp(p)
        alpha = rr / p.dot(fp).clamp(min=1e-30)
        x += alpha * p
        r -= alpha * fp
        rr_new = r.dot(r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def train_trpo(cfg, out: str | None = None) -> dict:
    """Runs TRPO; returns ``{"dir", "model"}``."""
    stage = Stage(cfg, "trpo", out)
    run = stage.run
    op = OnPolicy(stage, with_critic=True)  # bad model directories fail before the run directory is touched
    start = stage.begin()
    critic = op.critic
    per_rank = run.shard(cfg.rollout_batch, "--rollout-batch")
    val_opt = stage.optimizer(critic.parameters(), cfg.critic_lr)
    if start:
        ckpt, state = run.load_checkpoint()
        op.restore(ckpt)
        val_opt.load_state_dict(state["critic_optimizer"])

    def checkpoint(step):
        run.save_checkpoint(step, op.savers(), {"critic_optimizer": val_opt.state_dict()})

    with ops_backend(cfg.ops):
        for step in stage.steps(start, op.evaluate):
            t0 = time.perf_counter()
            ro, metrics = op.rollout(stage.problems(per_rank))
            op.advantages(ro, cfg.kl_coef)
            with op.timer("update"):
                metrics.update(_policy_step(stage, op, ro))
                metrics.update(_critic_steps(stage, op, ro, val_opt))
            op.maybe_sync_ref(step)
            stage.end_step(step, metrics, t0=t0, tokens=ro.seqs.n_tokens, evaluate=op.evaluate,
                           save=checkpoint)
    return stage.finish(op.save_final)


def _surrogate(policy, ro: Rollout, temperature: float):
    """(mean r A over response tokens, mean KL(pi_old || pi) as k3, new log-probs)."""
    logp = token_logprobs(policy, ro.seqs, temperature=temperature)
    ratio = torch.exp(torch.clamp(logp - ro.logp, -20.0, 20.0))
    surr = ops.masked_mean(ratio * ro.advantages, ro.mask)
    kl = ops.masked_mean(ops.kl(ro.logp, logp, "k3"), ro.mask)
    return surr, kl


def _policy_step(stage: Stage, op: OnPolicy, ro: Rollout) -> dict[str, float]:
    cfg, run = stage.cfg, stage.run
    params = [p for p in op.policy.parameters() if p.requires_grad]
    surr, _ = _surrogate(op.policy, ro, cfg.temperature)
    g = parameters_to_vector(torch.autograd.grad(surr, params))
    g = run.all_mean(g)

    # The KL's gradient graph is built once and differentiated again for every Fisher product; the
    # math attention kernel is the one whose backward is itself differentiable.
    with rlkern.use_backend("torch"), sdpa_kernel(SDPBackend.MATH):
        logp = token_logprobs(op.policy, ro.seqs, temperature=cfg.temperature)
        kl = ops.masked_mean(ops.kl(ro.logp, logp, "k3"), ro.mask)
        kl_grad = parameters_to_vector(torch.autograd.grad(kl, params, create_graph=True))

    def fvp(v: torch.Tensor) -> torch.Tensor:
        hv = parameters_to_vector(torch.autograd.grad(kl_grad.dot(v), params, retain_graph=True))
        return run.all_mean(hv) + cfg.damping * v

    x = conjugate_gradient(fvp, g, cfg.cg_iters)
    shs = x.dot(fvp(x)).clamp(min=1e-12)
    step = torch.sqrt(2 * cfg.max_kl / shs) * x
    expected = float(g.dot(step))
    old = parameters_to_vector(params).detach().clone()
    surr_old = float(run.all_mean(surr.detach()))
    accepted, frac, kl_new, improve = 0.0, 1.0, 0.0, 0.0
    with torch.no_grad():
        for _ in range(cfg.backtrack_iters):
            vector_to_parameters(old + frac * step, params)
            s_new, k_new = _surrogate(op.policy, ro, cfg.temperature)
            s_new, k_new = float(run.all_mean(s_new)), float(run.all_mean(k_new))
            if s_new - surr_old > 0 and k_new <= cfg.max_kl:
                accepted, kl_new, improve = 1.0, k_new, s_new - surr_old
                break
            frac *= cfg.backtrack_coef
        else:
            vector_to_parameters(old, params)
    return {"policy/surrogate": surr_old, "policy/expected_improve": expected, "policy/improve": improve,
            "policy/approx_kl": kl_new, "policy/step_frac": frac if accepted else 0.0,
            "policy/accepted": accepted,
            "policy/grad_norm": float(g.norm())}


def _critic_steps(stage: Stage, op: OnPolicy, ro: Rollout, opt) -> dict[str, float]:
    cfg = stage.cfg
    total, clipfrac = 0.0, 0.0
    for _ in range(cfg.critic_iters):
        values = critic_values(op.critic, ro.seqs)
        loss, stats = ops.value_loss(values, ro.values, ro.returns, ro.mask, clip=cfg.value_clip)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        stage.step_optimizer(opt, op.critic.parameters())
        total += loss.item()
        clipfrac += float(stats["clip_frac"])
    return {"value/loss": total / cfg.critic_iters, "value/clipfrac": clipfrac / cfg.critic_iters}
