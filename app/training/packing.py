"""Packing: several tokenised sequences in one row, none attending to another.

A padded batch of GSM8K examples wastes a third of its tokens on padding (lengths run from
~80 to ~600 tokens). Packing lays the sequences end to end in one row of shape (1, T), restarts
the position ids at 0 for each sequence, and hands the attention the boundaries (`cu_seqlens`,
as flash-attention's varlen kernels take them), so every token computed is a real one.

Targets are shifted *inside* each sequence before packing: position i of a sequence predicts
token i+1 of the same sequence, and the last position of each sequence predicts nothing, so no
loss term ever crosses from one sequence into the next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Sequence:
    """One tokenised training sequence: `ids`, and `loss_mask[i]` = 1 where token i is trained on."""

    ids: list[int]
    loss_mask: list[int]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.loss_mask):
            raise ValueError(f"ids ({len(self.ids)}) and loss_mask ({len(self.loss_mask)}) differ in length")


@dataclass
class Packed:
    input_ids: torch.Tensor  # (1, T) long
    position_ids: torch.Tensor  # (1, T) long, restarting at 0 per sequence
    targets: torch.Tensor  # (T,) long: the next token of the same sequence, or IGNORE
    seq_index: torch.Tensor  # (T,) long: which sequence each position belongs to
    target_index: torch.Tensor  # (M,) long: the positions whose target is not IGNORE (found on the host: no sync)
    cu_seqlens: torch.Tensor  # (n+1,) int32: sequence boundaries
    max_seqlen: int
    num_sequences: int
    num_tokens: int


def pack(sequences: list[Sequence]) -> Packed:
    """Lay `sequences` end to end in one row, built on the host."""
    if not sequences:
        raise ValueError("pack() needs at least one sequence")
    ids, positions, targets, seq_index, cu = [], [], [], [], [0]
    for n, seq in enumerate(sequences):
        length = len(seq.ids)
        ids.extend(seq.ids)
        positions.extend(range(length))
        shifted = [tok if keep else IGNORE for tok, keep in zip(seq.ids[1:], seq.loss_mask[1:])]
        targets.extend(shifted + [IGNORE])
        seq_index.extend([n] * length)
        cu.append(cu[-1] + length)
    tensors = [torch.tensor(ids, dtype=torch.long).unsqueeze(0), torch.tensor(positions, dtype=torch.long).unsqueeze(0),
               torch.tensor(targets, dtype=torch.long), torch.tensor(seq_index, dtype=torch.long),
               torch.tensor([i for i, t in enumerate(targets) if t != IGNORE], dtype=torch.long),
               torch.tensor(cu, dtype=torch.int32)]
    return Packed(*tensors, max_seqlen=max(len(s.ids) for s in sequences), num_sequences=len(sequences),
                  num_tokens=cu[-1])


def pad(sequences: list[Sequence], pad_id: int) -> dict[str, torch.Tensor]:
    """The unoptimised layout, as TRL's collator builds it: right padding, labels -100 off the loss mask.

    The reference the packed path is checked against (tests and the bench's loss check).
    """
    width = max(len(s.ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq.ids)
        input_ids[row, :n] = torch.tensor(seq.ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor([tok if keep else IGNORE for tok, keep in zip(seq.ids, seq.loss_mask)])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _padded_size(real: int, multiple: int) -> int:
    """The padded row length: the next multiple of `multiple` that leaves room for a filler of >= 1 token."""
    return -(-(real + 1) // multiple) * multiple


def _seqlen_bound(longest: int, filler: int, multiple: int, max_length: int | None) -> int:
    """A padded row's `max_seqlen`: a bound that is the same for every row of one padded length."""
    return max(max_length, multiple) if max_length else -(-max(longest, filler) // multiple) * multiple


def pack_padded(sequences: list[Sequence], multiple: int, max_length: int | None) -> dict:
    """One packed row padded to a multiple of `multiple` tokens, in a layout that only the shape varies in.

    For CUDA graphs (`graphs.py`), which replay fixed shapes: a filler sequence (at least one
    token, its own attention segment) fills the row, every position gets a log-prob (positions
    without a target compute one for token 0 and add it to the filler's sum, which nothing reads:
    ~2% more FLOPs at GSM8K lengths, but no second varying size), and `packed_max_seqlen` is a
    bound (`max_length`) instead of the row's own maximum. `pack_pairs` is the same with each
    DPO prompt once.
    """
    real = sum(len(s.ids) for s in sequences)
    size = _padded_size(real, multiple)
    filler = size - real
    p = pack(sequences + [Sequence([0] * filler, [0] * filler)])
    has_target = p.targets != IGNORE
    return {"input_ids": p.input_ids, "position_ids": p.position_ids, "packed_cu_seqlens": p.cu_seqlens,
            "packed_max_seqlen": _seqlen_bound(p.max_seqlen, filler, multiple, max_length),
            "target_index": torch.arange(size), "target_ids": torch.where(has_target, p.targets, 0),
            "target_owner": torch.where(has_target, p.seq_index, len(sequences)),
            "num_real_tokens": real, "num_sequences": len(sequences) + 1, "static_shape": True}


def pack_pairs(pairs: list[tuple[Sequence, Sequence]], multiple: int | None = None,
               max_length: int | None = None) -> dict[str, torch.Tensor | int] | None:
    """DPO pairs in one row with each prompt computed once: ~22% fewer tokens at GSM8K lengths.

    Each pair is (prompt+chosen, prompt+rejected) as `Pair.sequences` makes them (both start with
    the same prompt tokens, loss mask 0 there). The row holds every prompt+chosen, then every
    rejected completion alone, positions continuing after its prompt:

        [P1 C1 | P2 C2 | ... | R1 | R2 | ... | filler]

    Attention gathers each segment's keys (`kv_index`, `cu_seqlens_k`): a prompt+chosen segment
    sees itself, a rejected segment sees its pair's prompt then itself (causal aligned at the
    bottom right), so every token gets exactly the hidden states it gets in its own sequence.
    The rejected completion's first token is predicted from the prompt's last position, which
    also predicts the chosen completion's first token: `target_index` names that position twice.

    Targets are listed per log-prob: `target_index` (which row position), `target_ids` (which
    token), `target_owner` (sequence 2i for pair i's chosen, 2i+1 for its rejected; anything
    else adds into the filler's slot 2P, which nothing reads).

    With `multiple` (for CUDA graphs, which replay fixed shapes) every shape is a function of the
    padded row length T and the number of pairs alone (with `max_length`; without it the bounds
    below vary too): a filler segment (>= 1 token) pads the row to a multiple of
    `multiple`, every position gets a log-prob plus one extra slot per pair, the keys are padded
    to T + T // 2 (the filler's segment takes the spare ones), and the maxima are bounds
    (`max_length`). Returns None when this layout does not apply (a rejected sequence with no
    token past the prompt, or with `multiple`, prompts longer than half the row): use `pack`.
    """
    num_pairs = len(pairs)
    ids, positions, kv_index, cu, cu_k = [], [], [], [0], [0]
    entries = []  # (row position, target token, owner)
    starts, shared = [], []
    for n, (chosen, rejected) in enumerate(pairs):
        s = 0
        while s < min(len(chosen.ids), len(rejected.ids)) and not chosen.loss_mask[s] and not rejected.loss_mask[s] \
                and chosen.ids[s] == rejected.ids[s]:
            s += 1
        if s == len(rejected.ids):
            return None
        start = len(ids)
        starts.append(start)
        shared.append(s)
        ids.extend(chosen.ids)
        positions.extend(range(len(chosen.ids)))
        kv_index.extend(range(start, start + len(chosen.ids)))
        entries.extend((start + j, chosen.ids[j + 1], 2 * n) for j in range(len(chosen.ids) - 1)
                       if chosen.loss_mask[j + 1])
        cu.append(len(ids))
        cu_k.append(len(kv_index))
    for n, (_, rejected) in enumerate(pairs):
        start, s = len(ids), shared[n]
        ids.extend(rejected.ids[s:])
        positions.extend(range(s, len(rejected.ids)))
        kv_index.extend(range(starts[n], starts[n] + s))
        kv_index.extend(range(start, len(ids)))
        # Token t of the rejected sequence is predicted at its position t - 1: in the prompt (t = s), or here.
        entries.extend((starts[n] + t - 1 if t - 1 < s else start + t - 1 - s, rejected.ids[t], 2 * n + 1)
                       for t in range(1, len(rejected.ids)) if rejected.loss_mask[t])
        cu.append(len(ids))
        cu_k.append(len(kv_index))
    real = len(ids)
    longest = max(max(len(c.ids), len(r.ids)) for c, r in pairs)
    if multiple is None:
        return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
                "packed_cu_seqlens": torch.tensor(cu, dtype=torch.int32),
                "packed_cu_seqlens_k": torch.tensor(cu_k, dtype=torch.int32),
                "packed_kv_index": torch.tensor(kv_index), "packed_max_seqlen": longest,
                "packed_max_seqlen_k": max(b - a for a, b in zip(cu_k, cu_k[1:])),
                "target_index": torch.tensor([e[0] for e in entries]), "target_ids": torch.tensor([e[1] for e in entries]),
                "target_owner": torch.tensor([e[2] for e in entries]), "num_real_tokens": real,
                "num_sequences": 2 * num_pairs}
    size = _padded_size(real, multiple)
    keys = size + size // 2
    filler = size - real
    spare_keys = keys - len(kv_index)
    if spare_keys < filler:  # the prompts are more than half the row
        return None
    ids.extend([0] * filler)
    positions.extend(range(filler))
    # The filler's queries see its own tokens, preceded by spare keys (its first token, again and again).
    kv_index.extend([real] * (spare_keys - filler) + list(range(real, size)))
    cu.append(size)
    cu_k.append(keys)
    index, targets, owner = list(range(size)) + [real] * num_pairs, [0] * (size + num_pairs), \
        [2 * num_pairs] * (size + num_pairs)
    extra = size
    for position, token, who in entries:
        slot = position
        if owner[slot] != 2 * num_pairs:  # the prompt's last position, already predicting the chosen completion
            slot, extra = extra, extra + 1
            index[slot] = position
        targets[slot], owner[slot] = token, who
    bound = _seqlen_bound(longest, filler, multiple, max_length)
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
            "packed_cu_seqlens": torch.tensor(cu, dtype=torch.int32),
            "packed_cu_seqlens_k": torch.tensor(cu_k, dtype=torch.int32), "packed_kv_index": torch.tensor(kv_index),
            "packed_max_seqlen": bound, "packed_max_seqlen_k": max(bound, keys),
            "target_index": torch.tensor(index), "target_ids": torch.tensor(targets), "target_owner": torch.tensor(owner),
            "num_real_tokens": real, "num_sequences": 2 * num_pairs + 1}


