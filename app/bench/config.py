"""The bench's settings: `python -m app bench --help` lists them."""

from __future__ import annotations

from dataclasses import dataclass

from app.config import option, require

POSITIONAL = "phase"  # `python -m app bench sft` == `python -m app bench --phase sft`
PHASES = ("sft", "dpo", "generate")

SHAPES = {
    # hidden, layers, heads, kv heads, MLP, vocab
    "mistral-7b": (4096, 32, 32, 8, 14336, 32000),
    "tiny": (64, 2, 4, 2, 128, 512),
}


@dataclass
class Config:
    phase: str = option("all", "what to run: sft, dpo, generate or all")
    shape: str = option("mistral-7b", "model shape: mistral-7b or tiny (a 2-layer model for smoke tests)")
    hidden_size: int = option(0, "override the shape's hidden size (0 = the shape's)")
    num_layers: int = option(0, "override the shape's number of layers (0 = the shape's)")
    vocab_size: int = option(0, "override the shape's vocabulary size (0 = the shape's)")
    head_dim: int = option(0, "override the attention head size (0 = hidden size / heads; vLLM's CPU kernels "
                              "take 64 and up)")
    steps: int = option(10, "timed optimizer steps of our path, after the warm-up steps")
    warmup_steps: int = option(3, "untimed optimizer steps first (allocator, kernels, compilation)")
    peer: bool = option(True, "also time the peer (TRL's trainers at their defaults, HF generate)")
    peer_steps: int = option(6, "timed optimizer steps of the peer, after one untimed step")
    check: bool = option(True, "check the fast path's loss and gradients against the plain path first")
    examples: int = option(1024, "synthetic examples (SFT) or pairs (DPO) to draw batches from")
    lengths: str = option("", "a GSM8K JSONL (question, answer) to take lengths from; default: the built-in sample")
    sft_batch_size: int = option(16, "ours: sequences per device per step (the abel-7b preset's)")
    sft_grad_accum: int = option(1, "ours: gradient accumulation steps")
    dpo_batch_size: int = option(2, "ours: pairs per device per micro-step (the abel-7b preset's)")
    dpo_grad_accum: int = option(2, "ours: gradient accumulation steps")
    dpo_sft_weight: float = option(1.0, "ours, DPO: weight of the NLL term on the chosen answer (1.0 = the abel-7b "
                                        "preset's rpo recipe; 0 = plain DPO, the reference recipe)")
    max_tokens: int = option(8192, "ours: tokens per packed row (memory only; the update does not depend on it)")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout (SFT; DPO turns dropout off, as TRL does)")
    compile: bool = option(True, "ours: torch.compile each decoder layer (on CUDA; as the phases do)")
    precompute_reference: bool = option(False, "ours, DPO: reference log-probs precomputed in large rows "
                                        "(faster; step 0 matches ln 2 only to bf16 rounding) instead of the "
                                        "frozen adapter on the same row")
    dpo_graphs: bool = option(True, "ours, DPO: replay each step's forward and backward as a CUDA graph (on CUDA; "
                              "rows padded to a multiple of --graph-pad-multiple tokens)")
    graph_pad_multiple: int = option(128, "ours, DPO with graphs: pad each packed row to a multiple of this")
    dpo_share_prompt: bool = option(True, "ours, DPO: compute each pair's prompt once for both completions")
    gen_prompts: int = option(256, "generate: prompts")
    gen_new_tokens: int = option(128, "generate: new tokens per prompt (random weights rarely stop early)")
    gen_batch_size: int = option(256, "generate: our backend's batch size (the abel-7b preset's question batch)")
    gen_static_cache: bool = option(True, "generate: also time our backend with a static KV cache and the decoding "
                                    "step compiled into CUDA graphs (on CUDA, with --compile)")
    peer_gen_batch_size: int = option(64, "generate: HF generate's batch size for the peer")
    gen_samples: int = option(1, "generate: completions per prompt, sharing its prompt (rollouts sample several)")
    gen_vllm: bool = option(True, "generate: also time the vLLM backend where vLLM is installed (one process only)")
    gen_vllm_max_seqs: int = option(0, "generate, vLLM: most sequences in flight (0 = vLLM's default)")
    gen_vllm_memory: float = option(0.9, "generate, vLLM: share of the GPU's memory the engine may take (at most "
                                          "what is free when it starts)")
    profile_steps: int = option(0, "after the timed steps, this many more under torch.profiler: GPU busy share, "
                                "host syncs, top kernels and host ops (in the log and the JSON)")
    profile_peer: bool = option(False, "also profile the peer's steps (with --profile-steps)")
    trace_dir: str = option("", "with --profile-steps, also write Chrome traces (<phase>.json) to this directory")
    seed: int = option(0, "seed for weights and data")
    out: str = option("", "also write the results as JSON to this path")

    def validate(self) -> None:
        require(self.phase in PHASES + ("all",), f"bench phase {self.phase!r}: choose sft, dpo, generate or all")
        require(self.shape in SHAPES, f"--shape {self.shape!r}: choose from {', '.join(SHAPES)}")
        require(self.steps >= 1 and self.warmup_steps >= 1, "--steps and --warmup-steps must be >= 1")
        require(self.peer_steps >= 1, "--peer-steps must be >= 1")
        require(self.examples >= 8, "--examples must be >= 8")
        require(0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)")
        require(self.gen_prompts >= 1 and self.gen_new_tokens >= 1 and self.gen_samples >= 1,
                "--gen-prompts, --gen-new-tokens and --gen-samples must be >= 1")
        require(self.gen_vllm_max_seqs >= 0, "--gen-vllm-max-seqs must be >= 0 (0 = vLLM's default)")
        require(0 < self.gen_vllm_memory <= 1, f"--gen-vllm-memory must be in (0, 1], got {self.gen_vllm_memory}")

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)
