"""Every place the fast training path reaches into Hugging Face, TRL, PEFT, accelerate or torch internals.

The components (`attention.py`, `lora.py`, `loss.py`, `packing.py`, `graphs.py`) hold the math
and `trainers.py` the loss and the step; whatever replaces a library's own behaviour, patches an
object it owns, or rewrites its settings is here, so that a library upgrade has one file to check.

Checked against transformers 5.19.0, trl 1.16.0, peft 0.21.2, accelerate 1.15.0 (what `.venv`
and both image locks pin; torch 2.13 CPU, 2.14 in the GPU image) by the tests named below, and
measured with transformers 5.17.0, trl 1.16.0, peft 0.21.0, torch 2.11 on the GPU. The figures
are the bench's on the Mistral-7B shape (one H100 unless it says otherwise; an SFT step is 16
GSM8K-length examples, a DPO step 4 pairs; items 5-7 from one SFT step with the levers switched
on one by one), each change against the code without it on the same machine.

Settings the phases pass (`host_arguments()`; not a patch, but the Trainer's defaults cost time)
  1. `logging_nan_inf_filter=False`: the HF Trainer's filter reads the loss back every step
     (one host sync per step). With 2 loader workers: SFT 10,258 -> 12,320 tokens/s.
  2. `dataloader_pin_memory=True`, `accelerator_config.non_blocking=True`: accelerate copies each
     batch with a blocking copy that waits for the previous step's kernels. With the other
     in-step syncs below removed: SFT 13,260 -> 13,661 tokens/s.
  3. `ddp_find_unused_parameters=False`: the HF Trainer turns DDP's search on whenever gradient
     checkpointing is off, a walk of the autograd graph every step (the LoRA adapter always has
     all its gradients). Not measured alone (several GPUs). Guarded by
     tests/training/test_overrides.py and tests/training/test_distributed.py (two ranks learn
     what one learns).
  The phases also merge per-device batch x gradient accumulation into one micro-batch where they
  build their TrainingArguments (app/phases/sft.py, dpo.py): the same examples per optimizer step
  (the sampler's order does not depend on the batch size) and the same normalisation. DPO's NLL
  term ('sft', a token mean per micro-batch in TRL) is taken per group of the original micro-batch's
  pairs (`trainers.chosen_nll`), so the loss stays TRL's; guarded by tests/training/test_trainers.py.

Patches of objects the libraries own
  4. `packed_row_detection_off()`: transformers' `masking_utils.find_packed_sequence_indices`
     returns None while we train packed rows. It ends in a Python `if` on a GPU tensor at the
     start of every forward (a host sync); our attention gets the boundaries as cu_seqlens.
     Part of item 2's figure. Guarded by tests/training/test_attention.py.
  5. `attention_implementation(model, name)`: the private `_attn_implementation` of every config
     in the model (PEFT wrapper and base) set to our registered `packed_varlen` for the block,
     then put back. Buys packing itself: padded batch 16 out of memory without checkpointing,
     packed 7,634 tokens/s at 59 GiB. Guarded by tests/training/test_attention.py.
  6. `replaced_forwards(layers, forward)`: the instance `forward` of each PEFT LoRA Linear
     swapped for the fused one (`lora.py`), restored after. 7,634 -> 9,324 tokens/s, 59 -> 45 GiB.
     Guarded by tests/training/test_lora.py.
  7. `compiled_layers(model)`: `nn.Module.compile` on each decoder layer, undone by clearing
     torch's private `_compiled_call_impl`. 9,324 -> 14,608 tokens/s, 43.5 GiB. Guarded by the
     GPU bench (the CPU tests run eager).
  8. `LeanLoopModel`: the HF Trainer's per-step `model.train()` and `model.zero_grad()` replaced,
     on the loop model instance, for one `train()`: one full walk, then skipped while the model
     is still in training mode; `zero_grad` drops the trainable parameters' gradients. A PEFT 7B
     has ~10,000 modules: 26-36 and 22 ms per step under cProfile. With items 9-11 and one
     tensor per batch from the loader workers: SFT 12,610 -> 14,818 tokens/s, DPO 10.78 ->
     14.31 pairs/s (~371 -> ~280 ms per step). Guarded by tests/training/test_trainers.py
     (`..._bookkeeping_without_walking_the_model`, `..._shortcuts_off_the_model_when_training_fails`).
  9. `Trainer._clip_grad_norm` (private): the norm over the trainable parameters, listed once
     (24 ms per step), the same norm. Guarded by test_trainers.py (logged grad norms = TRL's)
     and test_distributed.py.
 10. `Trainer.floating_point_ops`: the parameter count behind the FLOP estimate made once (32 ms
     per step). Guarded by test_trainers.py (`total_flos` = 6 x tokens x parameters).
 11. `Trainer._track_num_input_tokens` (private): skipped when not asked for (the default), else
     given the batch unpacked from its one tensor. Guarded by tests/training/test_overrides.py.
 12. `Trainer.model_accepts_loss_kwargs = True` (SFT): the Trainer passes `num_items_in_batch`,
     so the loss is normalised over the optimizer step's target tokens across ranks, as TRL's.
     Correctness, not speed. Guarded by test_trainers.py and test_distributed.py.
 13. `without_ddp_wrapper(accelerator)`: accelerate's `prepare_model` called with
     `evaluation_mode=True` while the DPO graph path trains on several ranks: DDP's
     gradient-accumulation nodes make every CUDA-graph capture fail, and the graph path
     all-reduces the adapter itself. Guarded by test_distributed.py (graph path, two ranks).
 14. `DPOTrainer._precompute_ref_logps` (TRL private), with `precompute_ref_log_probs=True`:
     the reference log-probs in 16k-token packed no-grad rows, split over the ranks:
     58.6 pairs/s for the reference pass, then 15.21 pairs/s of training steps (eager; 12.08
     together), and step 0 agrees with ln 2 only to bf16 rounding: off by default. Guarded by
     test_trainers.py (`test_step_graphs_take_precomputed_reference_log_probs_as_inputs`).
 15. `DPOTrainer._metrics` (TRL private) filled in `log`: the reward metrics stay on the device
     and are read back once per logged step instead of TRL's six `.item()` per step (part of
     item 2's figure). Guarded by test_trainers.py (logged rewards/margins = TRL's).

Private names called, not replaced: `Trainer._prepare_inputs` (the graph path's step),
`trl.trainer.utils.use_adapter`, `torch._foreach_copy_`, `torch._utils._flatten_dense_tensors`.
"""

