"""The fast training path shared by the sft and dpo phases and by `python -m app bench`.

Small components, each tested on its own against the plain Hugging Face path:

    data.py       prompt/completion tokenisation exactly as TRL does it (same ids, same loss mask)
    packing.py    many sequences in one row, with per-sequence positions and cu_seqlens
    attention.py  varlen attention for packed rows (no attention across sequences)
    lora.py       a fused LoRA linear: bf16 matmuls, fp32 adapter weights, saves only its input
    loss.py       per-token log-probs from the kept logits in fp32 chunks (no full fp32 logits),
                  and the DPO sigmoid loss
    graphs.py     a DPO step's forward and backward captured and replayed as one CUDA graph
    distributed.py  rank / world size, the adapter-gradient all-reduce of the graph path
    trainers.py   TRL's SFTTrainer and DPOTrainer with these parts inside: what the phases run
    overrides.py  every override of a library internal, with what it buys and the test guarding it

What is learned is unchanged: the same examples per optimizer step, the same loss on them
(within bf16 rounding), the same optimizer and schedule as the TRL path. Only the way the
step is computed differs.
"""
