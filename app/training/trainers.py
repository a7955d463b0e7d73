"""TRL's SFTTrainer and DPOTrainer with the fast path inside: what the sft and dpo phases run.

    trainer = FastSFTTrainer(model=..., args=SFTConfig(...), train_dataset=..., peft_config=...)
    trainer = FastDPOTrainer(model=peft_model, args=DPOConfig(...), train_dataset=...)

Drop-in subclasses: TRL still prepares and tokenises the data, and the HF Trainer still owns the
loop (sampling order, LR schedule, clipping, DDP under torchrun, logging, checkpoints and resume,
callbacks). What changes is how one step is computed:

* the collator packs the step's sequences into one row (no padding), and attention stays inside
  each sequence (varlen flash attention, `attention.py`);
* every LoRA projection runs fused (`lora.py`);
* the LM head runs only on positions that carry a loss (`logits_to_keep`), and the log-softmax
  runs in fp32 chunks whose backward is written straight into bf16 (`logprobs_from_logits`):
  no (tokens x vocab) fp32 tensor is ever kept;
* the phases pass per-device batch x gradient accumulation as one micro-batch (the same examples
  per optimizer step, in the same order, the same normalisation: the update is the same);
* DPO: the reference (TRL's frozen `ref` copy of the starting adapter) runs no-grad on the same
  packed row just before the policy, so at step 0 both are the same computation and the loss is
  exactly ln 2, as with TRL; TRL's `precompute_ref_log_probs=True` instead computes all reference
  log-probs once, before training, in large rows (faster; step 0 then agrees only to bf16 rounding);
* DPO: each pair's prompt is computed once for both completions (`share_prompt`, `packing.pack_pairs`:
  ~22% fewer tokens at GSM8K lengths, every token still sees exactly what it sees alone);
* DPO on CUDA: the step's forward and backward are captured as a CUDA graph per padded row
  length and replayed (`cuda_graphs`, `graphs.py`): a 4-pair step was ~6,800 kernel launches
  whose host cost exceeded the GPU's work, a replay is one;
* `compile=True` (the default on CUDA) compiles each decoder layer with torch.compile: norms,
  rotary, SwiGLU and the LoRA glue fuse into few kernels (a minute or two of compilation first);
* the host stays ahead of the GPU: no sync inside a step, the Trainer's per-step bookkeeping
  without walking the model's ~10,000 modules, and a batch crosses from the loader workers as one
  tensor (`packing.flatten_batch`; `unpack_batch` gives the views back).

Where this reaches into the libraries' internals (the Trainer's bookkeeping, TRL's reference pass
and metrics, accelerate's DDP wrapping, the TrainingArguments the phases pass) is `overrides.py`,
which lists each override, what it buys and the test that guards it.

The loss is TRL's: SFT, the mean over the completion tokens of the optimizer step (across
ranks); DPO, the sigmoid loss averaged over the step's pairs, with TRL's reward metrics logged,
so the dpo phase's step-0 check (loss ln 2, margin 0) reads them as before.
"""

from __future__ import annotations

import contextlib

import torch
from trl import DPOTrainer, SFTTrainer

from app.log import log as _log
from app.training import distributed
from app.training.attention import packed_attention, uses_flash_varlen
from app.training.data import Pair
from app.training.lora import fused_lora
from app.training.loss import dpo_sigmoid_loss, logprobs_from_logits
from app.training.overrides import (PLAIN_DISTRIBUTED, DPOTrainerOverrides, TrainerOverrides, compiled_layers,
                                    without_ddp_wrapper)
from app.training.packing import IGNORE, Sequence, flatten_batch, pack, pack_padded, pack_pairs, unpack_batch

# CUDA graphs replay fixed shapes: padded rows are a multiple of this many tokens (~16 shapes, ~3% padding
# for a GSM8K DPO run of 4 pairs per step).
GRAPH_PAD_MULTIPLE = 128
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")
_SHARED_PROMPT_KEYS = ("packed_kv_index", "packed_cu_seqlens_k", "packed_max_seqlen_k")


def packed_logits(model, batch: dict) -> torch.Tensor:
    """Logits (M, V) at the positions that carry a loss, from one packed row."""
    shared = {k: batch[k] for k in _SHARED_PROMPT_KEYS if k in batch}  # `pack_pairs`: gathered keys per segment
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                packed_cu_seqlens=batch["packed_cu_seqlens"], packed_max_seqlen=batch["packed_max_seqlen"],
                logits_to_keep=batch["target_index"], use_cache=False, **shared)
    return out.logits[0]


