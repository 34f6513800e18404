"""The page-quality benchmark: its measures on hand-made pages in the real Chromium, the PNG
decoder against a reference encoder, and one tiny end-to-end run of ``python -m bench.quality``.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import quality
from bench.png import decode_png, pixel_variance
from bench.quality import Judge
from bench.quality_measure import is_blank, is_complete, on_topic, page_remote_loads
from bench.quality_prompts import PROMPTS, Block, QualityPrompt
from bot.preview import find_chromium
from model.errors import HtmlExtractionError
from model.types import FinishReason, GenerationResult, PageMode, SafetyPolicy

BAKERY = QualityPrompt("bakery", "a landing page for a bakery", ("bakery", "bread"), ())
STYLED = "<style>body{font-family:sans-serif;background:#fdf3e7;margin:0}h1{color:#a0522d}</style>"


def doc(body: str, head: str = "") -> str:
    return f"<!DOCTYPE html><html><head><title>t</title>{head}</head><body>{body}</body></html>"


@pytest.fixture(scope="module")
def judge() -> Judge:
    assert find_chromium() is not None, "no Chromium on PATH; `make test` installs it"
    return Judge()


def measure(judge: Judge, html: str, prompt: QualityPrompt = BAKERY) -> dict:
    verdict, png = judge.measure(html, prompt)
    verdict["png"] = png
    return verdict


# -- in the real browser ---------------------------------------------------------------------


def test_empty_page_is_blank_and_a_page_with_text_is_not(judge: Judge) -> None:
    empty = measure(judge, doc(""))
    assert empty["blank"] and empty["words"] == 0
    # A background colour alone is still one flat colour: blank.
    assert measure(judge, doc("", STYLED))["blank"]
    text = measure(judge, doc("<h1>Fresh bread every morning</h1>"))
    assert not text["blank"] and text["png"]
    assert not is_blank(text["png"])


def test_styled_page_is_styled_and_plain_one_is_not(judge: Judge) -> None:
    plain = measure(judge, doc("<h1>Bakery</h1><p>Bread.</p>"))
    assert not plain["styled"] and plain["style_changes"] == []
    styled = measure(judge, doc("<h1>Bakery</h1><p>Bread.</p>", STYLED))
    assert styled["styled"]
    assert "body font-family" in styled["style_changes"]
    assert "h1 color" in styled["style_changes"]


def test_heading_sections_words_and_blocks(judge: Judge) -> None:
    body = (
        "<h1>The Lyon Bakery</h1>"
        "<section><h2>Breads</h2><section><h3>Rye</h3></section></section>"
        "<section><h2>Pastries</h2><p style='display:none'>hidden words here</p></section>"
        "<section><h2>Hours</h2><p>Open daily</p><button>Order now</button></section>"
        "<script>document.write('')</script>"
    )
    prompt = QualityPrompt("b", "p", ("bakery",), (Block.CARDS, Block.CTA, Block.FORM))
    m = measure(judge, doc(body, STYLED), prompt)
    assert m["heading"] == "The Lyon Bakery" and m["on_topic"]
    assert m["sections"] == 3  # the nested section is part of the first
    # Rendered text only: the hidden paragraph and the script are not counted.
    assert m["words"] == 11  # The Lyon Bakery Breads Rye Pastries Hours Open daily Order now
    assert m["missing"] == ["form"]
    assert m["complete"]


def test_off_topic_heading_and_first_heading_without_h1(judge: Judge) -> None:
    assert not measure(judge, doc("<h1>Welcome to our website</h1>"))["on_topic"]
    # Without an h1, the first heading of any level is the page's heading.
    m = measure(judge, doc("<h3>Our bread</h3><div><h2>x</h2><h2>y</h2></div>"))
    assert m["heading"] == "Our bread" and m["on_topic"]
    assert m["sections"] == 2  # no <section>: the h2 headings count


def test_form_and_questions_are_found(judge: Judge) -> None:
    body = (
        "<h1>Contact</h1><form><label>Name <input name=n></label>"
        "<input type=email><textarea></textarea><input type=submit value=Send></form>"
        "<dl><dt>Do you deliver?</dt><dd>Yes.</dd><dt>Is it vegan?</dt><dd>Some.</dd>"
        "<dt>When do you open?</dt><dd>At 7.</dd></dl>"
    )
    prompt = QualityPrompt("c", "p", ("contact",), (Block.FORM, Block.QUESTIONS, Block.TABLE))
    assert measure(judge, doc(body), prompt)["missing"] == ["table"]


def test_remote_image_is_counted_as_a_remote_load(judge: Judge) -> None:
    m = measure(judge, doc('<h1>Bakery</h1><img src="http://example.com/bread.png">'))
    assert m["remote_loads"] == 1
    assert m["remote_urls"] == ["GET http://example.com/bread.png"]
    assert measure(judge, doc("<h1>Bakery</h1>"))["remote_loads"] == 0


# -- without the browser ---------------------------------------------------------------------


def test_complete_document() -> None:
    assert is_complete(doc("<p>x</p>"))
    assert not is_complete("<html><head></head><body></body></html>")  # no doctype
    assert not is_complete("<!DOCTYPE html><html><body><p>x</p></body></html>")  # no head
    assert not is_complete("<!DOCTYPE html><html><head></head><body><p>cut")


def test_on_topic_matches_any_keyword_ignoring_case() -> None:
    assert on_topic("PASTRIES of Lyon", ("bakery", "pastr"))
    assert not on_topic("Welcome", ("bakery",))
    assert not on_topic(None, ("bakery",))


def test_remote_loads_leave_out_the_browsers_own_requests() -> None:
    proxied = ["CONNECT www.google.com:443", "GET http://cdn.test/a.js", "CONNECT fonts.test:443"]
    page = ["http://cdn.test/a.js", "https://fonts.test/css"]
    assert page_remote_loads(proxied, page) == proxied[1:]


def test_prompt_set() -> None:
    assert len(PROMPTS) >= 40
    assert len({p.id for p in PROMPTS}) == len(PROMPTS)
    for prompt in PROMPTS:
        assert prompt.keywords and all(prompt.keywords), prompt.id
        assert prompt.blocks, prompt.id


def _encode_png(image: np.ndarray) -> bytes:
    """A reference PNG encoder: every row filter in turn (0-4), computed the slow obvious way."""
    height, width, channels = image.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    flat = image.reshape(height, width * channels).astype(int)
    raw = bytearray()
    for y in range(height):
        kind, row = y % 5, flat[y]
        above = flat[y - 1] if y else np.zeros_like(row)
        out = []
        for i in range(len(row)):
            a = row[i - channels] if i >= channels else 0
            b, c = above[i], (above[i - channels] if i >= channels else 0)
            p = a + b - c
            paeth = min((abs(p - a), 0, a), (abs(p - b), 1, b), (abs(p - c), 2, c))[2]
            predictor = [0, a, b, (a + b) // 2, paeth][kind]
            out.append((row[i] - predictor) % 256)
        raw += bytes([kind, *out])

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(raw)))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels", [3, 4])
def test_png_decoder_undoes_every_row_filter(channels: int) -> None:
    image = np.random.default_rng(channels).integers(0, 256, (10, 7, channels), dtype=np.uint8)
    assert np.array_equal(decode_png(_encode_png(image)), image)
    # One flat colour is blank whatever the colour (the channels differ from each other).
    flat = np.empty((6, 5, channels), dtype=np.uint8)
    flat[...] = [253, 243, 231, 255][:channels]
    assert pixel_variance(_encode_png(flat)) == 0.0
    assert pixel_variance(_encode_png(image)) > 1000


# -- the CLI end to end ----------------------------------------------------------------------


def test_cli_runs_one_prompt_with_a_tiny_model(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = tmp_path / "pages", tmp_path / "report.json"
    argv = ["--mode", "document", "--base", str(tiny_llama_dir), "--only", "bakery"]
    argv += ["--max-new-tokens", "12", "--batch", "1", "--out", str(out), "--json", str(report)]
    assert quality.main(argv) == 0
    data = json.loads(report.read_text())
    (page,) = data["modes"]["document"]["pages"]
    assert page["id"] == "bakery" and 0 < page["generated_tokens"] <= 12
    assert (out / "document" / "bakery.html").read_text().lower().startswith("<!doctype html")
    assert (out / "document" / "bakery.png").read_bytes().startswith(b"\x89PNG")
    assert data["modes"]["document"]["totals"]["pages"] == 1
    printed = capsys.readouterr()
    assert "[1/1] document bakery" in printed.err and "| blank |" in printed.out
    # A second run with the same settings keeps the judged page instead of generating it.
    assert quality.main(argv) == 0
    assert "1 pages kept" in capsys.readouterr().err
    assert json.loads(report.read_text())["modes"]["document"]["pages"] == [page]


def _record(**measure: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "complete": True,
        "styled": True,
        "blank": False,
        "on_topic": True,
        "sections": 3,
    }
    base.update({"missing": [], "words": 100, "remote_loads": 0, "heading": "h"})
    base.update(measure)
    warnings = base.pop("warnings", [])
    return {"id": "p", "measure": base, "warnings": warnings, "seconds": base.pop("s", 10.0)}


def test_totals_and_the_compose_targets() -> None:
    good = [_record(words=90, s=12.0), _record(words=120, s=20.0)]
    totals = quality.summarize(good)
    assert totals["median_words"] == 105 and totals["median_s"] == 16.0
    assert all(quality.targets_met(PageMode.COMPOSE, totals).values())
    bad = quality.summarize([*good, _record(blank=True, words=0, missing=["form"], s=50.0)])
    met = quality.targets_met(PageMode.COMPOSE, bad)
    assert not met["blank"] and not met["sections_ok_pct"]
    assert met["median_words"] and bad["median_words"] == 90
    assert met["median_s"] and bad["median_s"] == 20.0 and bad["p90_s"] == 50.0
    slow = quality.summarize([_record(s=40.0), _record(s=31.0)])
    assert not quality.targets_met(PageMode.COMPOSE, slow)["median_s"]


def test_document_target_counts_failures_without_a_flag() -> None:
    flagged = _record(blank=True, words=0, warnings=["repaired"])
    assert quality.summarize([flagged])["unflagged_failures"] == 0
    unflagged = quality.summarize([flagged, _record(words=3)])
    assert unflagged["failures"] == 2 and unflagged["unflagged_failures"] == 1
    assert not quality.targets_met(PageMode.DOCUMENT, unflagged)["unflagged_failures"]


def test_an_answer_with_no_page_is_flagged_not_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_page(*args: object, **kwargs: object) -> None:
        raise HtmlExtractionError("nothing usable in the answer")

    monkeypatch.setattr(quality, "_product_page", no_page)
    result = GenerationResult("r", "", FinishReason.EOS, 5, 0, 0.0, 0.1)
    built = quality.build_page_for(result, "x", PageMode.DOCUMENT, None, SafetyPolicy.STANDARD)
    assert built.html == "" and built.warnings == ["no_page: nothing usable in the answer"]
