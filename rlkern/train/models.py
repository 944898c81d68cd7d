"""The models of the RLHF recipe: the tiny built-in causal LM, loading any local Hugging Face causal
LM, and the scalar heads (value head for the critic, reward head for the reward model).

A head is a small ``nn.Module`` on the backbone's last hidden state (after the final norm). A model
with a head is saved as the causal LM itself (``save_pretrained``, safetensors, so
``AutoModelForCausalLM.from_pretrained`` loads it) plus ``<kind>_head.safetensors`` beside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["TinyModelSpec", "attn_implementation", "build_tiny_model", "load_causal_lm", "ScalarHead",
           "HeadModel", "save_causal_lm", "ModelError"]


class ModelError(ValueError):
    """A model or tokenizer directory that cannot serve as a causal LM here; the message says why."""


@dataclass
class TinyModelSpec:
    """Shape of the built-in model: a Llama-style decoder small enough to train in minutes on a CPU."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 32


def attn_implementation(device, dtype: torch.dtype = torch.float32) -> str:
    """``"flash_attention_2"`` when the ``flash_attn`` package is importable, the model runs on CUDA and
    its weights are fp16/bf16, else ``"sdpa"`` (PyTorch's fused attention, on every device and dtype):
    the fast path with a guaranteed fallback. flash-attn has no fp32 kernel, and transformers hands an
    fp32 model's fp32 queries to it when no autocast is active (``get_target_dtype``), so the trainer's
    fp32 models stay on sdpa."""
    import importlib.util

    if (torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and importlib.util.find_spec("flash_attn") is not None):
        return "flash_attention_2"
    return "sdpa"


def build_tiny_model(tokenizer, spec: TinyModelSpec, seed: int, device="cpu"):
    """A freshly initialised ``LlamaForCausalLM`` sized by ``spec`` over ``tokenizer``'s vocabulary.

    Initialised under its own generator (forked from ``seed``) so that building it consumes nothing
    from the global RNG stream the training loop draws from.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads, max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, rope_theta=10000.0,
        attn_implementation=attn_implementation(device, torch.float32))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def load_causal_lm(path: str, device: torch.device, flag: str = "--model"):
    """``(model, tokenizer)`` from a local Hugging Face directory, in float32, with clear errors (naming
    ``flag``, the option that gave ``path``) for a directory that is not a causal LM, damaged weights or
    tokenizer files, or a tokenizer without the pad/eos tokens generation needs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per stage would bury the training bar
    if not os.path.isdir(path):
        raise ModelError(f"{flag} {path!r} is not a directory (expected a Hugging Face model directory)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"{flag} {path!r} has no readable config.json: {_first_line(err)}") from None
    # Any exception of the loaders is a bad directory here: truncated safetensors raise the library's
    # own SafetensorError, a garbage tokenizer.json a tokenizers Exception, neither an OSError.
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attn_implementation(device, torch.float32))
    except (ValueError, KeyError) as err:
        raise ModelError(f"{flag} {path!r} ({type(config).__name__}) is not a causal LM: "
                         f"{_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{flag} {path!r}: the weights cannot be loaded ({type(err).__name__}: "
                         f"{_first_line(err)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{flag} {path!r} has no loadable tokenizer: {_first_line(err)}") from None
    check_tokenizer(tokenizer, path)
    tokenizer.padding_side = "left"  # prompts are left-padded so every response starts at one column
    return model.to(device), tokenizer


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_tokenizer(tokenizer, where: str) -> None:
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {where!r} has no eos token: generation could never stop")
    if tokenizer.pad_token_id is None:
        raise ModelError(f"the tokenizer of {where!r} has no pad token: batches of prompts cannot be padded "
                         "(set tokenizer.pad_token and save it again)")


def save_causal_lm(model, tokenizer, path: str) -> None:
    """``save_pretrained`` in safetensors (weights, config, generation config) plus the tokenizer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per checkpoint would bury the training bar
    if os.path.isfile(path):  # save_pretrained only logs this and returns, leaving no model behind
        raise ModelError(f"cannot save the model to {path!r}: it is a file")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


class ScalarHead(nn.Module):
    """One scalar per token from the last hidden state: ``w . h + b``.

    Initialised small (std 1/sqrt(hidden+1), zero bias) so that a fresh critic predicts values near 0
    and a fresh reward model starts with no preference, as in TRL's value head.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden.float()).squeeze(-1)


class HeadModel(nn.Module):
    """A causal LM backbone with a :class:`ScalarHead`: the critic (``kind="value"``) or the reward
    model (``kind="reward"``). ``forward`` returns ``[B, T]`` scalars, one per position."""

    def __init__(self, lm, kind: str):
        super().__init__()
        if kind not in ("value", "reward"):
            raise ValueError(f"kind must be 'value' or 'reward', got {kind!r}")
        self.kind = kind
        self.lm = lm
        self.head = ScalarHead(lm.config.hidden_size)

    def hidden(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """The backbone's last hidden state ``[B, T, H]`` (base_model is the decoder without the LM head:
        its last_hidden_state is after the final norm)."""
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                 position_ids=position_ids,
                                 use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        return self.head(self.hidden(input_ids, attention_mask, position_ids))

    def head_file(self, path: str) -> str:
        return os.path.join(path, f"{self.kind}_head.safetensors")

    def save(self, tokenizer, path: str) -> None:
        from safetensors.torch import save_file

        save_causal_lm(self.lm, tokenizer, path)
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()},
                  self.head_file(path))

    def load_head(self, path: str) -> None:
        from safetensors.torch import load_file

        file = self.head_file(path)
        if not os.path.isfile(file):
            raise ModelError(f"{path!r} has no {os.path.basename(file)}: not a saved {self.kind} model")
        self.head.load_state_dict(load_file(file, device=str(next(self.head.parameters()).device)))
