"""The embedded task: two-number addition written as text (``"37+48="`` -> ``"085"``,
``"07+05="`` -> ``"012"``), generated on the fly.

One object provides everything the pipeline needs with no downloads: SFT demonstrations, preference
pairs (the correct answer against a plausible wrong one) for the reward model and DPO, an exact-match
reward for GRPO/RLOO, and a held-out prompt set that never appears in training. The character-level
tokenizer is built locally with the Hugging Face ``tokenizers`` library and wrapped as a
``PreTrainedTokenizerFast``, so a model trained on it saves and loads like any Hugging Face model.
"""

from __future__ import annotations

import torch
from torch import Tensor

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHARS = "0123456789+="

__all__ = ["ArithmeticTask", "build_char_tokenizer", "PAD", "BOS", "EOS"]


def build_char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over digits, ``+`` and ``=`` with pad/bos/eos.

    Every character is its own token (a ``Split`` pre-tokenizer on the pattern ``.`` isolates each
    character and a word-level model maps it to an id); ``<s>`` is prepended by the post-processor
    so every sequence starts from the same state, as a real LM tokenizer would do.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # ids back to text with no separator between characters
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   padding_side="left", clean_up_tokenization_spaces=False)


class ArithmeticTask:
    """``a+b=`` with ``a, b`` in ``[0, max_operand]`` (zero-padded to a fixed width); the answer is the
    decimal sum, zero-padded to the width of the largest sum.

    The ``(max_operand + 1)**2`` problems are split once, from ``split_seed``, into a held-out set of
    ``n_heldout`` problems and the training pool; every sampler below draws from the pool only.
    """

    def __init__(self, max_operand: int = 99, n_heldout: int = 500, split_seed: int = 1234):
        if max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {max_operand}")
        n = max_operand + 1
        if not 0 < n_heldout < n * n:
            raise ValueError(f"n_heldout must lie in [1, {n * n - 1}], got {n_heldout}")
        self.max_operand = max_operand
        # Operands are zero-padded to a fixed width so each digit sits at a fixed position: a tiny
        # model then learns column-wise addition in a few hundred steps instead of first having to
        # find the digits (measured here: ~70% held-out accuracy after 300 SFT steps vs ~10% unpadded).
        self.width = len(str(max_operand))
        # The answer is padded too, so each answer position is always the same place value (hundreds,
        # tens, units): unpadded, the first answer token is the hundreds digit for 95+17 and the tens
        # digit for 37+48, and the tiny model first has to learn the answer's length. Measured here on
        # 4 seeds: the unpadded answer left 2 of them below 5% after 400 SFT steps.
        self.answer_width = len(str(2 * max_operand))
        g = torch.Generator().manual_seed(split_seed)
        perm = torch.randperm(n * n, generator=g)
        pairs = torch.stack([perm // n, perm % n], dim=1)
        self.heldout = pairs[:n_heldout]
        self.train = pairs[n_heldout:]

    # ---- text ---------------------------------------------------------------------------------
    def prompt(self, a: int, b: int) -> str:
        return f"{a:0{self.width}d}+{b:0{self.width}d}="

    def answer(self, a: int, b: int) -> str:
        return self.format(a + b)

    def format(self, value: int) -> str:
        return f"{value:0{self.answer_width}d}"

    def sample_train(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` training problems ``[n, 2]`` drawn uniformly (with replacement) from the pool."""
        return self.train[torch.randint(len(self.train), (n,), generator=generator)]

    def prompts(self, problems: Tensor) -> list[str]:
        return [self.prompt(int(a), int(b)) for a, b in problems.tolist()]

    def answers(self, problems: Tensor) -> list[str]:
        return [self.answer(int(a), int(b)) for a, b in problems.tolist()]

    def wrong_answers(self, problems: Tensor, generator: torch.Generator) -> list[str]:
        """A plausible wrong answer per problem: the mistakes a half-trained model makes. Half are a
        tens digit off by one (``a + b +- 10``: a dropped or a spurious carry); the rest a units slip
        (+-1), one digit changed, or a digit dropped/duplicated.

        Why half, and both signs on every problem: the carry is the one decision RL has to learn here,
        so a reward model must judge the tens digit in both directions. With +-10 one kind in five (and
        the SFT policy's own mistakes nearly all dropped carries) a reward model preferred the right
        answer to ``a + b - 10`` on only 58% of held-out problems without a carry; with only the
        flipped carry as the mistake (-10 with a carry, +10 without) it learned a shortcut and
        preferred ``a + b - 10`` to the right answer on 85% of them."""
        out = []
        kinds = torch.randint(8, (len(problems),), generator=generator).clamp(max=4).tolist()
        rnd = torch.randint(10**6, (len(problems), 3), generator=generator).tolist()
        for (a, b), kind, (r0, r1, r2) in zip(problems.tolist(), kinds, rnd):
            s = a + b
            text = self.format(s)
            if kind == 4:  # kinds 4..7: the tens digit off by one
                wrong = self.format(max(s + (10 if r0 % 2 else -10), 0))
            elif kind == 1:
                wrong = self.format(max(s + (1 if r0 % 2 else -1), 0))
            elif kind == 2:
                i = r0 % len(text)
                wrong = text[:i] + str((int(text[i]) + 1 + r1 % 9) % 10) + text[i + 1:]
            elif kind == 3 and r1 % 2:
                i = r0 % len(text)
                wrong = text[:i] + text[i + 1:]
            else:
                i = r0 % len(text)
                wrong = text[:i] + text[i] + text[i:]
            if wrong == text:
                wrong = self.format(s + 1 + r2 % 9)  # never equal to the truth
            out.append(wrong)
        return out

    def demonstrations(self, problems: Tensor, generator: torch.Generator, carry_rate: float) -> list[str]:
        """The SFT demonstrator's answers: an imperfect teacher that writes the units carry into the
        tens only with probability ``carry_rate`` (otherwise it answers ``a + b - 10``, the dropped
        carry); problems without a units carry are always answered right.

        Why a flawed teacher: imitation then converges to the teacher's own accuracy instead of
        stopping part-way up the steep climb of learning addition, whose position moves with the
        seed and the machine's arithmetic (measured: 7-55% after the same 400 steps). With
        ``carry_rate < 0.5`` the imitating policy's greedy answer to a carry problem is the dropped
        carry, while sampling still finds the right one ``carry_rate`` of the time: the headroom that
        reinforcement learning from the exact-match checker (or a reward model) then closes.
        """
        answers = self.answers(problems)
        carry = (problems % 10).sum(-1) >= 10
        forget = torch.rand(len(problems), generator=generator) >= carry_rate
        for i in torch.nonzero(carry & forget).flatten().tolist():
            answers[i] = self.format(int(problems[i].sum()) - 10)
        return answers

    def carry_fraction(self, problems: Tensor) -> float:
        """Fraction of ``problems`` with a units carry (those the SFT teacher usually gets wrong)."""
        return float(((problems % 10).sum(-1) >= 10).float().mean())

    # ---- reward -------------------------------------------------------------------------------
    def reward(self, problems: Tensor, completions: list[str]) -> Tensor:
        """Exact match: 1.0 when the completion (up to eos) is the sum, else 0.0; float32 ``[n]``."""
        out = torch.zeros(len(completions))
        for i, ((a, b), text) in enumerate(zip(problems.tolist(), completions)):
            out[i] = float(text.strip() == self.answer(a, b))
        return out
