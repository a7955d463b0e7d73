"""The fast training path shared by the sft and dpo phases and by `python -m app bench`.

Small components, each tested on its own against the plain Hugging Face path:

    data.py       prompt/completion tokenisation exactly as TRL does it (same ids, same loss mask)
    packing.py    many sequences in one row, with per-sequence positions and cu_seqlens
    attention.py  varlen attention for packed rows (no attention across sequences)
    lora.py       a fused LoRA linear: bf16 matmuls, fp32 adapter weights, saves only its input
    loss.py       per-token log-probs straight from hidden states, in chunks (no full fp32 logits),
                  the SFT token-mean loss and the DPO sigmoid loss
    loop.py       our own SFT loop without the HF Trainer (one process or torchrun DDP), for the ablation
    flops.py      FLOPs per token and MFU, for the bench's report

What is learned is unchanged: the same examples per optimizer step, the same loss on them
(within bf16 rounding), the same optimizer and schedule as the TRL path. Only the way the
step is computed differs.
"""
