"""FastSFTTrainer / FastDPOTrainer must learn what TRL's trainers learn: same losses, step by step.

Tiny Mistral on the CPU in fp32, so the two paths agree to rounding. TRL's trainers accumulate
two micro-batches per step; ours get them as one micro-batch with the phases' settings
(`_as_the_phases_run`), dropout off (random masks would differ).
"""

import math
import tempfile

import pytest
import torch


@pytest.fixture(scope="module")
def rows(tiny):
    from app.bench import Config, model as bench_model

    return bench_model.texts(Config(shape="tiny", examples=24), tiny[0].config.vocab_size)


def _restore(trainer):
    from app.bench import model as bench_model

    bench_model.restore_base(trainer.model)


def _as_the_phases_run(cls, batch: int, accum: int, merge: bool = True) -> dict:
    """TRL's trainers: batch x accum as given; ours as app/phases/sft.py and dpo.py build their
    arguments: merged into one micro-batch (unless `merge` is off) and the host settings."""
    from app.training.overrides import host_arguments

    if not cls.__name__.startswith("Fast"):
        return dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accum)
    if merge:
        batch, accum = batch * accum, 1
    return dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accum, **host_arguments())


def _sft_losses(cls, base, tokenizer, rows):
    from datasets import Dataset
    from trl import SFTConfig

    from app.models import lora_config

    torch.manual_seed(0)
    args = SFTConfig(output_dir=tempfile.mkdtemp(), **_as_the_phases_run(cls, 4, 2), max_steps=3,
                     learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
                     use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0, disable_tqdm=True,
                     completion_only_loss=True)
    trainer = cls(model=base, args=args, processing_class=tokenizer, peft_config=lora_config(8, 16, 0.0),
                  train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                                   for r in rows]))
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h]
    _restore(trainer)
    return log


def test_fast_sft_trainer_learns_what_trl_learns(tiny, rows):
    from trl import SFTTrainer

    from app.training.trainers import FastSFTTrainer

    base, tokenizer, _ = tiny
    reference = _sft_losses(SFTTrainer, base, tokenizer, rows)
    fast = _sft_losses(FastSFTTrainer, base, tokenizer, rows)
    assert len(fast) == len(reference) == 3
    # Step 2 and 3 only agree if the updates did; the norms are the ones clipped (our trainable-only list).
    for key in ("loss", "grad_norm"):
        assert [h[key] for h in fast] == pytest.approx([h[key] for h in reference], rel=1e-4), key


def _three_step_fast_sft(base, tokenizer, rows):
    from datasets import Dataset
    from trl import SFTConfig

    from app.models import lora_config
    from app.training.trainers import FastSFTTrainer

    args = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                     logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0,
                     disable_tqdm=True, completion_only_loss=True)
    return FastSFTTrainer(model=base, args=args, processing_class=tokenizer, peft_config=lora_config(8, 16, 0.0),
                          train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                                           for r in rows]))


def test_fast_trainer_keeps_the_trainers_bookkeeping_without_walking_the_model(tiny, rows):
    """Every module trains (from an eval-mode base, and after an eval()); grads are dropped; FLOPs as the Trainer's."""
    from transformers import Trainer, TrainerCallback

    base, tokenizer, _ = tiny
    base.eval()  # as from_pretrained leaves it; the PEFT wrapper and adapters made on top start in train mode
    trainer = _three_step_fast_sft(base, tokenizer, rows)
    seen = {"training": []}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen["training"].append(all(m.training for m in model.modules()))
            if state.global_step == 1:
                model.eval()  # as an evaluation between steps would

    trainer.add_callback(Probe())
    trainer.train()
    model = trainer.model
    assert seen["training"] == [True, True, True]  # all from step 1; step 2's train() undid the eval()
    assert "train" not in vars(model) and "zero_grad" not in vars(model)  # the per-run shortcuts are gone
    assert all(p.grad is None for p in model.parameters())
    expected = 6 * trainer.tokens_seen * model.num_parameters(exclude_embeddings=True)  # packed: no padding
    assert trainer.state.total_flos == expected
    assert trainer.floating_point_ops({"input_ids": torch.zeros(2, 5)}) == \
        Trainer.floating_point_ops(trainer, {"input_ids": torch.zeros(2, 5)})
    _restore(trainer)
    base.train()


def test_fast_trainer_takes_its_shortcuts_off_the_model_when_training_fails(tiny, rows):
    from transformers import TrainerCallback

    base, tokenizer, _ = tiny
    trainer = _three_step_fast_sft(base, tokenizer, rows)

    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("node lost")

    trainer.add_callback(Fail())
    with pytest.raises(RuntimeError, match="node lost"):
        trainer.train()
    assert "train" not in vars(trainer.model) and "zero_grad" not in vars(trainer.model)
    _restore(trainer)


