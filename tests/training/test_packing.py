import pytest

from app.training.packing import IGNORE, Sequence, pack, pad, split_by_tokens


def test_pack_restarts_positions_and_shifts_targets_inside_each_sequence():
    a = Sequence([10, 11, 12, 13], [0, 0, 1, 1])
    b = Sequence([20, 21, 22], [0, 1, 1])
    p = pack([a, b])
    assert p.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    # position i predicts token i+1 of the same sequence; last position of a sequence predicts nothing
    assert p.targets.tolist() == [IGNORE, 12, 13, IGNORE, 21, 22, IGNORE]
    assert p.target_index.tolist() == [1, 2, 4, 5]
    assert p.cu_seqlens.tolist() == [0, 4, 7]
    assert p.seq_index.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert (p.max_seqlen, p.num_sequences, p.num_tokens) == (4, 2, 7)
    assert a.num_targets + b.num_targets == len(p.target_index)


def test_split_by_tokens_keeps_order_and_budget():
    seqs = [Sequence([1] * n, [1] * n) for n in (5, 5, 5, 12, 3)]
    groups = split_by_tokens(seqs, max_tokens=10)
    assert [[len(s.ids) for s in g] for g in groups] == [[5, 5], [5], [12], [3]]
    assert [s for g in groups for s in g] == seqs


def test_pad_is_the_unshifted_trl_layout():
    batch = pad([Sequence([5, 6, 7], [0, 1, 1]), Sequence([8, 9], [0, 1])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]


def test_sequence_rejects_mismatched_mask():
    with pytest.raises(ValueError):
        Sequence([1, 2, 3], [0, 1])
