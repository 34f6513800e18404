"""Page previews with the real headless Chromium: size, pixels, no JavaScript, no network,
no local files; and the failure paths (timeout, crash, no output) with fake "chromium"s.

One real render (``rendered``) is shared by the tests about what Chromium draws.
"""

from __future__ import annotations

import asyncio
import http.server
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from bot.preview import CHROMIUM_NAMES, Previewer, PreviewError, find_chromium
from tests.bot.png import png_pixels, png_size

WIDTH, HEIGHT = 400, 300  # not the default, so the setting is seen to work
TIMEOUT_S = 20.0

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


@dataclass
class Render:
    png: bytes
    seconds: float
    probe_hits: list[str]


class _Probe(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def outward_address() -> str:
    """This machine's address on its default route (no packet is sent), else loopback.

    Chromium itself keeps a ``data:`` page off loopback (Private Network Access), so only
    a probe on another interface shows that the no-network switches work.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def page_under_test(hosts: list[str], local_page: Path) -> bytes:
    """A page that shows a blue block, and would turn red with JavaScript, load things from
    the network (probes on ``hosts``, example.com), and show a green local file in a frame."""
    probes = "".join(
        f'<link rel="stylesheet" href="http://{host}/style.css">'
        f'<img src="http://{host}/probe.png" alt="">'
        for host in hosts
    )
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Bakery</title>
<style>html,body{{margin:0;background:#fff}} #block{{width:200px;height:100px;background:#00f}}
iframe{{width:150px;height:100px;border:0}}</style></head>
<body><div id="block"></div><h1>Fresh bread every day</h1>
<img src="http://example.com/img.png" alt="">{probes}
<iframe src="file://{local_page}"></iframe>
<script>document.documentElement.style.background = 'rgb(255,0,0)';
document.body.style.background = 'rgb(255,0,0)';</script>
</body></html>""".encode()


@pytest.fixture(scope="session")
def chromium() -> str:
    binary = find_chromium()
    assert binary is not None, f"no Chromium on PATH ({CHROMIUM_NAMES}); `make test` installs it"
    return binary


@pytest.fixture(scope="session")
def rendered(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Render]:
    """One real render of :func:`page_under_test`, shared by the tests below."""
    local_page = tmp_path_factory.mktemp("local") / "green.html"
    local_page.write_text("<html><body style='margin:0;background:#0f0'>local file</body></html>")
    _Probe.hits = []
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        previewer = Previewer(chromium, width=WIDTH, height=HEIGHT, timeout_s=TIMEOUT_S)
        port = server.server_address[1]
        page = page_under_test([f"127.0.0.1:{port}", f"{outward_address()}:{port}"], local_page)
        started = time.monotonic()
        png = asyncio.run(previewer.render(page))
        yield Render(png, time.monotonic() - started, list(_Probe.hits))
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def pixels(rendered: Render) -> list[list[tuple[int, int, int]]]:
    return png_pixels(rendered.png)


def near(pixel: tuple[int, int, int], colour: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= 16 for a, b in zip(pixel, colour, strict=True))


def count(pixels: list[list[tuple[int, int, int]]], colour: tuple[int, int, int]) -> int:
    return sum(near(p, colour) for row in pixels for p in row)


def test_preview_is_a_png_of_the_configured_size(rendered: Render) -> None:
    assert png_size(rendered.png) == (WIDTH, HEIGHT)
    assert rendered.seconds < TIMEOUT_S


def test_preview_shows_the_page(pixels: list[list[tuple[int, int, int]]]) -> None:
    assert len({p for row in pixels for p in row}) > 10  # not a blank image
    assert near(pixels[50][100], BLUE)  # the 200x100 block at the top left
    assert count(pixels, BLUE) >= 200 * 100 * 0.9
    assert near(pixels[HEIGHT - 5][WIDTH - 5], (255, 255, 255))


def test_javascript_does_not_run(pixels: list[list[tuple[int, int, int]]]) -> None:
    # The page's script would paint the whole background red.
    assert count(pixels, RED) == 0


def test_no_network(rendered: Render) -> None:
    # The stylesheets and images on the probe were never fetched; example.com did not
    # hold the render up either.
    assert rendered.probe_hits == []
    assert rendered.seconds < 10


def test_local_files_are_not_shown(pixels: list[list[tuple[int, int, int]]]) -> None:
    # An <iframe src="file://..."> would show the green local page.
    assert count(pixels, GREEN) == 0


# -- failure paths, with fake "chromium" scripts -----------------------------------------


def fake_chromium(folder: Path, body: str) -> Path:
    """An executable shell script standing in for Chromium; ``$out`` is its --screenshot."""
    script = folder / "chromium"
    script.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in --screenshot=*) out="${a#--screenshot=}";; esac; done\n'
        + body
        + "\n"
    )
    script.chmod(0o755)
    return script


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