def test_packed_batches_cross_from_the_loader_as_one_tensor(tiny, rows):
    from app.training.data import tokenize_pairs
    from app.training.packing import unpack_batch
    from app.training.trainers import PackingCollator, PairCollator, _collate

    _, tokenizer, _ = tiny
    pairs = tokenize_pairs(tokenizer, [r["prompt"] for r in rows[:3]], [r["completion"] for r in rows[:3]],
                           [r["rejected"] for r in rows[:3]])
    features = [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected,
                 "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0} for p in pairs]
    batch = PairCollator(None)(features)
    tensors = {k for k, v in batch.items() if torch.is_tensor(v) and v.dtype in (torch.int64, torch.int32)}
    assert tensors == {"flat"}
    expected = _collate([s for p in pairs for s in p.sequences(None)])
    unpacked = unpack_batch(batch)
    for key in ("input_ids", "position_ids", "packed_cu_seqlens", "target_index", "seq_index"):
        assert unpacked[key].dtype == expected[key].dtype and torch.equal(unpacked[key], expected[key]), key
    assert torch.equal(unpacked["targets"], expected["shift_labels"][0])
    assert unpacked["ref_chosen_logps"].tolist() == [-1.0] * 3

    sft = PackingCollator()([{"input_ids": s.ids, "labels": [-100] + s.ids[1:]} for s in pairs[0].sequences(None)])
    assert {k for k, v in sft.items() if torch.is_tensor(v)} == {"flat", "labels", "shift_labels"}
    assert sft["labels"] is sft["shift_labels"]  # one object: pickled (and handed over) once


def _dpo_trainer(cls, base, tokenizer, rows, steps: int = 2, trainer_kwargs=None, **extra):
    from datasets import Dataset
    from trl import DPOConfig

    from tests.training.conftest import lora

    model = lora(base, r=8, b_std=0.05, seed=1)  # stands in for a trained SFT adapter
    torch.manual_seed(0)
    trainer_kwargs = dict(trainer_kwargs or {})
    merge = trainer_kwargs.pop("merge", True)
    if cls.__name__.startswith("Fast") and merge:
        # As the dpo phase: TRL's 'sft' term is a token mean per micro-batch of 2 pairs, kept inside the merged one.
        trainer_kwargs.setdefault("nll_group_pairs", 2)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), **_as_the_phases_run(cls, 2, 2, merge),
                     max_steps=steps, learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
                     use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0, disable_tqdm=True, **extra)
    return cls(model=model, args=args, processing_class=tokenizer, **trainer_kwargs,
               train_dataset=Dataset.from_list([{"prompt": r["prompt"], "chosen": r["completion"],
                                                "rejected": r["rejected"]} for r in rows]))


def _dpo_log(cls, base, tokenizer, rows, steps: int = 2, trainer_kwargs=None, **extra):
    trainer = _dpo_trainer(cls, base, tokenizer, rows, steps, trainer_kwargs, **extra)
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h]
    _restore(trainer)
    return log


# sigmoid + sft at weight 1 is Iterative RPO's DPO + NLL (`--dpo-recipe rpo`; TRL's former rpo_alpha=1).
@pytest.mark.parametrize("extra", [{}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]},
                                   {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}],
                         ids=["sigmoid", "sigmoid+sft", "rpo-alpha-1"])
def test_fast_dpo_trainer_learns_what_trl_learns(tiny, rows, extra):
    from trl import DPOTrainer

    from app.training.trainers import FastDPOTrainer

    base, tokenizer, _ = tiny
    reference = _dpo_log(DPOTrainer, base, tokenizer, rows, **extra)
    fast = _dpo_log(FastDPOTrainer, base, tokenizer, rows, **extra)
    if not extra:  # pure DPO: policy == reference at step 0
        assert fast[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert fast[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for key in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen"):
        assert [h[key] for h in fast] == pytest.approx([h[key] for h in reference], rel=1e-3, abs=1e-4), key


def test_fast_dpo_trainer_refuses_losses_it_does_not_implement(tiny):
    from trl import DPOConfig

    from app.training.trainers import FastDPOTrainer

    args = DPOConfig(output_dir=tempfile.mkdtemp(), loss_type=["ipo"], report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="sigmoid"):
        FastDPOTrainer(model=tiny[0], args=args)


def test_adapter_swap_computes_with_the_other_adapter_and_restores_the_active_one():
    """The compiled DPO reference: the policy's own adapter holding the `ref` weights for one forward."""
    import copy

    from app.bench import Config, model as bench_model
    from app.training.trainers import _AdapterSwap
    from tests.training.conftest import lora

    # A model of its own: on the module's shared one, wrapped and unwrapped by the tests above,
    # both adapters computed the same outputs (PEFT state left behind), which hides the swap.
    model = lora(bench_model.build_model(Config(shape="tiny"), torch.device("cpu")), r=8, b_std=0.05, seed=1)
    model.add_adapter("ref", copy.deepcopy(model.peft_config["default"]))
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if ".ref." in name:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    ids = torch.randint(4, 200, (1, 12))
    policy = model(input_ids=ids).logits
    model.set_adapter("ref")
    reference = model(input_ids=ids).logits
    model.set_adapter("default")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}

    swap = _AdapterSwap(model, "ref")
    with swap:
        swapped = model(input_ids=ids).logits
    assert torch.equal(swapped, reference) and not torch.equal(swapped, policy)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)
    assert torch.equal(model(input_ids=ids).logits, policy)
    with pytest.raises(ValueError, match="no weight matching"):
        _AdapterSwap(model, "missing")


