import torch
import torch.nn.functional as F

from app.training.attention import packed_attention, varlen_attention


def test_varlen_attention_equals_attention_per_sequence():
    torch.manual_seed(0)
    lengths = [3, 7, 1, 5]
    q = torch.randn(sum(lengths), 4, 8)
    k, v = torch.randn(sum(lengths), 2, 8), torch.randn(sum(lengths), 2, 8)  # grouped KV heads
    cu = torch.tensor([0, 3, 10, 11, 16], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, max(lengths), scale=8 ** -0.5)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].repeat_interleave(2, 1).transpose(0, 1),
                                             v[s:e].repeat_interleave(2, 1).transpose(0, 1), is_causal=True)
        torch.testing.assert_close(out[s:e], ref.transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_packed_model_forward_matches_separate_forwards(tiny):
    from app.training.packing import pack
    from tests.training.conftest import random_sequences

    model = tiny[0]
    seqs = random_sequences(3, seed=1)
    p = pack(seqs)
    with torch.no_grad(), packed_attention(model):
        packed = model(input_ids=p.input_ids, position_ids=p.position_ids, packed_cu_seqlens=p.cu_seqlens,
                       packed_max_seqlen=p.max_seqlen).logits[0]
    assert model.config._attn_implementation == "sdpa"  # restored
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            alone = model(input_ids=torch.tensor([seq.ids])).logits[0]
            s, e = p.cu_seqlens[i].item(), p.cu_seqlens[i + 1].item()
            torch.testing.assert_close(packed[s:e], alone, rtol=1e-4, atol=1e-4)


def test_packed_mode_skips_transformers_packed_row_detection(tiny):
    """transformers' detection ends in a Python `if` on a GPU tensor (a host sync per forward)."""
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    position_ids = torch.tensor([[0, 1, 2, 0, 1]])
    assert original(position_ids) is not None
    with packed_attention(tiny[0]):
        with packed_attention(tiny[0]):  # re-entrant
            assert masking_utils.find_packed_sequence_indices(position_ids) is None
        assert masking_utils.find_packed_sequence_indices(position_ids) is None
    assert masking_utils.find_packed_sequence_indices is original


def test_varlen_attention_with_more_keys_than_queries_is_the_end_of_the_longer_sequence():
    """A DPO rejected completion attending to its prompt (gathered keys): bottom-right causal."""
    torch.manual_seed(0)
    full = 9  # prompt (4) + completion (5): the completion's queries, the whole sequence's keys
    q, k, v = torch.randn(full, 4, 8), torch.randn(full, 2, 8), torch.randn(full, 2, 8)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
                                         v.repeat_interleave(2, 1).transpose(0, 1), is_causal=True).transpose(0, 1)
    other = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)  # a segment of its own before it
    out = varlen_attention(torch.cat([other[0], q[4:]]), torch.cat([other[1], k]), torch.cat([other[2], v]),
                           torch.tensor([0, 3, 8], dtype=torch.int32), 5, 8 ** -0.5,
                           cu_seqlens_k=torch.tensor([0, 3, 12], dtype=torch.int32), max_seqlen_k=9)
    torch.testing.assert_close(out[3:], ref[4:], rtol=1e-5, atol=1e-5)