def flatten_batch(batch: dict, keep: tuple[str, ...] = ()) -> dict:
    """The batch's integer tensors (but `keep`) as one tensor: `unpack_batch` gives them back as views.

    Each tensor a loader worker hands to the training process costs that process a socket
    handshake with the worker (to receive the tensor's shared-memory file descriptor), and the
    worker answers only when its GIL is free from packing the next batch: a few ms per tensor,
    measured on the H100's host, in steps the host bounds. One tensor is one handshake.
    """
    keys = [k for k, v in batch.items() if torch.is_tensor(v) and k not in keep
            and v.dtype in (torch.int64, torch.int32)]
    batch["flat_layout"] = tuple((k, tuple(batch[k].shape), batch[k].dtype == torch.int32) for k in keys)
    batch["flat"] = torch.cat([batch.pop(k).reshape(-1).long() for k in keys])
    return batch


def unpack_batch(inputs: dict) -> dict:
    """A batch from `flatten_batch` with its tensors back under their names (views of the
    one tensor, but the int32 boundaries, which are a small copy)."""
    if "flat" not in inputs:
        return inputs
    out = {k: v for k, v in inputs.items() if k not in ("flat", "flat_layout")}
    layout = inputs["flat_layout"]
    for (key, shape, int32), part in zip(layout, inputs["flat"].split([math.prod(s) for _, s, _ in layout])):
        part = part.view(shape)
        out[key] = part.int() if int32 else part
    return out
