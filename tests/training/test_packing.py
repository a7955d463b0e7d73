import pytest
import torch

from app.training.packing import IGNORE, Sequence, pack, pad


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


def test_pad_is_the_unshifted_trl_layout():
    batch = pad([Sequence([5, 6, 7], [0, 1, 1]), Sequence([8, 9], [0, 1])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]


def test_sequence_rejects_mismatched_mask():
    with pytest.raises(ValueError):
        Sequence([1, 2, 3], [0, 1])


def _pair(prompt, chosen, rejected, max_length=None):
    from app.training.data import Pair

    return Pair(prompt, chosen, rejected).sequences(max_length)


def test_pack_pairs_computes_each_prompt_once_and_predicts_each_completion_from_it():
    from app.training.packing import pack_pairs

    p = pack_pairs([_pair([1, 2, 3], [10, 11], [20, 21, 22]), _pair([4, 5], [12], [23, 24])])
    # [P1 C1 | P2 C2 | R1 | R2]: every prompt once, each rejected completion after its pair's prompt positions.
    assert p["input_ids"].tolist() == [[1, 2, 3, 10, 11, 4, 5, 12, 20, 21, 22, 23, 24]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 2, 3]]
    # Keys per segment: itself; itself; pair 1's prompt + R1; pair 2's prompt + R2.
    assert p["packed_cu_seqlens"].tolist() == [0, 5, 8, 11, 13]
    assert p["packed_cu_seqlens_k"].tolist() == [0, 5, 8, 14, 18]
    assert p["packed_kv_index"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 8, 9, 10, 5, 6, 11, 12]
    got = sorted(zip(p["target_owner"].tolist(), p["target_index"].tolist(), p["target_ids"].tolist()))
    assert got == [(0, 2, 10), (0, 3, 11),  # chosen 1: from the prompt's last position, then its own
                   (1, 2, 20), (1, 8, 21), (1, 9, 22),  # rejected 1: the same prompt position predicts its first token
                   (2, 6, 12),
                   (3, 6, 23), (3, 11, 24)]
    assert (p["packed_max_seqlen"], p["packed_max_seqlen_k"], p["num_real_tokens"], p["num_sequences"]) == \
        (6, 6, 13, 4)


def test_pack_pairs_padded_shapes_depend_on_the_row_length_alone():
    from app.training.packing import pack_pairs

    a = pack_pairs([_pair([1, 2, 3], [10, 11], [20, 21, 22]), _pair([4, 5], [12], [23, 24])], multiple=8,
                   max_length=32)
    b = pack_pairs([_pair([6], [13, 14, 15], [25]), _pair([7, 8, 9], [16], [26, 27])], multiple=8, max_length=32)
    assert a["num_real_tokens"] != b["num_real_tokens"]
    for key, value in a.items():
        if torch.is_tensor(value):
            assert value.shape == b[key].shape, key
        elif key != "num_real_tokens":
            assert value == b[key], key
    size = a["input_ids"].shape[1]
    assert size % 8 == 0 and size > a["num_real_tokens"]  # a filler of at least one token
    assert a["packed_kv_index"].shape[0] == size + size // 2
    assert a["target_index"].shape[0] == size + 2  # every position, plus one per pair
    # The real log-probs are the unpadded layout's; everything else adds into the filler's slot (2 pairs -> 4).
    unpadded = pack_pairs([_pair([1, 2, 3], [10, 11], [20, 21, 22]), _pair([4, 5], [12], [23, 24])])
    real = sorted((o, i, t) for o, i, t in zip(a["target_owner"].tolist(), a["target_index"].tolist(),
                                               a["target_ids"].tolist()) if o < 4)
    assert real == sorted(zip(unpadded["target_owner"].tolist(), unpadded["target_index"].tolist(),
                              unpadded["target_ids"].tolist()))


def test_pack_pairs_declines_a_rejected_sequence_that_is_all_prompt():
    from app.training.packing import pack_pairs

    assert pack_pairs([_pair([1, 2, 3, 4], [10], [20], max_length=4)]) is None
