"""app/training/overrides.py: the settings the phases pass reach the Trainer, and the Trainer's
token count still works on the one-tensor batches."""

import tempfile

import pytest


@pytest.fixture(scope="module")
def rows(tiny):
    from app.bench import Config, model as bench_model

    return bench_model.texts(Config(shape="tiny", examples=16), tiny[0].config.vocab_size)


def test_host_arguments_reach_the_trainer_and_the_token_count_sees_packed_batches(tiny, rows):
    from datasets import Dataset
    from trl import SFTConfig

    from app.bench import model as bench_model
    from app.models import lora_config
    from app.training.overrides import host_arguments
    from app.training.trainers import FastSFTTrainer

    base, tokenizer, _ = tiny
    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                     report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0, disable_tqdm=True,
                     completion_only_loss=True, include_num_input_tokens_seen="all", **host_arguments())
    trainer = FastSFTTrainer(model=base, args=args, processing_class=tokenizer, peft_config=lora_config(8, 16, 0.0),
                             train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                                              for r in rows]))
    # Items 1-3: no loss read-back per step, non-blocking batch copies, no DDP search for unused parameters.
    assert trainer.args.logging_nan_inf_filter is False and trainer.args.ddp_find_unused_parameters is False
    assert trainer.accelerator.non_blocking is True
    trainer.train()
    # Item 11: the Trainer counts the tokens of the unpacked row (packed: every token is a real one).
    assert trainer.state.num_input_tokens_seen == trainer.tokens_seen > 0
    bench_model.restore_base(trainer.model)