async def test_a_render_that_hangs_is_killed_with_its_children(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pids = tmp_path / "pids"
    script = fake_chromium(tmp_path, f"sleep 60 & echo $! > {pids}\nwait")
    previewer = Previewer(str(script), timeout_s=0.5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bot.preview"):
        assert await previewer.try_render(b"<p>hi</p>", what="job x") is None
    assert time.monotonic() - started < 3
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("job x: no preview: Chromium took over 0.5 s")
    child = int(pids.read_text())
    for _ in range(50):
        if not _alive(child):
            break
        await asyncio.sleep(0.02)
    assert not _alive(child), "the render's child process outlived the timeout"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("echo 'it broke' >&2; exit 3", "exited with status 3: it broke"),
        ("exit 0", "wrote no screenshot"),
        (': > "$out"', "the screenshot is empty"),
        ('echo "not a png" > "$out"', "not a PNG"),
        ('head -c 5000 /dev/zero > "$out"', "over the 1000-byte cap"),
    ],
    ids=["crash", "no-output", "empty", "not-png", "too-big"],
)
async def test_failures_give_no_preview_and_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, body: str, reason: str
) -> None:
    previewer = Previewer(str(fake_chromium(tmp_path, body)), max_png_bytes=1000)
    with pytest.raises(PreviewError, match=reason):
        await previewer.render(b"<p>hi</p>")
    with caplog.at_level(logging.WARNING, logger="bot.preview"):
        assert await previewer.try_render(b"<p>hi</p>", what="job y") is None
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("job y: no preview: ") and reason in line


async def test_a_missing_binary_and_a_huge_page_are_errors_not_crashes(tmp_path: Path) -> None:
    with pytest.raises(PreviewError, match="cannot start"):
        await Previewer(str(tmp_path / "nothing-here")).render(b"<p>hi</p>")
    script = fake_chromium(tmp_path, "touch ran; exit 1")
    with pytest.raises(PreviewError, match="too big to preview"):
        await Previewer(str(script)).render(b"x" * 200_000)


async def test_at_most_two_renders_at_once(tmp_path: Path) -> None:
    log_file = tmp_path / "log"
    script = fake_chromium(
        tmp_path,
        f"echo start >> {log_file}; sleep 0.3; echo end >> {log_file}\n"
        "printf '\\211PNG\\r\\n\\032\\n' > \"$out\"",
    )
    previewer = Previewer(str(script), concurrency=2)
    results = await asyncio.gather(*(previewer.render(b"<p>x</p>") for _ in range(4)))
    assert all(r.startswith(b"\x89PNG") for r in results)
    running = peak = 0
    for event in log_file.read_text().split():
        running += 1 if event == "start" else -1
        peak = max(peak, running)
    assert peak == 2


async def test_the_wait_for_a_render_slot_counts_toward_the_timeout(tmp_path: Path) -> None:
    script = fake_chromium(tmp_path, "sleep 0.8; printf '\\211PNG\\r\\n\\032\\n' > \"$out\"")
    previewer = Previewer(str(script), concurrency=1)
    started = time.monotonic()
    first, second = await asyncio.gather(
        previewer.render(b"<p>1</p>", timeout_s=5),
        previewer.render(b"<p>2</p>", timeout_s=0.3),
        return_exceptions=True,
    )
    assert isinstance(first, bytes) and first.startswith(b"\x89PNG")
    assert isinstance(second, PreviewError) and "no render slot" in str(second)
    assert time.monotonic() - started < 3


def test_find_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = fake_chromium(tmp_path, "exit 0")
    assert find_chromium(str(script)) == str(script)
    assert find_chromium(str(tmp_path / "missing")) is None
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_chromium() == str(script)  # found by name on PATH
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_chromium() is None
