"""Our tokenisation must give exactly the ids and loss masks TRL's own preprocessing gives."""

import tempfile

import pytest

from app.training.data import tokenize_pairs, tokenize_sft


@pytest.fixture(scope="module")
def texts(tiny):
    from app.bench import Config, model as bench_model

    config = Config(shape="tiny", examples=12)
    return bench_model.texts(config, tiny[0].config.vocab_size)


def test_tokenize_sft_matches_trl(tiny, texts):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from app.models import lora_config

    model, tokenizer, _ = tiny
    ours = tokenize_sft(tokenizer, [r["prompt"] for r in texts], [r["completion"] for r in texts])
    args = SFTConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, max_steps=1,
                     completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                                          for r in texts]),
                         peft_config=lora_config(4, 8))
    for seq, row in zip(ours, trainer.train_dataset):
        assert seq.ids == row["input_ids"]
        assert seq.loss_mask == [int(label != -100) for label in row["labels"]]
        assert seq.ids[-1] == tokenizer.eos_token_id
    trainer.model.unload()


def test_tokenize_pairs_matches_trl(tiny, texts):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tests.training.conftest import lora

    model, tokenizer, _ = tiny
    ours = tokenize_pairs(tokenizer, [r["prompt"] for r in texts], [r["completion"] for r in texts],
                          [r["rejected"] for r in texts])
    peft_model = lora(model, r=4)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, max_steps=1)
    trainer = DPOTrainer(model=peft_model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": r["prompt"], "chosen": r["completion"],
                                                           "rejected": r["rejected"]} for r in texts]))
    for pair, row in zip(ours, trainer.train_dataset):
        assert (pair.prompt, pair.chosen, pair.rejected) == (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
    trainer.model.unload()