@pytest.mark.parametrize("extra", [{}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}],
                         ids=["sigmoid", "rpo-alpha-1"])
def test_fast_dpo_trainer_with_step_graphs_learns_what_trl_learns(tiny, rows, extra):
    """The CUDA-graph path on the CPU: padded rows, steps recorded once per row length and replayed;
    with the NLL term too (TRL's two micro-batches of 2 pairs are one micro-batch of 4 here)."""
    from trl import DPOTrainer

    from app.training.trainers import FastDPOTrainer

    base, tokenizer, _ = tiny
    reference = _dpo_log(DPOTrainer, base, tokenizer, rows, steps=4, **extra)
    # One row length for the whole run (rows padded to 4096 tokens): step 1 runs eagerly and is recorded, 2-4 replay.
    trainer = _dpo_trainer(FastDPOTrainer, base, tokenizer, rows, steps=4,
                           trainer_kwargs={"cuda_graphs": True, "graph_pad_multiple": 4096}, **extra)
    assert trainer.graphs_off_reason is None and trainer.data_collator.pad_multiple == 4096
    trainer.train()
    fast = [h for h in trainer.state.log_history if "loss" in h]
    stats = trainer.graph_stats
    _restore(trainer)
    assert (stats.eager, stats.captured, stats.replayed, stats.failure) == (1, 1, 3, None)
    if not extra:
        assert fast[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"):
        assert [h[key] for h in fast] == pytest.approx([h[key] for h in reference], rel=1e-3, abs=1e-4), key


def test_fast_dpo_trainer_says_why_it_runs_without_graphs(tiny, rows):
    from app.training.trainers import FastDPOTrainer

    base, tokenizer, _ = tiny
    # Accumulation micro-steps (not merged into one micro-batch): a graph would not sum their gradients.
    trainer = _dpo_trainer(FastDPOTrainer, base, tokenizer, rows, trainer_kwargs={"cuda_graphs": True, "merge": False})
    assert "accumulation" in trainer.graphs_off_reason and trainer.data_collator.pad_multiple is None
    _restore(trainer)
    trainer = _dpo_trainer(FastDPOTrainer, base, tokenizer, rows)  # the CPU default
    assert trainer.graphs_off_reason == "turned off" and trainer.data_collator.share_prompt
    _restore(trainer)


def test_pair_sums_are_the_same_in_every_row_layout(tiny, rows):
    """Separate sequences, each prompt once (`pack_pairs`), and both padded for graphs: the same log-probs."""
    from app.training.data import tokenize_pairs
    from app.training.packing import unpack_batch
    from app.training.trainers import PairCollator, fast_path, pair_sums
    from tests.training.conftest import lora

    base, tokenizer, _ = tiny
    pairs = tokenize_pairs(tokenizer, [r["prompt"] for r in rows[:3]], [r["completion"] for r in rows[:3]],
                           [r["rejected"] for r in rows[:3]])
    features = [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs]
    model = lora(base, r=8, b_std=0.05, seed=1)
    model.eval()
    sums = {}
    for name, collator in {"separate": PairCollator(200), "shared prompt": PairCollator(200, share_prompt=True),
                           "padded": PairCollator(200, 128),
                           "shared and padded": PairCollator(200, 128, share_prompt=True)}.items():
        batch = unpack_batch(collator(features))
        with torch.no_grad(), fast_path(model):
            sums[name] = torch.stack(pair_sums(model, batch))
        assert sums[name].shape == (2, 3)
    for name, value in sums.items():
        torch.testing.assert_close(value, sums["separate"], rtol=1e-5, atol=1e-3, msg=name)
    from app.bench import model as bench_model

    bench_model.restore_base(model)


def test_step_graphs_take_precomputed_reference_log_probs_as_inputs(tiny, rows):
    from app.training.trainers import FastDPOTrainer

    base, tokenizer, _ = tiny
    eager = _dpo_log(FastDPOTrainer, base, tokenizer, rows, steps=3, precompute_ref_log_probs=True)
    trainer = _dpo_trainer(FastDPOTrainer, base, tokenizer, rows, steps=3,
                           trainer_kwargs={"cuda_graphs": True, "graph_pad_multiple": 4096},
                           precompute_ref_log_probs=True)
    trainer.train()
    graphed = [h for h in trainer.state.log_history if "loss" in h]
    stats = trainer.graph_stats
    _restore(trainer)
    assert (stats.captured, stats.replayed) == (1, 2)  # the replays read each step's reference log-probs
    assert graphed[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert [h[key] for h in graphed] == pytest.approx([h[key] for h in eager], rel=1e-4, abs=1e-5), key
