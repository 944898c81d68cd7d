"""Batches of token sequences, sampling with a KV cache, and per-token log-probs through rlkern.ops.

Layout used by every algorithm: prompts are left-padded to a common length ``P`` so that all
responses start at column ``P``; a sequence is ``[prompt (P) | response (R)]`` with an attention mask
over both and ``position_ids`` counted over the real tokens only, so a left-padded row gets the same
positions (and therefore the same outputs) as the same row without padding. The response mask is 1
on generated tokens up to and including the first eos, 0 after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlkern import ops

__all__ = ["Sequences", "encode_prompts", "join", "generate", "token_logprobs", "decode_responses"]


@dataclass
class Sequences:
    """``[B, P + R]`` token ids with masks; the response is the last ``R`` columns."""

    input_ids: Tensor       # [B, P + R] int64
    attention_mask: Tensor  # [B, P + R] int64, 0 on padding
    prompt_len: int         # P
    response_mask: Tensor   # [B, R] float32, 1 on response tokens (eos included)
    sampling_logp: Tensor | None = None  # [B, R] float32: the sampler's log-probs (generate's record)

    @property
    def position_ids(self) -> Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    @property
    def responses(self) -> Tensor:
        return self.input_ids[:, self.prompt_len:]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_tokens(self) -> float:
        """Real (non-padding) tokens in the batch: prompts and responses."""
        return float(self.attention_mask.sum())

    def index(self, idx: Tensor) -> Sequences:
        sampled = None if self.sampling_logp is None else self.sampling_logp[idx]
        return Sequences(self.input_ids[idx], self.attention_mask[idx], self.prompt_len,
                         self.response_mask[idx], sampled)

    def to(self, device) -> Sequences:
        return Sequences(self.input_ids.to(device), self.attention_mask.to(device), self.prompt_len,
                         self.response_mask.to(device),
                         None if self.sampling_logp is None else self.sampling_logp.to(device))


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[Tensor, Tensor]:
    """Left-padded ``(input_ids, attention_mask)`` for the prompts."""
    enc = tokenizer(prompts, padding=True, return_tensors="pt", padding_side="left")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def join(tokenizer, prompts: list[str], responses: list[str], device) -> Sequences:
    """Teacher-forced sequences ``prompt + response + eos`` (SFT demonstrations, preference pairs)."""
    ids, mask = encode_prompts(tokenizer, prompts, device)
    resp = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    width = max(len(r) for r in resp)
    r_ids = torch.full((len(resp), width), tokenizer.pad_token_id, dtype=torch.long)
    r_mask = torch.zeros(len(resp), width, dtype=torch.long)
    for i, r in enumerate(resp):
        r_ids[i, :len(r)] = torch.tensor(r)
        r_mask[i, :len(r)] = 1
    r_ids, r_mask = r_ids.to(device), r_mask.to(device)
    return Sequences(torch.cat([ids, r_ids], 1), torch.cat([mask, r_mask], 1), ids.shape[1], r_mask.float())


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
             temperature: float = 1.0, greedy: bool = False, record_logprobs: bool = False) -> Sequences:
    """Samples (or greedily decodes) up to ``max_new_tokens`` per prompt with a KV cache.

    Sampling draws from softmax(logits / temperature) with the global torch RNG (so a run is
    reproducible from its seed and resumable from its saved RNG state). Finished rows keep being fed
    pad tokens with attention mask 0 until every row has emitted eos or the budget is spent.
    With ``record_logprobs`` the sampler's log-prob of each drawn token, log_softmax(logits /
    temperature), lands in ``Sequences.sampling_logp`` (0 after a row's eos): what an inference engine
    (vLLM) reports, for the rollout-correction weights.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    B, P = prompt_ids.shape
    mask = prompt_mask.clone()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=pos, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1].float()
    next_pos = pos[:, -1:] + 1
    done = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    tokens, alive, sampled_logp = [], [], []
    for step in range(max_new_tokens):
        if greedy:
            tok = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            tok = torch.multinomial(probs, 1).squeeze(-1)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        was_alive = ~done
        tokens.append(tok)
        alive.append(was_alive)
        if record_logprobs:
            lp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tok[:, None]).squeeze(-1)
            sampled_logp.append(torch.where(was_alive, lp, 0.0))
        done = done | (tok == eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, was_alive.long()[:, None]], 1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=past,
                    use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
        next_pos = next_pos + 1
    resp = torch.stack(tokens, 1)
    resp_mask = torch.stack(alive, 1)
    return Sequences(torch.cat([prompt_ids, resp], 1), torch.cat([prompt_mask, resp_mask.long()], 1), P,
                     resp_mask.float(), torch.stack(sampled_logp, 1) if record_logprobs else None)


def token_logprobs(model, seqs: Sequences, *, temperature: float = 1.0, with_entropy: bool = False):
    """Log-probs ``[B, R]`` of the response tokens under ``model`` (and their entropies when asked),
    computed from the logits by the fused ``rlkern.ops`` kernels; positions past eos hold the value
    for the pad label and must be masked by the caller."""
    logits = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                   position_ids=seqs.position_ids, use_cache=False).logits
    # logits at column t predict token t + 1: the response tokens are predicted by columns P-1 .. end-1.
    # The slice is a strided view; the kernels read it in place.
    pred = logits[:, seqs.prompt_len - 1:-1]
    if with_entropy:
        return ops.logprobs_and_entropy(pred, seqs.responses, temperature=temperature)
    return ops.logprobs(pred, seqs.responses, temperature=temperature)


def decode_responses(tokenizer, seqs: Sequences) -> list[str]:
    """The response text of each row, stopping at eos."""
    out = []
    for ids, m in zip(seqs.responses.tolist(), seqs.response_mask.tolist()):
        kept = [t for t, keep in zip(ids, m) if keep and t != tokenizer.eos_token_id]
        out.append(tokenizer.decode(kept, skip_special_tokens=True))
    return out