from __future__ import annotations

import contextlib
import math
import types

from accelerate.utils import DistributedType
from transformers import TrainerCallback

from app.training.packing import unpack_batch

# One process or DDP: the model and its parameters are plain (DeepSpeed and FSDP have their own).
PLAIN_DISTRIBUTED = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


def host_arguments() -> dict:
    """TrainingArguments under which the host never waits for the GPU inside a step (items 1-3)."""
    return dict(logging_nan_inf_filter=False, dataloader_pin_memory=True, accelerator_config={"non_blocking": True},
                ddp_find_unused_parameters=False)


# ---------------------------------------------------------------------------------------------
# Patches of the model's objects (items 4-7)


def _no_packed_detection(position_ids):
    return None


@contextlib.contextmanager
def packed_row_detection_off():
    """transformers' detection of packed rows from position ids off inside this block (item 4)."""
    from transformers import masking_utils

    # Nested blocks each put back what they found, so the outermost restores transformers' own.
    saved = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = _no_packed_detection
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = saved


def _configs(model):
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen:
            seen.add(id(config))
            yield config


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Every config in `model` set to the registered attention `name` inside this block (item 5)."""
    saved = [(config, config._attn_implementation) for config in _configs(model)]
    try:
        for config, _ in saved:
            config._attn_implementation = name
        yield model
    finally:
        for config, previous in saved:
            config._attn_implementation = previous


@contextlib.contextmanager
def replaced_forwards(layers, forward):
    """Each layer's `forward` is `forward` bound to it inside this block (item 6); the original is
    `layer._unfused_forward`. Re-entrant: a layer already replaced by an outer block is left to it."""
    layers = [layer for layer in layers if "_unfused_forward" not in layer.__dict__]
    for layer in layers:
        layer._unfused_forward = layer.forward
        layer.forward = types.MethodType(forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
            del layer._unfused_forward


@contextlib.contextmanager
def compiled_layers(model):
    """Each decoder layer compiled with torch.compile inside this block (item 7).

    Layers share code, so the compiled graph is reused across them; the first steps pay the
    compilation (a minute or two for a 7B model).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = list(getattr(lm, lm.base_model_prefix).layers)
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None


# ---------------------------------------------------------------------------------------------
# The HF Trainer's per-step bookkeeping (items 8-12)


