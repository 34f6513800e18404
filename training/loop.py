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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Tokenized data ready for the loop."""

    train: list[Example]
    eval: list[Example]
    train_report: TokenizeReport
    eval_report: TokenizeReport


def prepare_examples(config: TrainConfig, tokenizer: Any, splits: Splits) -> Prepared:
    truncate = config.overlong == "truncate"
    train, train_report = encode_pairs(
        tokenizer, splits.train, config.max_seq_len, style=config.style, truncate=truncate
    )
    evaluation, eval_report = encode_pairs(
        tokenizer, splits.eval, config.max_seq_len, style=config.style, truncate=truncate
    )
    if not train:
        raise DataError(
            f"no training example fits in max_seq_len={config.max_seq_len} tokens "
            f"({train_report.dropped_too_long} too long); "
            "raise --max-seq-len or use --overlong truncate"
        )
    if config.packing:
        train = pack(train, config.max_seq_len)
        train_report.rows_after_packing = len(train)
        evaluation = pack(evaluation, config.max_seq_len) if evaluation else evaluation
    log.info(
        "tokenized: %d train examples (%d dropped, %d truncated as too long), %d eval; "
        "%d target tokens, longest %d",
        train_report.examples,
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
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    output_dir = Path(config.output_dir)
    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    # Accelerator first: under `accelerate launch` it picks this process's GPU.
    probe = torch.device("cpu") if cpu else torch.device("cuda")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=_mixed_precision(config, probe),
        gradient_accumulation_steps=config.grad_accum,
    )
    set_seed(config.seed)
    device = accelerator.device  # this process's GPU under accelerate launch / torchrun

    splits = load_splits(config)
    loaded = load_for_training(config, device)
    model, tokenizer, spec = loaded.model, loaded.tokenizer, loaded.spec
    prepared = prepare_examples(config, tokenizer, splits)
    # model.loading.load_tokenizer always sets a pad token.
    collator = Collator(tokenizer.pad_token_id, config.pad_to_multiple_of)

    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_loader = accelerator.prepare(
        _epoch_loader(prepared.eval, config, collator, 0, shuffle=False)
    )

    batches_per_epoch = len(
        accelerator.prepare(_epoch_loader(prepared.train, config, collator, 0, True))
    )
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = math.ceil(total_steps * config.warmup_ratio)
    # The scheduler is stepped by hand once per optimizer step, not prepared: accelerate's
    # wrapper would step it once per process.
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)

    unwrapped = accelerator.unwrap_model(model)
    state: dict[str, Any] = {
        "run": _run_identity(config),
        "step": 0,
        "epoch": 0,
        "step_in_epoch": 0,
        "best_eval_loss": None,
        "epochs_without_improvement": 0,
        "history": [],
        "train_tokens": 0,
    }
    metrics: dict[str, Any] = {
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
    eval_pairs = splits.eval[: config.eval_generate]

    def evaluate() -> dict[str, Any]:
        """Eval loss (all processes) and, on the main process, generation metrics: the
        before-training and after-training numbers are measured the same way."""
        result: dict[str, Any] = eval_loss(model, eval_loader, accelerator) if prepared.eval else {}
        if accelerator.is_main_process and eval_pairs:
            result.update(
                generation_metrics(
                    loaded,
                    eval_pairs,
                    max_new_tokens=config.eval_max_new_tokens,
                    style=config.style,
                    seed=config.seed,
                )
            )
        return result

    if config.resume:
        folder = find_checkpoint(output_dir, config.resume)
        _check_same_run(read_state(folder).get("run", {}), state["run"])
        state = load_checkpoint(folder, unwrapped, optimizer, scheduler)
        metrics["resumed_from_step"] = state["step"]
        metrics["before"] = state.get("before", {})
    else:
        before = evaluate()
        metrics["before"] = before
        state["before"] = before
        log.info("before training: %s", _brief(before))

    best_adapter: dict[str, torch.Tensor] | None = None
    model.train()
    progress = None
    if config.progress and accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=state["step"], desc="training", unit="step")

    window_tokens, window_start, window_loss, window_batches = 0, time.perf_counter(), 0.0, 0
    stop = state["step"] >= total_steps
    started = time.perf_counter()
    for epoch in range(state["epoch"], config.epochs):
        if stop:
            break
        loader = accelerator.prepare(
            _epoch_loader(prepared.train, config, collator, epoch, shuffle=True)
        )
        skip = state["step_in_epoch"] * config.grad_accum if epoch == state["epoch"] else 0
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
        state["epoch"] = epoch
        for batch in loader:
            with accelerator.accumulate(model):
                outputs = model(**batch, use_cache=False)
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window_tokens += count_tokens(batch)
            window_loss += float(outputs.loss.detach())
            window_batches += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state["step"] += 1
            state["step_in_epoch"] += 1
            state["train_tokens"] += window_tokens * accelerator.num_processes
            elapsed = time.perf_counter() - window_start
            loss = window_loss / max(window_batches, 1)
            tokens_per_s = window_tokens * accelerator.num_processes / max(elapsed, 1e-9)
            lr = scheduler.get_last_lr()[0]
            state["history"].append({"step": state["step"], "loss": loss, "lr": lr})
            if progress is not None:
                progress.set_postfix(
                    loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}"
                )
                progress.update(1)
            if state["step"] % config.log_every == 0:
                log.info(
                    "step %d: loss %.4f lr %.2e %.0f tokens/s",
                    state["step"],
                    loss,
                    lr,
                    tokens_per_s,
                )
            window_tokens, window_start, window_loss, window_batches = (
                0,
                time.perf_counter(),
                0.0,
                0,
            )
            if config.save_every and state["step"] % config.save_every == 0:
                _checkpoint(accelerator, config, unwrapped, optimizer, scheduler, state)
            if state["step"] >= total_steps:
                stop = True
                break

        epoch_done = not stop or state["step_in_epoch"] >= steps_per_epoch
        if epoch_done:
            state["epoch"] = epoch + 1
            state["step_in_epoch"] = 0
        result = eval_loss(model, eval_loader, accelerator) if prepared.eval else {}
        if result:
            result.update({"epoch": epoch + 1, "step": state["step"]})
            state.setdefault("epochs", []).append(result)
            log.info(
                "epoch %d: eval loss %.4f, perplexity %.2f",
                epoch + 1,
                result["eval_loss"],
                result["perplexity"],
            )
            improved = (
                state["best_eval_loss"] is None
                or result["eval_loss"] < state["best_eval_loss"] - 1e-4
            )
            if improved:
                state["best_eval_loss"] = result["eval_loss"]
                state["epochs_without_improvement"] = 0
                if config.early_stopping_patience:
                    best_adapter = _adapter_snapshot(unwrapped)
            else:
                state["epochs_without_improvement"] += 1
        if not (config.save_every and state["step"] % config.save_every == 0):
            _checkpoint(accelerator, config, unwrapped, optimizer, scheduler, state)
        patience = config.early_stopping_patience
        if patience and state["epochs_without_improvement"] >= patience:
            log.info("early stopping: eval loss did not improve for %d epochs", patience)
            metrics["early_stopped_at_epoch"] = epoch + 1
            break
    if progress is not None:
        progress.close()

    metrics["train_seconds"] = time.perf_counter() - started
    if best_adapter is not None and state["epochs_without_improvement"] > 0:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(unwrapped, best_adapter)
        log.info("restored the adapter of the best epoch (eval loss %.4f)", state["best_eval_loss"])
    after = evaluate()
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
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_output(output_dir, unwrapped, tokenizer, config, spec, metrics)
        if config.push_to_hub:
            assert config.hub_model_id is not None
            metrics["hub_url"] = push_to_hub(output_dir, config.hub_model_id, config.hub_private)
            log.info("pushed to %s", metrics["hub_url"])
    accelerator.wait_for_everyone()
    return TrainResult(metrics, unwrapped, tokenizer, output_dir)


def _checkpoint(
    accelerator: Any,
    config: TrainConfig,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict[str, Any],
) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(
            checkpoint_dir(config.output_dir, state["step"]),
            model,
            optimizer,
            scheduler,
            state,
            config.keep_checkpoints,
        )
    accelerator.wait_for_everyone()


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
