"""Named bundles of defaults: `--preset tiny` (the embedded CPU demo), `--preset small` (the
one-GPU proving ground for preference training, docs/PREFERENCES.md) and `--preset abel-7b`.

A preset only fills fields that neither a flag nor a `PIPELINE_*` variable set, and
only fields the phase's config has, so one table serves every phase.

`--dpo-recipe` names a bundle of DPO settings laid over the preset (a flag or variable
still wins): `rpo` is DPO plus an NLL term of weight 1 on the chosen answer (Iterative
RPO, Pang et al. 2024, arXiv 2404.19733; what `abel-7b` runs by default), `reference` the
reference guide's plain DPO (lr 5e-6, 2 pairs x 2 accumulation per GPU, beta 0.1, no NLL
term). docs/PREFERENCES.md gives the evidence behind each.
"""

from __future__ import annotations

from app.errors import ConfigError

PRESETS: dict[str, dict[str, object]] = {
    # Runs anywhere in minutes: a tiny Llama built and warmed up locally, synthetic problems.
    "tiny": {
        "base_model": "tiny",
        "prompt_format": "abel",
        "train_data": "synthetic:1200",
        "eval_data": "synthetic-test:200",
        "rollout_data": "synthetic:160",
        "max_new_tokens": 96,
        "max_seq_length": 256,
        "sft_epochs": 3,
        "sft_learning_rate": 2e-3,
        "sft_batch_size": 16,
        "lora_r": 16,
        "lora_alpha": 32,
        "dpo_epochs": 1,
        # Gentle on purpose: at 5e-4 (or 2e-4 with an NLL term) DPO cut the tiny model's greedy accuracy
        # from ~24% to 8-19%; at 1e-5..2e-5 it held it (docs/DEMO.md).
        "dpo_learning_rate": 2e-5,
        "dpo_batch_size": 8,
        "dpo_grad_accum": 1,
        "dpo_beta": 0.5,
        "bf16": False,
        "samples_per_question": 6,
        "temperature": 1.0,
        "question_batch_size": 64,
        # On 2 CPU cores HF generate samples the 4-layer model's rollouts ~10x faster than vLLM-CPU
        # (seeded vLLM-CPU requests are slow); tests cover --backend vllm.
        "backend": "hf",
    },
    # The proving ground, one GPU: a 30.9 M-parameter Llama built and pretrained here on the harder
    # synthetic family; 1,000 held-out test questions (a 3-point paired difference is measurable),
    # and `--eval-data synthetic-hard-val:1000` for choosing settings. docs/PREFERENCES.md.
    "small": {
        "base_model": "small",
        "prompt_format": "abel",
        "train_data": "synthetic-hard:20000",
        "eval_data": "synthetic-hard-test:1000",
        "rollout_data": "synthetic-hard:3000",
        "max_new_tokens": 256,
        "max_seq_length": 512,
        "sft_epochs": 1,
        "sft_learning_rate": 1e-3,
        "sft_batch_size": 64,
        "lora_r": 32,
        "lora_alpha": 64,
        "dpo_epochs": 2,
        "dpo_learning_rate": 5e-5,
        "dpo_batch_size": 32,
        "dpo_grad_accum": 1,
        "dpo_beta": 0.1,
        "dpo_recipe": "rpo",
        "bf16": True,
        "samples_per_question": 8,
        "temperature": 1.0,
        # HF generate, eager, whole splits per call: a 30.9 M model starts in a second, where a vLLM
        # engine's start (torch.compile, CUDA graphs) would cost more than its generation saves.
        "backend": "hf",
        "hf_static_cache": False,
        "question_batch_size": 1024,
        "save_steps": 0,
    },
    # The reference case: GAIR/Abel-7B-002 on GSM8K, 8 GPUs per phase.
    "abel-7b": {
        "base_model": "GAIR/Abel-7B-002",
        "prompt_format": "abel",
        "train_data": "hf:openai/gsm8k",
        "eval_data": "hf:openai/gsm8k",
        "rollout_data": "hf:openai/gsm8k",
        "max_new_tokens": 512,
        "max_seq_length": 1024,
        "sft_epochs": 3,
        "sft_learning_rate": 1e-4,
        "sft_batch_size": 16,
        "lora_r": 16,
        "lora_alpha": 32,
        "dpo_epochs": 1,
        "dpo_learning_rate": 5e-6,
        "dpo_batch_size": 2,
        "dpo_grad_accum": 2,
        "dpo_beta": 0.1,
        # DPO + NLL on the chosen answer (docs/PREFERENCES.md): on GSM8K it beat plain DPO by 11 points
        # in Pang et al. 2024; `--dpo-recipe reference` is the guide's plain DPO.
        "dpo_recipe": "rpo",
        "bf16": True,
        "samples_per_question": 8,
        "temperature": 0.8,
        "question_batch_size": 256,
    },
}


DPO_RECIPES: dict[str, dict[str, object]] = {
    # Iterative RPO's objective: DPO + 1.0 x NLL on the chosen solution (TRL: loss_type sigmoid + sft).
    "rpo": {"dpo_sft_weight": 1.0},
    # The reference guide's DPO: sigmoid loss only, at its learning rate, batch and beta.
    "reference": {"dpo_sft_weight": 0.0, "dpo_learning_rate": 5e-6, "dpo_batch_size": 2, "dpo_grad_accum": 2,
                  "dpo_beta": 0.1},
}


def preset_layers(name: str, dpo_recipe: str | None = None) -> list[tuple[str, dict[str, object]]]:
    """[(where the values come from, values)], lowest first: the preset, then the DPO recipe
    (`dpo_recipe`, else the preset's own) laid over it. `--help` names each value's layer."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    layers = [(f"preset {name}", dict(PRESETS[name]))]
    recipe = dpo_recipe or PRESETS[name].get("dpo_recipe")
    if recipe:
        if recipe not in DPO_RECIPES:
            raise ConfigError(f"--dpo-recipe {recipe!r}: choose from {', '.join(DPO_RECIPES)}")
        layers.append((f"recipe {recipe}", dict(DPO_RECIPES[recipe])))
    return layers

