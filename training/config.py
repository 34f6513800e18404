"""The training config: one dataclass, filled from a YAML file and/or command-line flags.

Every field is a flag (``max_seq_len`` -> ``--max-seq-len``); ``--config run.yaml`` reads the
same names from YAML first, and flags given on the command line win. The resolved config is
saved next to the adapter (``training_config.yaml``) so a run can be repeated exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from training.errors import ConfigError

DEFAULT_DATASET = "jawerty/html_dataset"
DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

OverlongPolicy = Literal["drop", "truncate"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]


@dataclass
class TrainConfig:
    """All settings of one training run. Defaults are the production QLoRA recipe."""

    # --- data ---
    data: str = DEFAULT_DATASET  # hub dataset id, or a local .json/.jsonl/.csv/.parquet file
    data_split: str = "train"  # split of a hub dataset
    description_column: str = "label"
    page_column: str = "html"
    max_page_chars: int = 60_000  # longer pages are dropped or truncated (overlong)
    overlong: OverlongPolicy = "drop"  # also applies to sequences over max_seq_len tokens
    max_row_bytes: int = 2_000_000  # a bigger row is an error: it is not a web page
    max_rows: int | None = None  # use only the first N rows (quick experiments)
    eval_fraction: float = 0.1
    max_eval_rows: int = 200
    seed: int = 42

    # --- model ---
    preset: str | None = None  # a model.spec preset; default: the embedded SmolLM2
    base: str | None = None  # hub id or local folder of the base model
    quantization: str | None = None  # nf4 | int8 | none; default nf4 on CUDA, none elsewhere
    dtype: str = "auto"  # compute dtype: auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32
    device: str = "auto"  # auto | cpu | cuda; pick GPUs with CUDA_VISIBLE_DEVICES / accelerate
    trust_remote_code: bool = False
    gradient_checkpointing: bool = True

    # --- LoRA ---
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    train_lm_head: bool = False  # LoRA on lm_head too (the seed's adapter did: 687 MB)
    train_embeddings: bool = False

    # --- tokenization ---
    max_seq_len: int = 2048  # prompt + page + EOS, in tokens
    # Several whole examples in one row of up to max_seq_len tokens, kept apart by restarted
    # position ids. On by default: a QLoRA step costs about the same from 1k to 8k tokens, so
    # full rows train 1.3-4x faster than padded ones (bench/RESULTS.md, Training).
    packing: bool = True
    pad_to_multiple_of: int | None = 8
    style: str | None = None  # a model.prompting.STYLE_HINTS name used in every prompt

    # --- loop ---
    output_dir: str = "out/adapter"
    epochs: int = 3
    max_steps: int | None = None  # optimizer steps; stops before the epochs end if set
    batch_size: int = 4  # per device, per micro-batch
    grad_accum: int = 4
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    mixed_precision: MixedPrecision = "auto"  # auto: bf16 on CUDA, no elsewhere
    early_stopping_patience: int | None = None  # epochs without eval-loss improvement
    save_every: int = 0  # checkpoint every N optimizer steps (0: at each epoch's end only)
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    log_every: int = 10
    progress: bool = True

    # --- evaluation by generation ---
    eval_generate: int = 8  # eval prompts to generate pages for, before and after (0: off)
    eval_max_new_tokens: int = 1024

    # --- export ---
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values that can't work, naming the field."""
        positive = ["max_page_chars", "max_row_bytes", "max_seq_len", "epochs", "batch_size"]
        positive += ["grad_accum", "lora_r", "lora_alpha", "keep_checkpoints", "log_every"]
        positive += ["eval_max_new_tokens"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ["max_rows", "max_steps", "early_stopping_patience", "pad_to_multiple_of"]:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 when set, got {value}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.overlong not in ("drop", "truncate"):
            raise ConfigError(f"overlong must be 'drop' or 'truncate', got {self.overlong!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(
                f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}"
            )
        if self.quantization is not None and self.quantization not in ("nf4", "int8", "none"):
            raise ConfigError(f"quantization must be nf4, int8 or none, got {self.quantization!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(
                f"device must be auto, cpu or cuda, got {self.device!r}; "
                "choose GPUs with CUDA_VISIBLE_DEVICES or accelerate launch"
            )
        if self.eval_generate < 0 or self.save_every < 0:
            raise ConfigError("eval_generate and save_every must be >= 0")
        if not self.target_modules:
            raise ConfigError("target_modules must name at least one module")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("push_to_hub needs hub_model_id (e.g. you/codellama-html-lora)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (readable back with :func:`load_yaml`)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of a field's annotation."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return args[0], True
    return hint, False


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML or flag value into the field's type, with a clear error."""
    hint, optional = _base_type(_field_types()[name])
    if value is None or (
        optional and isinstance(value, str) and value.lower() in ("none", "null", "")
    ):
        if not optional:
            raise ConfigError(f"{name} can't be empty")
        return None
    origin = typing.get_origin(hint)
    try:
        if origin is Literal:
            allowed = typing.get_args(hint)
            if value not in allowed:
                raise ConfigError(
                    f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}"
                )
            return value
        if origin is list:
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            return [str(part) for part in value]
        if hint is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "yes", "no", "1", "0"):
                    raise ConfigError(f"{name} must be true or false, got {value!r}")
                return lowered in ("true", "yes", "1")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} must be a {getattr(hint, '__name__', hint)}, got {value!r}"
        ) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into field values (unknown keys are an error)."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {file} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"config file {file} is not valid YAML: {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {file} must hold a mapping of settings")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {file}: unknown setting {key!r}")
        values[name] = _coerce(name, value)
    return values


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field, plus ``--config``."""
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Fine-tune a LoRA adapter that writes HTML pages from descriptions.",
    )
    parser.add_argument("--config", help="YAML file with settings; flags override it")
    hints = _field_types()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint, _ = _base_type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        else:
            default = f.default_factory()  # type: ignore[operator]
        help_text = f"default: {default}"
        if hint is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif f.name == "resume":
            # `--resume` alone means the newest checkpoint in the output folder.
            parser.add_argument(flag, nargs="?", const="latest", default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)
    return parser


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Build the config from ``argv``: YAML file first (``--config``), then flags."""
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = _coerce(f.name, given)
    return TrainConfig(**values)
