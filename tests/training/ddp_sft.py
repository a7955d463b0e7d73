"""Worker for test_distributed.py: FastSFTTrainer for two steps, one process or torchrun (gloo, CPU)."""

import json
import sys
import tempfile

import torch


def main(out: str, batch: int) -> None:
    from datasets import Dataset
    from trl import SFTConfig

    from app import bench
    from app.models import lora_config
    from app.training.trainers import FastSFTTrainer

    config = bench.Config(shape="tiny", examples=16)
    base = bench.build_model(config, torch.device("cpu"))
    tokenizer = bench.word_tokenizer(base.config.vocab_size)
    rows = bench.texts(config, base.config.vocab_size)
    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_steps=2,
                     learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                     bf16=False, seed=0, data_seed=0, disable_tqdm=True)
    trainer = FastSFTTrainer(model=base, args=args, processing_class=tokenizer, peft_config=lora_config(8, 16, 0.0),
                             train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                                              for r in rows]))
    trainer.train()
    if trainer.accelerator.is_main_process:
        logged = [h for h in trainer.state.log_history if "loss" in h]
        with open(out, "w") as fh:
            json.dump({"losses": [h["loss"] for h in logged], "grad_norms": [h["grad_norm"] for h in logged],
                       "world_size": trainer.args.world_size}, fh)


if __name__ == "__main__":
    import os

    main(sys.argv[1], int(sys.argv[2]))
    # As app/__main__.py does for torchrun workers: skip the interpreter's teardown, where torch's
    # distributed threads can abort a finished worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