def _collate(sequences: list[Sequence]) -> dict:
    p = pack(sequences)
    targets = p.targets.unsqueeze(0)
    return {"input_ids": p.input_ids, "position_ids": p.position_ids, "packed_cu_seqlens": p.cu_seqlens,
            "packed_max_seqlen": p.max_seqlen, "target_index": p.target_index, "seq_index": p.seq_index,
            "num_real_tokens": sum(len(s.ids) for s in sequences),
            # The HF Trainer counts `shift_labels` != -100 to normalise the loss over the optimizer step.
            "labels": targets, "shift_labels": targets}


@contextlib.contextmanager
def fast_path(model, compile: bool = False):
    """Packed attention and fused LoRA (and, with `compile`, compiled layers) inside this block."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(packed_attention(model))
        stack.enter_context(fused_lora(model))
        if compile:
            stack.enter_context(compiled_layers(model))
        yield


def _default_compile() -> bool:
    return torch.cuda.is_available()


class _FastStep(TrainerOverrides):
    """What both fast trainers share: the fast path in place for the whole of `train()`."""

    def _init_fast(self, counts_items: bool = False) -> None:
        self._fast_on = False  # inside train(): the fast path is already in place
        self.setup_overrides(counts_items)

    def _fast_step(self, model):
        """The fast path for one compute_loss: already in place inside train(), entered for evaluate()."""
        return contextlib.nullcontext() if self._fast_on else fast_path(self.unwrapped(model))

    def _train_fast(self, *args, **kwargs):
        with fast_path(self.model, self._compile):
            self._fast_on = True
            try:
                return super().train(*args, **kwargs)
            finally:
                self._fast_on = False
                self.restore_overrides()  # also when training raised


# ---------------------------------------------------------------------------------------------
# SFT


class PackingCollator:
    """TRL-prepared SFT rows ({input_ids, labels with -100 off the completion}) -> one packed row."""

    def __call__(self, features: list[dict]) -> dict:
        batch = _collate([Sequence(list(f["input_ids"]), [int(label != IGNORE) for label in f["labels"]])
                          for f in features])
        return flatten_batch(batch, keep=("labels", "shift_labels"))  # the HF Trainer reads these before our step


class FastSFTTrainer(_FastStep, SFTTrainer):
    """TRL's SFTTrainer (prompt-completion data, completion-only loss) with the fast step."""

    def __init__(self, *args, compile: bool | None = None, **kwargs):
        self._compile = _default_compile() if compile is None else compile
        args_ = kwargs.get("args")
        if args_ is not None and getattr(args_, "padding_free", False):
            raise ValueError("FastSFTTrainer packs by itself; leave padding_free off")
        kwargs.setdefault("data_collator", PackingCollator())
        super().__init__(*args, **kwargs)
        self._init_fast(counts_items=True)  # the loss: over the step's target tokens
        self.tokens_seen = 0  # real tokens through forward+backward on this rank (the bench reads it)

    def train(self, *args, **kwargs):
        return self._train_fast(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = unpack_batch(inputs)
        targets = inputs["shift_labels"][0].index_select(0, inputs["target_index"])
        self.tokens_seen += inputs["num_real_tokens"]
        with self._fast_step(model):  # also outside train() (evaluate)
            logps = logprobs_from_logits(packed_logits(model, inputs), targets)
        count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
        loss = -logps.sum() / torch.as_tensor(count, device=logps.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
        return (loss, None) if return_outputs else loss


# ---------------------------------------------------------------------------------------------
# DPO


class PairCollator:
    """TRL-prepared pairs ({prompt_ids, chosen_ids, rejected_ids, ref_*_logps}) -> one packed row.

    Sequences go chosen, rejected, chosen, rejected, ...; truncated like TRL's (keep the start).
    With `share_prompt`, each prompt is in the row once (`pack_pairs`); with `pad_multiple`, the
    row is padded so that its shapes depend on its padded length alone (for CUDA graphs).
    """

    def __init__(self, max_length: int | None, pad_multiple: int | None = None, share_prompt: bool = False):
        self.max_length = max_length
        self.pad_multiple = pad_multiple
        self.share_prompt = share_prompt

    def __call__(self, features: list[dict]) -> dict:
        pairs = [Pair(list(f["prompt_ids"]), list(f["chosen_ids"]), list(f["rejected_ids"])).sequences(self.max_length)
                 for f in features]
        seqs = [s for pair in pairs for s in pair]
        shared = pack_pairs(pairs, self.pad_multiple, self.max_length) if self.share_prompt else None
        if shared is not None:
            batch = shared
            batch["static_shape"] = self.pad_multiple is not None
        elif self.pad_multiple:
            batch = pack_padded(seqs, self.pad_multiple, self.max_length)
        else:
            batch = _collate(seqs)
            # DPO normalises per pair, not per token: no `labels`, so the Trainer counts nothing.
            batch["targets"] = batch.pop("shift_labels")[0]
            del batch["labels"]
            batch["num_sequences"] = len(seqs)
        batch["num_pairs"] = len(features)
        if "ref_chosen_logps" in features[0]:
            batch["ref_chosen_logps"] = torch.tensor([f["ref_chosen_logps"] for f in features], dtype=torch.float32)
            batch["ref_rejected_logps"] = torch.tensor([f["ref_rejected_logps"] for f in features],
                                                       dtype=torch.float32)
        return flatten_batch(batch)


def pair_sums(model, batch: dict, token_logps: bool = False):
    """Summed completion log-probs (chosen, rejected) per pair of a packed batch, through `model`'s forward.

    With `token_logps`, also the per-token log-probs and which sequence each belongs to.
    """
    index = batch["target_index"]
    if "target_owner" in batch:  # `pack_pairs`, `pack_padded`: per log-prob, its token and where it adds up
        targets, owner = batch["target_ids"], batch["target_owner"]
    else:
        targets, owner = batch["targets"].index_select(0, index), batch["seq_index"].index_select(0, index)
    logps = logprobs_from_logits(packed_logits(model, batch), targets)
    sums = torch.zeros(batch["num_sequences"], dtype=torch.float32, device=logps.device).index_add(0, owner, logps)
    n = 2 * batch.get("num_pairs", batch["num_sequences"] // 2)
    if token_logps:
        return sums[0:n:2], sums[1:n:2], logps, owner
    return sums[0:n:2], sums[1:n:2]


def graph_key(inputs: dict):
    """What fixes every shape of a padded batch (`pack_pairs`, `pack_padded`): its CUDA graph's key.

    None for batches of their own shapes (not padded), which then run eagerly.
    """
    if not inputs.get("static_shape"):
        return None
    return tuple((k, tuple(v.shape), v.dtype) if torch.is_tensor(v) else (k, v) for k, v in sorted(inputs.items()))


def log_graph_stats(stats) -> None:
    line = (f"cuda graphs: {stats.replayed} steps replayed, {stats.eager} eager (the first of each row length), "
            f"{stats.captured} graphs captured in {stats.capture_seconds:.1f}s")
    _log(line + (f"; capture failed: {stats.failure}" if stats.failure else ""))


class _AdapterSwap:
    """Inside this block the active adapter's LoRA weights hold another adapter's values; restored after.

    Copies, not a switch of the active adapter: the same parameters and the same code path, so
    the same compiled graph, compute with the other adapter's values (the adapter's name is a
    guard of the compiled code: switching adapters would compile the layers a second time).
    Three foreach copies of the adapter (~40 M values for a rank-16 7B) per use.
    """

    def __init__(self, model, other: str):
        active = model.active_adapter
        params = dict(model.named_parameters())
        self.mine, self.other = [], []
        for key, param in params.items():
            if f".{active}." in key and "lora_" in key:
                twin = key.replace(f".{active}.", f".{other}.")
                if twin not in params or params[twin].shape != param.shape:
                    raise ValueError(f"adapter {other!r} has no weight matching {key}")
                self.mine.append(param)
                self.other.append(params[twin])
        if not self.mine:
            raise ValueError(f"the active adapter {active!r} has no LoRA weights to swap")
        self.saved = [torch.empty_like(p) for p in self.mine]

    def __enter__(self):
        with torch.no_grad():
            torch._foreach_copy_(self.saved, self.mine)
            torch._foreach_copy_(self.mine, self.other)
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            torch._foreach_copy_(self.mine, self.saved)
        return False


def dpo_loss_arguments(sft_weight: float) -> dict:
    """DPOConfig's loss settings: TRL's sigmoid loss, plus its 'sft' NLL term on the chosen answer at
    `sft_weight` when it is above 0 (Iterative RPO's DPO + NLL at 1.0)."""
    if sft_weight > 0:
        return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]}
    return {"loss_type": ["sigmoid"], "loss_weights": None}


def chosen_nll(token_logps: torch.Tensor, owner: torch.Tensor, pairs: int, group_pairs: int | None = None) -> torch.Tensor:
    """TRL's 'sft' term: minus the mean log-prob of the chosen completions' tokens, taken per group of
    `group_pairs` consecutive pairs (the micro-batches TRL would have seen) and averaged over the groups.
    `owner` maps each token's log-prob to its sequence (2i chosen, 2i+1 rejected, >= 2 * pairs filler)."""
    # Masks and index_add, not boolean indexing: no host sync, fixed shapes for CUDA graphs.
    chosen_mask = ((owner % 2 == 0) & (owner < 2 * pairs)).to(token_logps.dtype)
    group = group_pairs if group_pairs and group_pairs < pairs else pairs
    groups = -(-pairs // group)
    if groups == 1:
        return -(token_logps * chosen_mask).sum() / chosen_mask.sum()
    group_of = torch.clamp(owner // (2 * group), max=groups - 1)  # filler tokens are masked out anyway
    sums = torch.zeros(groups, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, group_of, token_logps * chosen_mask)
    counts = torch.zeros(groups, dtype=token_logps.dtype, device=token_logps.device).index_add(0, group_of, chosen_mask)
    return -(sums / counts.clamp(min=1)).mean()


class FastDPOTrainer(DPOTrainerOverrides, _FastStep, DPOTrainer):
    """TRL's DPOTrainer (sigmoid loss, PEFT policy whose start is the reference) with the fast step."""

    def __init__(self, *args, compile: bool | None = None, reference_max_tokens: int = 16384,
                 cuda_graphs: bool | None = None,
                 graph_pad_multiple: int = GRAPH_PAD_MULTIPLE, share_prompt: bool = True,
                 nll_group_pairs: int | None = None, **kwargs):
        """`nll_group_pairs`: with TRL's 'sft' term, take its token mean over groups of this many pairs
        of the micro-batch and average the groups, which is TRL's loss for a batch of that many pairs
        accumulated over micro-batches, computed in one micro-batch (so the step can be a CUDA graph);
        None: one mean over the whole micro-batch."""
        args_ = kwargs.get("args")
        if args_ is None:
            raise ValueError("FastDPOTrainer needs args=DPOConfig(...)")
        self._loss_weights = dict(zip(args_.loss_type, args_.loss_weights or [1.0] * len(args_.loss_type)))
        bad = [t for t in args_.loss_type if t not in ("sigmoid", "sft")]
        if bad or "sigmoid" not in self._loss_weights or getattr(args_, "ld_alpha", None) is not None \
                or getattr(args_, "rpo_alpha", None) is not None or getattr(args_, "label_smoothing", 0) \
                or getattr(args_, "use_weighting", False):
            raise ValueError(f"FastDPOTrainer implements TRL's sigmoid loss (optionally plus its 'sft' term) only; "
                             f"got loss_type={args_.loss_type}")
        self.tokens_seen = 0
        self._pending_metrics = {"train": [], "eval": []}
        self._nll_group_pairs = nll_group_pairs
        self._compile = _default_compile() if compile is None else compile
        self._reference_max_tokens = reference_max_tokens
        self._swap = None
        self.reference_seconds = 0.0
        self._graphs = None
        self.graph_stats = None  # the last train()'s GraphStats, when it ran with CUDA graphs
        # By default on CUDA; on the CPU, cuda_graphs=True runs the same bookkeeping without capturing (tests).
        wants_graphs = (torch.cuda.is_available() and not args_.use_cpu) if cuda_graphs is None else cuda_graphs
        kwargs.setdefault("data_collator", PairCollator(args_.max_length, graph_pad_multiple if wants_graphs else None,
                                                        share_prompt=share_prompt))
        super().__init__(*args, **kwargs)
        if self.ref_model is not None:
            raise ValueError("FastDPOTrainer expects a PEFT policy whose starting adapter is the reference "
                             "(TRL's `ref` adapter copy), not a separate reference model")
        self._init_fast()
        self.graphs_off_reason = self._why_no_graphs() if wants_graphs else "turned off"
        if self.graphs_off_reason and isinstance(self.data_collator, PairCollator):
            self.data_collator.pad_multiple = None  # no graphs: no padding either

    @property
    def running_graph_stats(self):
        """The GraphStats of the train() under way (None before its first step on the graph path)."""
        return self._graphs.stats if self._graphs is not None else None

    def _why_no_graphs(self) -> str | None:
        """Why this trainer's steps cannot be CUDA graphs, or None (`graphs.py` says what a graph needs)."""
        args = self.args
        if args.gradient_accumulation_steps != 1:
            return "gradient accumulation: a graph's gradients are not summed over micro-batches"
        if self.accelerator.distributed_type not in PLAIN_DISTRIBUTED or args.n_gpu > 1:
            return f"{self.accelerator.distributed_type} training"
        if args.fp16 or getattr(args, "activation_offloading", False) or args.gradient_checkpointing:
            return "fp16 loss scaling, activation offloading or gradient checkpointing"
        dropouts = [m.p for m in self.model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if dropouts:
            return f"{len(dropouts)} dropout modules are on (random numbers in graphs are not tested here)"
        if not isinstance(self.data_collator, PairCollator):
            return "a data collator of the caller's (rows are not padded to a few shapes)"
        return None

    def train(self, *args, **kwargs):
        if self.graphs_off_reason and self.graphs_off_reason != "turned off" and torch.cuda.is_available():
            _log(f"cuda graphs off: {self.graphs_off_reason}")
        # The graph path all-reduces the adapter's gradients itself, and a DDP wrapper would make
        # every capture fail (`graphs.py`): accelerate prepares the model without it.
        without_ddp = not self.graphs_off_reason and self.accelerator.num_processes > 1
        try:
            with without_ddp_wrapper(self.accelerator, active=without_ddp):
                return self._train_fast(*args, **kwargs)
        finally:
            if self._graphs is not None:
                self.graph_stats = self._graphs.stats
                log_graph_stats(self.graph_stats)
            self._graphs = None  # its buffers and memory pool go with it

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, or with CUDA graphs: the forward and backward replayed as one graph.

        Every step of the graph path (replayed or, for a new row length, eager) runs on the
        unwrapped model (several ranks: no DDP wrapper, see `train`) and ends with the same one
        all-reduce of the adapter gradients (averaged, as DDP does), so ranks stay in step
        whichever way each one ran.
        """
        if self.graphs_off_reason or not self._fast_on:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        self.tokens_seen += inputs["num_real_tokens"]
        unwrapped = self.unwrapped(model)
        if self._graphs is None:
            from app.training.graphs import StepGraphs

            distributed.broadcast_params(self.trainable_parameters())  # as DDP would have, when it wrapped the model
            self._graphs = StepGraphs(self.trainable_parameters(), capture=self.args.device.type == "cuda", log=_log)

        def loss_fn(batch):
            # As the eager path: the mixed precision is accelerate's autocast around each forward, which
            # opens and closes inside the captured step, so no cached cast outlives a capture.
            with self.compute_loss_context_manager():
                return self._loss_and_metrics(unwrapped, unpack_batch(batch))

        step_inputs = {k: v for k, v in inputs.items() if k != "num_real_tokens"}
        loss, per_pair = self._graphs.step(graph_key(step_inputs), step_inputs, loss_fn)
        distributed.all_reduce_grads(self.trainable_parameters(), average=True)
        self._pending_metrics["train"].append(self.accelerator.gather(per_pair).mean(0))
        if self.args.torch_empty_cache_steps is not None and self.state.global_step % self.args.torch_empty_cache_steps == 0:
            torch.cuda.empty_cache()
        return loss

    def _reference(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs of the batch: precomputed, or TRL's frozen `ref` adapter on the same row.

        The reference runs on the unwrapped model (outside DDP: no gradient to sync). When the layers
        are compiled, it runs the policy's own compiled graph with the `ref` weights copied into the
        policy's adapter for this forward (`_AdapterSwap`): an inference graph, or a graph compiled
        for the other adapter, can fuse differently, and at step 0 the two would then differ by
        rounding instead of being equal. It is also one compilation instead of two. Nothing ever
        calls backward on it.
        """
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        from trl.trainer.utils import use_adapter

        unwrapped = self.unwrapped(model)
        name = "ref" if "ref" in unwrapped.peft_config else None  # None: adapters off, the base is the reference
        if self._compile and name:
            if self._swap is None:
                self._swap = _AdapterSwap(unwrapped, name)
            with self._swap:
                chosen, rejected = pair_sums(unwrapped, inputs)
        else:
            with torch.no_grad(), use_adapter(unwrapped, adapter_name=name):
                chosen, rejected = pair_sums(unwrapped, inputs)
        return chosen.detach(), rejected.detach()

    @torch.no_grad()
    def reference_logps(self, dataset):
        """`dataset` with the reference log-probs of every pair (`precompute_ref_log_probs=True`), from the
        policy as it starts, in large packed no-grad rows (overrides.py, item 14).

        Each rank computes every world_size-th pair; one all-reduce shares them.
        """
        import time

        started = time.perf_counter()
        model = self.accelerator.unwrap_model(self.model)
        rank, world_size = distributed.world()
        device = self.accelerator.device
        rows = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        mine = list(range(rank, len(rows), world_size))
        mine.sort(key=lambda i: -(2 * len(rows[i]["prompt_ids"]) + len(rows[i]["chosen_ids"]) +
                                  len(rows[i]["rejected_ids"])))
        out = torch.zeros(len(rows), 2, dtype=torch.float32, device=device)
        collate = PairCollator(self.args.max_length)
        # Without flash varlen (CPU) attention costs rows^2: keep the rows short there.
        budget = self._reference_max_tokens if uses_flash_varlen(device) else 2048
        was_training = model.training
        model.eval()
        with fast_path(model):
            start = 0
            while start < len(mine):
                group, used = [], 0
                while start < len(mine):
                    r = rows[mine[start]]
                    size = 2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                    if group and used + size > budget:
                        break
                    group.append(mine[start])
                    used += size
                    start += 1
                batch = collate([rows[i] for i in group])
                batch = unpack_batch({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
                    chosen, rejected = pair_sums(model, batch)
                idx = torch.tensor(group, device=device)
                out[idx, 0], out[idx, 1] = chosen, rejected
        model.train(was_training)
        out = distributed.all_reduce_sum(out).cpu()
        self.reference_seconds = time.perf_counter() - started
        dataset = dataset.add_column("ref_chosen_logps", out[:, 0].tolist())
        return dataset.add_column("ref_rejected_logps", out[:, 1].tolist())

    def _loss_and_metrics(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's loss and the (pairs, 6) metrics TRL logs, from one unpacked batch."""
        with self._fast_step(model):
            ref_chosen, ref_rejected = self._reference(model, inputs)
            chosen, rejected, token_logps, owner = pair_sums(model, inputs, token_logps=True)
        loss = dpo_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta).mean() * self._loss_weights["sigmoid"]
        if "sft" in self._loss_weights:  # TRL's: mean NLL over the chosen completions' tokens of a micro-batch
            loss = loss + chosen_nll(token_logps, owner, chosen.shape[0], self._nll_group_pairs) * self._loss_weights["sft"]

        # The metrics TRL logs (the dpo phase checks the step-0 loss and margin from them), kept on
        # the device until the step is logged: reading each back here (TRL's `.item()`) would make
        # the host wait for the forward before it could launch the backward.
        chosen_rewards = self.beta * (chosen - ref_chosen).detach()
        rejected_rewards = self.beta * (rejected - ref_rejected).detach()
        per_pair = torch.stack([chosen_rewards, rejected_rewards, (chosen_rewards > rejected_rewards).float(),
                                chosen_rewards - rejected_rewards, chosen.detach(), rejected.detach()])
        return loss, per_pair.t().contiguous()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = unpack_batch(inputs)
        self.tokens_seen += inputs["num_real_tokens"]
        loss, per_pair = self._loss_and_metrics(model, inputs)
        self._pending_metrics[mode].append(self.accelerator.gather(per_pair).mean(0))
        return (loss, None) if return_outputs else loss

    def read_metrics(self) -> dict[str, dict[str, list[float]]]:
        """The metrics of the steps since the last log, read back from the device at once (overrides.py, item 15)."""
        out = {}
        for mode, pending in self._pending_metrics.items():
            if pending:
                rows = torch.stack(pending).t().tolist()
                out[mode] = dict(zip(DPO_METRICS, rows))
                pending.clear()
        return out
