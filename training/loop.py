"""The training loop: native PyTorch on accelerate.

Mixed precision, gradient accumulation and multi-GPU (DDP through ``accelerate launch``) come
from accelerate; the rest is a plain loop: AdamW with linear warm-up and decay, gradient
clipping, a progress bar (loss, lr, tokens/s), eval loss and perplexity each epoch, optional
early stopping, checkpoints and ``--resume``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from training.config import TrainConfig
from training.data import Splits, load_splits
from training.errors import DataError, TrainingError
from training.evaluation import HEADLINE_MEASURES, eval_loss, generation_metrics
from training.export import (
    checkpoint_dir,
    find_checkpoint,
    load_checkpoint,
    push_to_hub,
    read_state,
    save_checkpoint,
    save_output,
)
from training.modeling import load_for_training
from training.tokenization import (
    Collator,
    Example,
    TokenizeReport,
    count_tokens,
    encode_pairs,
    pack,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from model.loading import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Tokenized data ready for the loop."""

    train: list[Example]
    eval: list[Example]
    train_report: TokenizeReport
    eval_report: TokenizeReport


def prepare_examples(config: TrainConfig, tokenizer: Any, splits: Splits) -> Prepared:
    """Tokenize both splits as ``config`` says (dropping or truncating overlong pairs,
    packing if asked); a train split with nothing left is a :class:`DataError`."""
    truncate = config.overlong == "truncate"
    train, train_report = encode_pairs(
        tokenizer,
        splits.train,
        config.max_seq_len,
        style=config.style,
        truncate=truncate,
        modes=config.page_modes,
        refine_fraction=config.refine_examples,
        seed=config.seed,
    )
    evaluation, eval_report = encode_pairs(
        tokenizer,
        splits.eval,
        config.max_seq_len,
        style=config.style,
        truncate=truncate,
        modes=config.page_modes,
        refine_fraction=config.refine_examples,
        seed=config.seed,
    )
    if not train:
        raise DataError(
            f"no training example fits in max_seq_len={config.max_seq_len} tokens "
            f"({train_report.dropped_too_long} too long, {train_report.compose_skipped} pages "
            "with too little text for a compose example); "
            "raise --max-seq-len or use --overlong truncate"
        )
    if config.packing:
        train = pack(train, config.max_seq_len)
        train_report.rows_after_packing = len(train)
        evaluation = pack(evaluation, config.max_seq_len) if evaluation else evaluation
    log.info(
        "tokenized: %d train examples (%d document, %d compose, %d refine; %d pairs without "
        "a compose example; %d dropped, %d truncated as too long), %d eval; %d target tokens, "
        "longest %d",
        train_report.examples,
        train_report.document_examples,
        train_report.compose_examples,
        train_report.refine_examples,
        train_report.compose_skipped,
        train_report.dropped_too_long,
        train_report.truncated,
        eval_report.examples,
        train_report.target_tokens,
        train_report.longest,
    )
    return Prepared(train, evaluation, train_report, eval_report)


def _mixed_precision(config: TrainConfig, device: torch.device) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _epoch_loader(
    examples: list[Example], config: TrainConfig, collator: Collator, epoch: int, shuffle: bool
) -> DataLoader[Example]:
    # A fresh generator seeded by (seed, epoch) makes each epoch's order reproducible, which
    # is what lets --resume skip exactly the batches the interrupted run had seen.
    if shuffle:
        generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
        sampler: Any = RandomSampler(examples, generator=generator)
    else:
        sampler = SequentialSampler(examples)
    return DataLoader(examples, batch_size=config.batch_size, sampler=sampler, collate_fn=collator)  # type: ignore[arg-type]


