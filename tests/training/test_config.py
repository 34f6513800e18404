"""The training config: flags, YAML, precedence, validation, saving."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.types import PageMode
from training.config import DEFAULT_DATASET, TrainConfig, load_yaml, parse_config
from training.errors import ConfigError


def test_defaults_are_the_production_recipe() -> None:
    config = parse_config([])
    assert config.data == DEFAULT_DATASET
    assert (config.description_column, config.page_column) == ("label", "html")
    assert config.quantization is None  # nf4 on CUDA, none elsewhere (decided at load time)
    assert not config.train_lm_head and not config.train_embeddings
    assert "q_proj" in config.target_modules and "lm_head" not in config.target_modules


def test_flags_parse_types() -> None:
    config = parse_config(
        [
            "--learning-rate", "1e-3", "--epochs", "2", "--target-modules", "q_proj,v_proj",
            "--no-gradient-checkpointing", "--no-packing", "--max-steps", "none", "--resume",
        ]
    )  # fmt: skip
    assert config.learning_rate == 1e-3 and config.epochs == 2
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.gradient_checkpointing is False and config.packing is False
    assert config.max_steps is None
    assert config.resume == "latest"


def test_yaml_then_flags_override(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text("epochs: 5\nlora-r: 8\ntarget_modules: [q_proj, k_proj]\nbatch_size: 3\n")
    config = parse_config(["--config", str(file), "--epochs", "1"])
    assert config.epochs == 1  # the flag wins
    assert config.lora_r == 8 and config.batch_size == 3
    assert config.target_modules == ["q_proj", "k_proj"]


def test_saved_config_reads_back(tmp_path: Path) -> None:
    config = TrainConfig(epochs=2, base="some/base", packing=True, max_steps=7)
    config.save(tmp_path / "c.yaml")
    assert TrainConfig(**load_yaml(tmp_path / "c.yaml")) == config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--learning-rate", "abc"], "learning_rate must be a float"),
        (["--overlong", "cut"], "overlong must be one of"),
        (["--quantization", "fp8"], "quantization must be nf4, int8 or none"),
        (["--push-to-hub"], "push_to_hub needs hub_model_id"),
        (["--eval-fraction", "1.5"], "eval_fraction must be in"),
        (["--device", "cuda:1"], "device must be auto, cpu or cuda"),
        (["--page-mode", "markdown"], "page_mode must be one of"),
    ],
)
def test_bad_values_are_named(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


@pytest.mark.parametrize(
    ("setting", "modes"),
    [
        ("document", (PageMode.DOCUMENT,)),
        ("compose", (PageMode.COMPOSE,)),
        ("both", (PageMode.DOCUMENT, PageMode.COMPOSE)),
    ],
)
def test_page_mode(setting: str, modes: tuple[PageMode, ...]) -> None:
    assert parse_config([]).page_modes == (PageMode.DOCUMENT,)  # today's behaviour
    config = parse_config(["--page-mode", setting])
    assert config.page_mode == setting and config.page_modes == modes
    with pytest.raises(ConfigError, match="page_mode must be document, compose or both"):
        TrainConfig(page_mode="html")  # type: ignore[arg-type]


def test_unknown_yaml_key(tmp_path: Path) -> None:
    file = tmp_path / "run.yaml"
    file.write_text("epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'epochz'"):
        parse_config(["--config", str(file)])


def test_shipped_production_config_parses() -> None:
    file = Path(__file__).parents[2] / "training" / "configs" / "codellama-7b-qlora.yaml"
    config = parse_config(["--config", str(file)])
    assert config.base == "codellama/CodeLlama-7b-Instruct-hf" and config.quantization == "nf4"
    assert config.packing and not config.train_lm_head
