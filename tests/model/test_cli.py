"""``python -m model`` end to end: the embedded model, offline, writes a page that parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import html5lib
import pytest

from model.prompting import STYLE_HINTS, build_prompt, encode_prompt

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HTMLBOT_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "model", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.mark.slow
def test_embedded_model_writes_a_full_document_offline(cache: Path, tmp_path: Path) -> None:
    output = tmp_path / "bakery.html"
    first = run_cli(
        "generate", "a landing page for a bakery", "-o", str(output),
        "--max-new-tokens", "96", "--seed", "1",
        cache=cache,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert f"wrote {output}" in first.stdout
    assert len(list(cache.glob("embedded/smollm2-135m-instruct-*/config.json"))) == 1  # once

    document = output.read_text(encoding="utf-8")
    assert document.lower().startswith("<!doctype html>")
    parser = html5lib.HTMLParser(namespaceHTMLElements=False)
    tree = parser.parse(document)
    assert not parser.errors
    assert tree.find("head/title") is not None and tree.find("head/title").text
    assert tree.find("head/meta[@charset]") is not None
    assert tree.find("body") is not None
    assert "generating" in first.stderr  # the progress bar
    assert "converting the embedded model once" in first.stderr

    # Second run: the converted folder is reused (no new conversion message).
    second = run_cli(
        "generate", "a bakery", "-o", str(tmp_path / "again.html"),
        "--max-new-tokens", "8", "--seed", "1", "-v", "--mode", "document",
        cache=cache,
    )  # fmt: skip
    assert second.returncode == 0, second.stderr
    assert "converting the embedded model" not in second.stderr


def test_info_prints_the_resolved_setup(cache: Path) -> None:
    result = run_cli("info", "--preset", "codellama-html", "--quantize", "nf4", cache=cache)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["spec"]["base"] == "codellama/CodeLlama-7b-Instruct-hf"
    assert info["spec"]["adapter"] == "MG650/CodeLlama_HTML_FineTuned"
    assert info["spec"]["quantization"] == "nf4"
    assert info["device"] == "cpu"
    assert info["cache_dir"] == str(cache)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "   "], "error: the prompt is empty"),
        (["generate", "x" * 5000], "error: the prompt is 5000 characters; the limit is 2000"),
        (["generate", "a bakery", "--quantize", "nf4"], "error: quantization nf4 needs a CUDA GPU"),
        (
            ["generate", "a bakery", "--preset", "codellama-html"],
            "is a hub id but the hub is offline",
        ),
        (["generate", "a bakery", "--base", "/nonexistent/model"], "has no config.json"),
        (["generate", "a bakery", "--temperature", "-1"], "error: temperature must be >= 0"),
    ],
)
def test_cli_errors_are_one_clear_line(cache: Path, args: list[str], message: str) -> None:
    result = run_cli(*args, cache=cache)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_prompt_uses_the_chat_template_when_there_is_one(tiny_tokenizer: object) -> None:
    text = build_prompt(tiny_tokenizer, "a bakery", "dark")
    assert text.startswith("<|im_start|>system\n")
    assert "Create a web page: a bakery" in text
    assert STYLE_HINTS["dark"] in text
    assert text.endswith("<|im_start|>assistant\n")


def test_prompt_falls_back_to_codellama_instruct_format() -> None:
    class NoTemplate:
        chat_template = None
        bos_token = "<s>"

    text = build_prompt(NoTemplate(), "a bakery")
    assert text.startswith("<s>[INST] <<SYS>>\n")
    assert text.endswith("Create a web page: a bakery [/INST]")


def test_encoded_prompt_has_exactly_one_bos(
    tiny_tokenizer: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import PreTrainedTokenizerBase

    assert isinstance(tiny_tokenizer, PreTrainedTokenizerBase)
    # Force the [INST] format with its BOS text; monkeypatch puts the session tokenizer's
    # chat template back afterwards (``del`` would leave it with no template at all).
    monkeypatch.setattr(tiny_tokenizer, "chat_template", None)
    ids = encode_prompt(tiny_tokenizer, "a bakery")
    assert ids.count(tiny_tokenizer.bos_token_id) == 1
    assert ids[0] == tiny_tokenizer.bos_token_id