def _adapter_snapshot(model: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {
        key: value.detach().to("cpu", copy=True)
        for key, value in get_peft_model_state_dict(model).items()
    }


@dataclass
class TrainResult:
    """What a run produced: its metrics (also in metrics.json) and the trained PeftModel."""

    metrics: dict[str, Any]
    model: Any
    tokenizer: Any
    output_dir: Path


def train(config: TrainConfig) -> TrainResult:
    """Run a whole training job as ``config`` says; the output folder is written on return."""
    run = _Run.setup(config)
    if config.resume:
        run.resume(config.resume)
    else:
        run.measure_before()
    run.fit()
    return run.finish()


def _make_accelerator(config: TrainConfig) -> Accelerator:
    """The Accelerator for ``config``'s device, mixed precision and gradient accumulation."""
    from accelerate import Accelerator

    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    probe = torch.device("cpu") if cpu else torch.device("cuda")
    return Accelerator(
        cpu=cpu,
        mixed_precision=_mixed_precision(config, probe),
        gradient_accumulation_steps=config.grad_accum,
    )


@dataclass(frozen=True)
class _Schedule:
    """How many optimizer steps the run takes, per epoch and in all, and how many warm up."""

    steps_per_epoch: int
    total_steps: int
    warmup: int


def _plan_schedule(config: TrainConfig, batches_per_epoch: int) -> _Schedule:
    """Optimizer steps from this process's batches an epoch, the epochs and ``max_steps``."""
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = math.ceil(total_steps * config.warmup_ratio)
    return _Schedule(steps_per_epoch, total_steps, warmup)


def _initial_state(config: TrainConfig) -> dict[str, Any]:
    """The counters of a fresh run; checkpoints save this dict as their trainer state."""
    return {
        "run": _run_identity(config),
        "step": 0,
        "epoch": 0,
        "step_in_epoch": 0,
        "best_eval_loss": None,
        "epochs_without_improvement": 0,
        "history": [],
        "train_tokens": 0,
    }


def _initial_metrics(
    splits: Splits, prepared: Prepared, spec: Any, total_steps: int
) -> dict[str, Any]:
    """What is known of the run before it trains: data, token counts, base model, steps."""
    return {
        "data": {
            **splits.report.as_dict(),
            "train_rows": len(splits.train),
            "eval_rows": len(splits.eval),
        },
        "tokens": {
            "train": prepared.train_report.as_dict(),
            "eval": prepared.eval_report.as_dict(),
        },
        "base": spec.base,
        "quantization": str(spec.quantization),
        "total_steps": total_steps,
    }


@dataclass
class _Throughput:
    """Tokens, summed loss and micro-batches since the last optimizer step, and since when."""

    tokens: int = 0
    loss: float = 0.0
    batches: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, tokens: int, loss: float) -> None:
        """Count one micro-batch."""
        self.tokens += tokens
        self.loss += loss
        self.batches += 1

    def reset(self) -> None:
        """Start a new window (after an optimizer step)."""
        self.tokens, self.start, self.loss, self.batches = 0, time.perf_counter(), 0.0, 0


