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

    @property
    def num_targets(self) -> int:
        """Tokens that carry a loss term (the first token is never predicted)."""
        return int(sum(self.loss_mask[1:]))


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

    def to(self, device, non_blocking: bool = True) -> "Packed":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Packed(move(self.input_ids), move(self.position_ids), move(self.targets), move(self.seq_index),
                      move(self.target_index), move(self.cu_seqlens), self.max_seqlen, self.num_sequences,
                      self.num_tokens)


def pack(sequences: list[Sequence], pin_memory: bool = False) -> Packed:
    """Lay `sequences` end to end in one row. Built on the host; move with `.to(device)`."""
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
    if pin_memory:
        tensors = [t.pin_memory() for t in tensors]
    return Packed(*tensors, max_seqlen=max(len(s.ids) for s in sequences), num_sequences=len(sequences),
                  num_tokens=cu[-1])


def split_by_tokens(sequences: list[Sequence], max_tokens: int) -> list[list[Sequence]]:
    """Split one optimizer step's sequences into micro-batches of at most `max_tokens` tokens each.

    Order is kept (a sequence longer than `max_tokens` gets a micro-batch of its own). The
    gradient of the step is the sum over micro-batches, so how the step is split changes
    memory and speed, never the update.
    """
    groups: list[list[Sequence]] = []
    current: list[Sequence] = []
    used = 0
    for seq in sequences:
        if current and used + len(seq.ids) > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(seq)
        used += len(seq.ids)
    if current:
        groups.append(current)
    return groups


def pad(sequences: list[Sequence], pad_id: int) -> dict[str, torch.Tensor]:
    """The unoptimised layout, as TRL's collator builds it: right padding, labels -100 off the loss mask.

    Used as the reference the packed path is checked against, and by the bench's 'plain' variant.
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
