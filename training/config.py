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

from model.types import PageMode
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
PageModeSetting = Literal["document", "compose", "both"]


@dataclass
class TrainConfig:
    """All settings of one training run. Defaults are the production QLoRA recipe."""

    # --- data ---
    data: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "hub dataset id, or a local .json/.jsonl/.csv/.parquet file"},
    )
    data_split: str = field(default="train", metadata={"help": "split of a hub dataset to read"})
    description_column: str = field(
        default="label", metadata={"help": "column holding the page description (prompt)"}
    )
    page_column: str = field(
        default="html", metadata={"help": "column holding the page's HTML (the answer)"}
    )
    max_page_chars: int = field(
        default=60_000,
        metadata={"help": "pages longer than this many characters are overlong (see --overlong)"},
    )
    overlong: OverlongPolicy = field(
        default="drop",
        metadata={
            "help": "what to do with an overlong page or a sequence over --max-seq-len tokens: "
            "drop the row or truncate it"
        },
    )
    max_row_bytes: int = field(
        default=2_000_000,
        metadata={"help": "a row bigger than this many bytes is an error (it is not a web page)"},
    )
    max_rows: int | None = field(
        default=None,
        metadata={"help": "read only the first N rows, for quick experiments (none: all rows)"},
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "fraction of the rows held out for evaluation, in [0, 1)"}
    )
    max_eval_rows: int = field(
        default=200, metadata={"help": "at most this many held-out evaluation rows"}
    )
    seed: int = field(
        default=42,
        metadata={
            "help": "random seed: train/eval split, batch order, LoRA init, evaluation sampling"
        },
    )

    # --- model ---
    preset: str | None = field(
        default=None,
        metadata={
            "help": "model.spec preset (smollm2, codellama-html, ...); none: the embedded SmolLM2"
        },
    )
    base: str | None = field(
        default=None,
        metadata={"help": "hub id or local folder of the base model; overrides the preset's base"},
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "base weights' quantization: nf4, int8 or none "
            "(not given: nf4 on CUDA, none elsewhere)"
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "compute dtype: auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16 or float32"
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "auto, cpu or cuda; pick GPUs with CUDA_VISIBLE_DEVICES or accelerate launch"
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "run the base model's own Python code from the hub (only for models you trust)"
        },
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={
            "help": "recompute activations in the backward pass: much less memory, slower steps"
        },
    )

    # --- LoRA ---
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (size of the low-rank update)"})
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scale numerator: the update is scaled by alpha / r"}
    )
    lora_dropout: float = field(
        default=0.05, metadata={"help": "dropout on the LoRA input, in [0, 1)"}
    )
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={"help": "comma-separated linear layers that get LoRA adapters"},
    )
    train_lm_head: bool = field(
        default=False,
        metadata={"help": "LoRA on lm_head too (the seed's adapter did, which made it 687 MB)"},
    )
    train_embeddings: bool = field(
        default=False, metadata={"help": "LoRA on the input embeddings too"}
    )

    # --- tokenization ---
    max_seq_len: int = field(
        default=2048, metadata={"help": "longest training sequence: prompt + page + EOS, in tokens"}
    )
    # On by default: a QLoRA step costs about the same from 1k to 8k tokens, so full rows
    # train 1.3-4x faster than padded ones (bench/RESULTS.md, Training).
    packing: bool = field(
        default=True,
        metadata={
            "help": "pack several whole examples into each row of up to --max-seq-len tokens "
            "(kept apart by restarted position ids)"
        },
    )
    pad_to_multiple_of: int | None = field(
        default=8,
        metadata={
            "help": "pad each batch's length up to a multiple of N tokens (none: no rounding)"
        },
    )
    style: str | None = field(
        default=None,
        metadata={
            "help": "style hint put in every prompt: a model.prompting.STYLE_HINTS name "
            "(modern, minimal, playful, corporate, dark, retro) or free text"
        },
    )

    page_mode: PageModeSetting = field(
        default="document",
        metadata={
            "help": "which model.types.PageMode the adapter learns: document (continue the "
            "page skeleton inside <body>), compose (fill in the landing page's form, from "
            "content read out of each page that has enough text) or both (a document "
            "example per pair and a compose one where that works)"
        },
    )
    refine_examples: float = field(
        default=0.0,
        metadata={
            "help": "fraction of the pairs, in [0, 1], that also give a refine example in "
            "each page mode: the page and an instruction in the prompt (model.prompting's "
            "refine format), the page after that edit as the answer; the edits are made "
            "mechanically so the target is exact (document: new heading, added section, "
            "recolour, footer removed; compose: new tagline or button label, features or "
            "sections reordered)"
        },
    )

    # --- loop ---
    output_dir: str = field(
        default="out/adapter", metadata={"help": "folder for the adapter, checkpoints and config"}
    )
    epochs: int = field(default=3, metadata={"help": "passes over the training rows"})
    max_steps: int | None = field(
        default=None,
        metadata={"help": "stop after this many optimizer steps, even before the epochs end"},
    )
    batch_size: int = field(default=4, metadata={"help": "rows per micro-batch, per device"})
    grad_accum: int = field(
        default=4,
        metadata={
            "help": "micro-batches per optimizer step "
            "(effective batch = batch-size x this x devices)"
        },
    )
    learning_rate: float = field(
        default=2e-4, metadata={"help": "peak AdamW learning rate (after warm-up)"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(
        default=0.03,
        metadata={"help": "fraction of the steps spent warming the learning rate up, in [0, 1)"},
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "clip the gradient norm to this value"}
    )
    mixed_precision: MixedPrecision = field(
        default="auto",
        metadata={
            "help": "accelerate mixed precision: auto (bf16 on CUDA, no elsewhere), no, bf16, fp16"
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "stop after this many epochs without a better eval loss (none: never)"},
    )
    save_every: int = field(
        default=0,
        metadata={
            "help": "save a checkpoint every N optimizer steps (0: only at each epoch's end)"
        },
    )
    keep_checkpoints: int = field(
        default=2, metadata={"help": "how many of the newest checkpoints to keep"}
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "resume from a checkpoint folder, or 'latest' (the flag alone) "
            "for the newest one in --output-dir"
        },
    )
    log_every: int = field(
        default=10, metadata={"help": "log loss and throughput every N optimizer steps"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    # --- evaluation by generation ---
    eval_generate: int = field(
        default=8,
        metadata={
            "help": "held-out prompts to generate pages for, before and after training (0: off)"
        },
    )
    eval_max_new_tokens: int = field(
        default=1024, metadata={"help": "token budget of each of those evaluation pages"}
    )

    # --- export ---
    push_to_hub: bool = field(
        default=False, metadata={"help": "upload the adapter to the hub at the end"}
    )
    hub_model_id: str | None = field(
        default=None,
        metadata={"help": "hub repository for --push-to-hub, e.g. you/codellama-html-lora"},
    )
    hub_private: bool = field(default=True, metadata={"help": "make that hub repository private"})

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
        if not 0 <= self.refine_examples <= 1:
            raise ConfigError(f"refine_examples must be in [0, 1], got {self.refine_examples}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.overlong not in ("drop", "truncate"):
            raise ConfigError(f"overlong must be 'drop' or 'truncate', got {self.overlong!r}")
        if self.page_mode not in ("document", "compose", "both"):
            raise ConfigError(
                f"page_mode must be document, compose or both, got {self.page_mode!r}"
            )
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

    @property
    def page_modes(self) -> tuple[PageMode, ...]:
        """The page modes ``page_mode`` trains (and evaluation generates) in, in order."""
        if self.page_mode == "both":
            return (PageMode.DOCUMENT, PageMode.COMPOSE)
        return (PageMode(self.page_mode),)

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


def setting_help(name: str) -> str:
    """The description of config field ``name`` (the text its flag's ``--help`` shows)."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    return str(fields[name].metadata.get("help", ""))


def _shown_default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        default: Any = f.default
    else:
        default = f.default_factory()  # type: ignore[operator]
    if isinstance(default, list):
        return ",".join(default)
    return "none" if default is None else str(default)


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field, plus ``--config``."""
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Fine-tune a LoRA adapter that writes HTML pages from descriptions.",
        epilog="Every flag is also a key of the --config YAML file, with underscores "
        "(--max-seq-len 1024 is max_seq_len: 1024); flags given here win over the file.",
    )
    parser.add_argument("--config", help="YAML file with settings; flags override it")
    hints = _field_types()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint, _ = _base_type(hints[f.name])
        # argparse %-formats help texts, so a literal % must be doubled.
        described = setting_help(f.name).replace("%", "%%")
        help_text = f"{described} (default: {_shown_default(f)})"
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