class LeanLoopModel(TrainerCallback):
    """During training, the loop model's per-step `train()` and `zero_grad()` without walking every module (item 8).

    Training begins with one full `train()` (a model from `from_pretrained` starts in eval mode
    under a PEFT wrapper that does not); later calls are skipped while the model is still in
    training mode (any `eval()` in between, e.g. an evaluation, makes the next one walk again),
    and `zero_grad()` drops the gradients of the trainable parameters, the only ones that get
    any. One process or DDP only: DeepSpeed and FSDP engines keep their own methods.
    `TrainerOverrides.restore_overrides` takes the shortcuts off when `train()` returns or raises.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.patched = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.accelerator.distributed_type not in PLAIN_DISTRIBUTED:
            return
        loop_model, top = self.trainer.model_wrapped, self.trainer.model
        trainable = self.trainer.trainable_parameters(refresh=True)
        full_train, full_zero_grad = type(loop_model).train, type(loop_model).zero_grad
        full_train(loop_model, True)

        def train(mode: bool = True):
            if not (mode and loop_model.training and top.training):
                full_train(loop_model, mode)
            return loop_model

        def zero_grad(set_to_none: bool = True):
            if not set_to_none:
                return full_zero_grad(loop_model, set_to_none)
            for param in trainable:
                param.grad = None

        loop_model.train, loop_model.zero_grad = train, zero_grad
        self.patched = loop_model

    def restore(self) -> None:
        if self.patched is not None:
            del self.patched.train, self.patched.zero_grad
            self.patched = None


def _input_ids_numel(inputs: dict) -> int | None:
    if "input_ids" in inputs:
        return inputs["input_ids"].numel()
    for key, shape, _ in inputs.get("flat_layout", ()):
        if key == "input_ids":
            return math.prod(shape)
    return None


class TrainerOverrides:
    """Mixed in before an HF Trainer class: items 8-12, and the lists they need made once.

    Call `setup_overrides()` at the end of `__init__` and `restore_overrides()` when `train()` ends;
    `counts_items=True` (SFT) is item 12.
    """

    def setup_overrides(self, counts_items: bool = False) -> None:
        if counts_items:
            self.model_accepts_loss_kwargs = True
        self._trainable_list = None
        self._num_parameters = None
        self._unwrapped_for = (None, None)
        self._lean_loop = LeanLoopModel(self)
        self.add_callback(self._lean_loop)

    def restore_overrides(self) -> None:
        self._lean_loop.restore()

    def trainable_parameters(self, refresh: bool = False) -> list:
        if refresh or self._trainable_list is None:  # refreshed at each train(): adapters may have changed
            self._trainable_list = [p for p in self.model.parameters() if p.requires_grad]
            self._num_parameters = None
        return self._trainable_list

    def unwrapped(self, model):
        """accelerate's `unwrap_model(model)`, kept (each call walks the model for compiled regions)."""
        if self._unwrapped_for[0] is not model:
            self._unwrapped_for = (model, self.accelerator.unwrap_model(model))
        return self._unwrapped_for[1]

    def floating_point_ops(self, inputs) -> int:
        # The Trainer's estimate (6 x input tokens x non-embedding parameters), the count made once.
        numel = _input_ids_numel(inputs)
        if numel is None or not hasattr(self.model, "num_parameters"):
            return 0
        if self._num_parameters is None:
            self._num_parameters = self.model.num_parameters(exclude_embeddings=True)
        return 6 * numel * self._num_parameters

    def _track_num_input_tokens(self, inputs):
        if self.args.include_num_input_tokens_seen == "no":  # the default: no unpacking every step for nothing
            return None
        return super()._track_num_input_tokens(unpack_batch(inputs))

    def _clip_grad_norm(self, model):
        # One process or DDP: the norm over the parameters that have gradients, as the Trainer's.
        if self.accelerator.distributed_type in PLAIN_DISTRIBUTED:
            return self.accelerator.clip_grad_norm_(self.trainable_parameters(), self.args.max_grad_norm)
        return super()._clip_grad_norm(model)


# ---------------------------------------------------------------------------------------------
# TRL's DPOTrainer and accelerate (items 13-15)


@contextlib.contextmanager
def without_ddp_wrapper(accelerator, active: bool = True):
    """Inside this block accelerate prepares models without DDP (item 13)."""
    if not active:
        yield
        return
    prepare_model = accelerator.prepare_model
    accelerator.prepare_model = lambda model, device_placement=None, evaluation_mode=False: \
        prepare_model(model, device_placement=device_placement, evaluation_mode=True)
    try:
        yield
    finally:
        del accelerator.prepare_model


class DPOTrainerOverrides:
    """Mixed in before TRL's DPOTrainer: items 14 and 15.

    The trainer provides `reference_logps(dataset)` (the dataset with `ref_chosen_logps` and
    `ref_rejected_logps` columns) and `read_metrics()` ({mode: {metric name: [values]}}).
    """

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        return self.reference_logps(dataset)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for mode, metrics in self.read_metrics().items():
            for name, values in metrics.items():
                self._metrics[mode][name].extend(values)
        super().log(logs, start_time)
