"""Prompt/completion tokenisation, the way TRL's SFTTrainer and DPOTrainer do it.

Mirrored rather than imported so that the fast path tokenises once, in one batched call, and
needs no `datasets`: the EOS token is appended to a completion that lacks it, the prompt and
prompt+completion are tokenised separately with the tokenizer's special tokens, the completion
starts where the two token lists first differ, and sequences are cut at `max_length` keeping
the start. `tests/training/test_data.py` checks these ids and masks against TRL's own
preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.training.packing import Sequence


@dataclass
class Pair:
    """A DPO preference pair as token ids: the shared prompt, the chosen and the rejected completion."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def sequences(self, max_length: int | None = None) -> tuple[Sequence, Sequence]:
        """(prompt+chosen, prompt+rejected) with the loss on the completion tokens only."""
        return _completion_sequence(self.prompt, self.chosen, max_length), \
            _completion_sequence(self.prompt, self.rejected, max_length)


def _completion_sequence(prompt: list[int], completion: list[int], max_length: int | None) -> Sequence:
    ids = prompt + completion
    mask = [0] * len(prompt) + [1] * len(completion)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return Sequence(ids, mask)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def tokenize_sft(tokenizer, prompts: list[str], completions: list[str], max_length: int | None = 1024) -> list[Sequence]:
    """Prompt-completion SFT examples -> sequences with the loss on completion tokens (TRL's completion_only_loss)."""
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions differ in number")
    eos = tokenizer.eos_token
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    full_ids = tokenizer([p + _with_eos(c, eos) for p, c in zip(prompts, completions)])["input_ids"]
    out = []
    for p_ids, ids in zip(prompt_ids, full_ids):
        n = common_prefix_length(p_ids, ids)
        seq = Sequence(list(ids), [0] * n + [1] * (len(ids) - n))
        if max_length is not None:
            seq = Sequence(seq.ids[:max_length], seq.loss_mask[:max_length])
        out.append(seq)
    return out


def tokenize_pairs(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str]) -> list[Pair]:
    """Preference pairs -> token ids split as TRL's DPOTrainer splits them (shared prompt prefix)."""
    if not (len(prompts) == len(chosen) == len(rejected)):
        raise ValueError("prompts, chosen and rejected differ in number")
    eos = tokenizer.eos_token
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    chosen_ids = tokenizer([p + _with_eos(c, eos) for p, c in zip(prompts, chosen)])["input_ids"]
    rejected_ids = tokenizer([p + _with_eos(r, eos) for p, r in zip(prompts, rejected)])["input_ids"]
    out = []
    for p_ids, c_ids, r_ids in zip(prompt_ids, chosen_ids, rejected_ids):
        n = min(common_prefix_length(p_ids, c_ids), common_prefix_length(p_ids, r_ids))
        out.append(Pair(list(p_ids[:n]), list(c_ids[n:]), list(r_ids[n:])))
    return out