@dataclass
class _Run:
    """One training run: what :func:`train` builds, the counters it moves, and its steps."""

    config: TrainConfig
    accelerator: Accelerator
    loaded: LoadedModel  # its model is the unprepared PeftModel, used for generation metrics
    model: Any  # as accelerate prepared it (DDP-wrapped under several processes)
    unwrapped: Any
    trainable: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    collator: Collator
    prepared: Prepared
    eval_loader: Any
    eval_pairs: list[Any]
    schedule: _Schedule
    state: dict[str, Any]  # the counters; saved as the checkpoints' trainer state
    metrics: dict[str, Any]
    best_adapter: dict[str, torch.Tensor] | None = None
    progress: Any = None
    window: _Throughput = field(default_factory=_Throughput)

    @classmethod
    def setup(cls, config: TrainConfig) -> _Run:
        """Accelerator, data, model with a fresh adapter, optimizer, loaders and schedule."""
        from accelerate.utils import set_seed
        from transformers import get_linear_schedule_with_warmup

        # Accelerator first: under `accelerate launch` it picks this process's GPU.
        accelerator = _make_accelerator(config)
        set_seed(config.seed)
        device = accelerator.device  # this process's GPU under accelerate launch / torchrun

        splits = load_splits(config)
        loaded = load_for_training(config, device)
        prepared = prepare_examples(config, loaded.tokenizer, splits)
        # model.loading.load_tokenizer always sets a pad token.
        collator = Collator(loaded.tokenizer.pad_token_id, config.pad_to_multiple_of)

        trainable = [
            parameter for parameter in loaded.model.parameters() if parameter.requires_grad
        ]
        optimizer = torch.optim.AdamW(
            trainable, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        model, optimizer = accelerator.prepare(loaded.model, optimizer)
        eval_loader = accelerator.prepare(
            _epoch_loader(prepared.eval, config, collator, 0, shuffle=False)
        )

        batches_per_epoch = len(
            accelerator.prepare(_epoch_loader(prepared.train, config, collator, 0, True))
        )
        schedule = _plan_schedule(config, batches_per_epoch)
        # The scheduler is stepped by hand once per optimizer step, not prepared: accelerate's
        # wrapper would step it once per process.
        scheduler = get_linear_schedule_with_warmup(
            optimizer, schedule.warmup, schedule.total_steps
        )

        return cls(
            config=config,
            accelerator=accelerator,
            loaded=loaded,
            model=model,
            unwrapped=accelerator.unwrap_model(model),
            trainable=trainable,
            optimizer=optimizer,
            scheduler=scheduler,
            collator=collator,
            prepared=prepared,
            eval_loader=eval_loader,
            eval_pairs=splits.eval[: config.eval_generate],
            schedule=schedule,
            state=_initial_state(config),
            metrics=_initial_metrics(splits, prepared, loaded.spec, schedule.total_steps),
        )

    # --- before and after training ----------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Eval loss (all processes) and, on the main process, generation metrics: the
        before-training and after-training numbers are measured the same way."""
        result: dict[str, Any] = self._eval_loss()
        if self.accelerator.is_main_process and self.eval_pairs:
            result.update(
                generation_metrics(
                    self.loaded,
                    self.eval_pairs,
                    max_new_tokens=self.config.eval_max_new_tokens,
                    style=self.config.style,
                    seed=self.config.seed,
                    modes=self.config.page_modes,
                )
            )
        return result

    def resume(self, checkpoint: str) -> None:
        """Restore adapter, optimizer, scheduler, RNG and counters from the checkpoint
        ``--resume`` names ("latest" or a folder), after checking it was made with the same
        batch schedule."""
        folder = find_checkpoint(self.output_dir, checkpoint)
        _check_same_run(read_state(folder).get("run", {}), self.state["run"])
        self.state = load_checkpoint(folder, self.unwrapped, self.optimizer, self.scheduler)
        self.metrics["resumed_from_step"] = self.state["step"]
        self.metrics["before"] = self.state.get("before", {})

    def measure_before(self) -> None:
        """Evaluate the untrained adapter; kept in the state so a resumed run reports it too."""
        before = self.evaluate()
        self.metrics["before"] = before
        self.state["before"] = before
        log.info("before training: %s", _brief(before))

    def finish(self) -> TrainResult:
        """Restore the best epoch's adapter if early stopping kept one, evaluate, and write
        the output folder (and push it) on the main process."""
        state, metrics = self.state, self.metrics
        self._restore_best_adapter()
        after = self.evaluate()
        log.info("after training: %s", _brief(after))
        metrics.update(
            {
                "after": after,
                "steps": state["step"],
                "train_tokens": state["train_tokens"],
                "epochs": state.get("epochs", []),
                "history": state["history"],
            }
        )
        self._write_output()
        return TrainResult(metrics, self.unwrapped, self.loaded.tokenizer, self.output_dir)

    @property
    def output_dir(self) -> Path:
        """The folder the adapter, metrics and checkpoints go to."""
        return Path(self.config.output_dir)

    def _restore_best_adapter(self) -> None:
        """Put back the best epoch's adapter when later epochs did not improve on it."""
        if self.best_adapter is None or self.state["epochs_without_improvement"] <= 0:
            return
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.unwrapped, self.best_adapter)
        log.info(
            "restored the adapter of the best epoch (eval loss %.4f)", self.state["best_eval_loss"]
        )

    def _write_output(self) -> None:
        """The main process saves the output folder and pushes it if asked; all wait."""
        config, metrics = self.config, self.metrics
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_output(
                self.output_dir,
                self.unwrapped,
                self.loaded.tokenizer,
                config,
                self.loaded.spec,
                metrics,
            )
            if config.push_to_hub:
                assert config.hub_model_id is not None
                metrics["hub_url"] = push_to_hub(
                    self.output_dir, config.hub_model_id, config.hub_private
                )
                log.info("pushed to %s", metrics["hub_url"])
        self.accelerator.wait_for_everyone()

    # --- the training loop --------------------------------------------------------------------

    def fit(self) -> None:
        """Train epoch by epoch from where the state says until the steps run out or early
        stopping ends it; records the training time."""
        self.model.train()
        self.progress = self._open_progress()
        started = time.perf_counter()
        for epoch in range(self.state["epoch"], self.config.epochs):
            if self._out_of_steps():
                break
            self._train_epoch(epoch)
            self._end_epoch(epoch)
            if self._should_stop_early(epoch):
                break
        if self.progress is not None:
            self.progress.close()
        self.metrics["train_seconds"] = time.perf_counter() - started

    def _open_progress(self) -> Any:
        """A tqdm bar over the optimizer steps (on the local main process), or None."""
        if not (self.config.progress and self.accelerator.is_local_main_process):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.schedule.total_steps,
            initial=self.state["step"],
            desc="training",
            unit="step",
        )

    def _epoch_batches(self, epoch: int) -> Any:
        """This epoch's prepared train loader, less the batches a resumed run already saw."""
        state, config = self.state, self.config
        loader = self.accelerator.prepare(
            _epoch_loader(self.prepared.train, config, self.collator, epoch, shuffle=True)
        )
        skip = state["step_in_epoch"] * config.grad_accum if epoch == state["epoch"] else 0
        if skip:
            loader = self.accelerator.skip_first_batches(loader, skip)
        return loader

    def _out_of_steps(self) -> bool:
        """Whether the run has taken all its optimizer steps."""
        return bool(self.state["step"] >= self.schedule.total_steps)

    def _train_epoch(self, epoch: int) -> None:
        """One epoch's (remaining) batches, or fewer if the run's last step comes first."""
        loader = self._epoch_batches(epoch)
        self.state["epoch"] = epoch
        if not self.window.batches:
            # The previous epoch's evaluation and checkpoint are not training time: without
            # this, the first step's tokens/s would count them.
            self.window.reset()
        for batch in loader:
            loss = self._forward_backward(batch)
            self.window.add(count_tokens(batch), float(loss.detach()))
            if not self.accelerator.sync_gradients:
                continue  # gradients still accumulating: no optimizer step yet
            self._after_optimizer_step()
            if self._out_of_steps():
                return

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and backward one micro-batch; clip and step the optimizer when accelerate
        says the accumulated gradients are synced (its optimizer wrapper skips otherwise)."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            outputs = self.model(**batch, use_cache=False)
            accelerator.backward(outputs.loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        loss: torch.Tensor = outputs.loss
        return loss

    def _after_optimizer_step(self) -> None:
        """Step the scheduler and counters, record and show the step's loss, lr and
        throughput, and write a checkpoint when one is due."""
        state = self.state
        window = self.window
        processes = self.accelerator.num_processes
        self.scheduler.step()
        state["step"] += 1
        state["step_in_epoch"] += 1
        state["train_tokens"] += window.tokens * processes
        elapsed = time.perf_counter() - window.start
        loss = window.loss / max(window.batches, 1)
        tokens_per_s = window.tokens * processes / max(elapsed, 1e-9)
        lr = self.scheduler.get_last_lr()[0]
        state["history"].append({"step": state["step"], "loss": loss, "lr": lr})
        self._report_step(loss, lr, tokens_per_s)
        window.reset()
        if self._checkpoint_due():
            self._checkpoint()

    def _report_step(self, loss: float, lr: float, tokens_per_s: float) -> None:
        """Advance the progress bar and, every ``log_every`` steps, log the step."""
        step = self.state["step"]
        if self.progress is not None:
            self.progress.set_postfix(
                loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}"
            )
            self.progress.update(1)
        if step % self.config.log_every == 0:
            log.info("step %d: loss %.4f lr %.2e %.0f tokens/s", step, loss, lr, tokens_per_s)

    def _end_epoch(self, epoch: int) -> None:
        """Move the counters past a finished epoch, evaluate it, and checkpoint."""
        state = self.state
        # A run that ran out of steps inside the epoch keeps its place in it, so a resume
        # with more steps continues there.
        epoch_done = (
            not self._out_of_steps() or state["step_in_epoch"] >= self.schedule.steps_per_epoch
        )
        if epoch_done:
            state["epoch"] = epoch + 1
            state["step_in_epoch"] = 0
        self._evaluate_epoch(epoch)
        # Every epoch ends with a checkpoint, unless its last step just wrote one.
        if not self._checkpoint_due():
            self._checkpoint()

    def _evaluate_epoch(self, epoch: int) -> None:
        """Eval loss after an epoch: logged, kept in the state, and compared with the best so
        far for early stopping (whose best adapter is snapshotted)."""
        result = self._eval_loss()
        if not result:
            return
        state = self.state
        result.update({"epoch": epoch + 1, "step": state["step"]})
        state.setdefault("epochs", []).append(result)
        log.info(
            "epoch %d: eval loss %.4f, perplexity %.2f",
            epoch + 1,
            result["eval_loss"],
            result["perplexity"],
        )
        improved = (
            state["best_eval_loss"] is None or result["eval_loss"] < state["best_eval_loss"] - 1e-4
        )
        if improved:
            state["best_eval_loss"] = result["eval_loss"]
            state["epochs_without_improvement"] = 0
            if self.config.early_stopping_patience:
                self.best_adapter = _adapter_snapshot(self.unwrapped)
        else:
            state["epochs_without_improvement"] += 1

    def _should_stop_early(self, epoch: int) -> bool:
        """True (logged and put in the metrics) when the eval loss has not improved for
        ``early_stopping_patience`` epochs."""
        patience = self.config.early_stopping_patience
        if not (patience and self.state["epochs_without_improvement"] >= patience):
            return False
        log.info("early stopping: eval loss did not improve for %d epochs", patience)
        self.metrics["early_stopped_at_epoch"] = epoch + 1
        return True

    def _eval_loss(self) -> dict[str, Any]:
        """Eval loss and perplexity over the eval split (all processes); {} without one."""
        if not self.prepared.eval:
            return {}
        return eval_loss(self.model, self.eval_loader, self.accelerator)

    # --- checkpoints ------------------------------------------------------------------------

    def _checkpoint_due(self) -> bool:
        """Whether this step is one that ``save_every`` checkpoints."""
        return bool(self.config.save_every and self.state["step"] % self.config.save_every == 0)

    def _checkpoint(self) -> None:
        """Save a checkpoint of the current step on the main process; all processes wait."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(
                checkpoint_dir(self.config.output_dir, self.state["step"]),
                self.unwrapped,
                self.optimizer,
                self.scheduler,
                self.state,
                self.config.keep_checkpoints,
            )
        self.accelerator.wait_for_everyone()


# Settings that decide which batch comes at which step: resuming with other values would
# silently train on a different schedule than the checkpoint's.
_RUN_KEYS = (
    "data", "max_rows", "seed", "eval_fraction", "max_seq_len", "packing", "batch_size",
    "grad_accum", "epochs", "max_steps", "lora_r", "target_modules",
)  # fmt: skip


def _run_identity(config: TrainConfig) -> dict[str, Any]:
    values = config.to_dict()
    return {key: values[key] for key in _RUN_KEYS}


def _check_same_run(saved: dict[str, Any], current: dict[str, Any]) -> None:
    changed = [key for key in _RUN_KEYS if key in saved and saved[key] != current[key]]
    if changed:
        detail = ", ".join(f"{key} {saved[key]!r} -> {current[key]!r}" for key in changed)
        raise TrainingError(f"--resume: the checkpoint was made with other settings ({detail})")


def _brief(values: dict[str, Any]) -> str:
    shown = [
        f"{key} {values[key]:.3f}"
        for _, key in HEADLINE_MEASURES
        if isinstance(values.get(key), int | float)
    ]
    return ", ".join(shown) or "no eval data"


__all__ = ["TrainResult", "TrainingError", "prepare_examples", "train"]
