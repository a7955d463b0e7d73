"""Worker for test_distributed.py: a fast trainer for a few steps, one process or torchrun (gloo, CPU).

    python tests/training/ddp_worker.py sft|dpo OUT.json PER_DEVICE_BATCH

sft: FastSFTTrainer, two steps. dpo: FastDPOTrainer on the CUDA-graph path (on the CPU its
"replays" run the recorded step again, `app/training/graphs.py`), three steps.
"""

import json
import sys
import tempfile

import torch


def main(phase: str, out: str, batch: int) -> None:
    from datasets import Dataset
    from trl import DPOConfig, SFTConfig

    from app.bench import Config, model as bench_model
    from app.models import lora_config
    from app.training.overrides import host_arguments
    from app.training.trainers import FastDPOTrainer, FastSFTTrainer
    from tests.training.conftest import lora

    config = Config(shape="tiny", examples=16)
    base = bench_model.build_model(config, torch.device("cpu"))
    tokenizer = bench_model.word_tokenizer(base.config.vocab_size)
    rows = bench_model.texts(config, base.config.vocab_size)
    common = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, learning_rate=1e-2,
                  logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0,
                  data_seed=0, disable_tqdm=True, **host_arguments())  # as the phases build their arguments
    if phase == "sft":
        trainer = FastSFTTrainer(model=base, args=SFTConfig(max_steps=2, **common), processing_class=tokenizer,
                                 peft_config=lora_config(8, 16, 0.0),
                                 train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                                                  for r in rows]))
    else:
        # Rows of ~1,000 (one rank) or ~500 tokens (each of two): one padded length, 2048, for every step.
        args = DPOConfig(max_steps=3, max_length=160, gradient_checkpointing=False, **common)
        trainer = FastDPOTrainer(model=lora(base, r=8, b_std=0.05, seed=1), args=args, processing_class=tokenizer,
                                 cuda_graphs=True, graph_pad_multiple=2048,
                                 train_dataset=Dataset.from_list([{"prompt": r["prompt"], "chosen": r["completion"],
                                                                  "rejected": r["rejected"]} for r in rows]))
    trainer.train()
    if trainer.accelerator.is_main_process:
        logged = [h for h in trainer.state.log_history if "loss" in h]
        result = {"losses": [h["loss"] for h in logged], "grad_norms": [h["grad_norm"] for h in logged],
                  "world_size": trainer.args.world_size,
                  "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)}
        if phase == "dpo":
            stats = trainer.graph_stats
            result.update(margins=[h["rewards/margins"] for h in logged], replays=stats.replayed,
                          captured=stats.captured)
        with open(out, "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    import os

    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    # As app/__main__.py does for torchrun workers: skip the interpreter's teardown, where torch's
    # distributed threads can abort a finished worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
