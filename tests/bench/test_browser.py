"""bench.browser with the real headless Chromium: what the proxy sees, JS on and off,
measure_js, screenshots, and the errors."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from bench.browser import BrowserError, ProxyRequest, RecordingProxy, render
from bot.preview import PNG_SIGNATURE, find_chromium

PAGE = """<!DOCTYPE html><html><head><title>static title</title></head><body>
<h1 id="h">no script ran</h1>
<img src="http://example.com/x.png" alt="">
<script>
document.title = "script title";
document.getElementById("h").textContent = "script ran";
fetch("http://fetch.example.org/api?x=1");
</script>
</body></html>"""


@pytest.fixture(scope="module", autouse=True)
def chromium() -> str:
    binary = find_chromium()
    assert binary is not None, "no Chromium on PATH: apt-get install chromium"
    return binary


def targets(requests: list[ProxyRequest]) -> list[str]:
    return [str(r) for r in requests]


def test_proxy_records_and_answers_204() -> None:
    with RecordingProxy() as proxy:
        handler = urllib.request.ProxyHandler({"http": proxy.url})
        opener = urllib.request.build_opener(handler)
        with opener.open("http://nowhere.invalid/path?q=1", timeout=5) as reply:
            assert reply.status == 204
            assert reply.read() == b""
        assert targets(proxy.requests) == ["GET http://nowhere.invalid/path?q=1"]


def test_javascript_off_loads_the_image_only() -> None:
    run = render(PAGE, javascript=False, measure_js="document.title")
    assert "GET http://example.com/x.png" in targets(run.page_requests())
    assert not any("fetch.example.org" in r.target for r in run.requests)
    assert run.measure == "static title"  # measure_js runs although the page's scripts don't
    assert "no script ran" in run.dom
    assert any(r.url == "http://example.com/x.png" for r in run.remote_network())


def test_javascript_on_runs_the_script() -> None:
    run = render(PAGE, javascript=True, measure_js="document.title", screenshot=True)
    seen = targets(run.page_requests())
    assert "GET http://example.com/x.png" in seen
    assert "GET http://fetch.example.org/api?x=1" in seen
    assert run.measure == "script title"
    assert "script ran" in run.dom
    assert run.screenshot is not None and run.screenshot.startswith(PNG_SIGNATURE)
    # Nothing but the page's two requests, and nothing of the page through the browser-wide
    # proxy (Chromium's own background traffic goes there).
    assert sorted(seen) == ["GET http://example.com/x.png", "GET http://fetch.example.org/api?x=1"]
    assert not any("example" in r.target for r in run.browser_requests)


def test_https_and_loopback_go_through_the_proxy() -> None:
    page = '<img src="https://secure.example.net/a.png"><img src="http://127.0.0.1:8080/b.png">'
    run = render(page, javascript=False)
    seen = targets(run.page_requests())
    assert "CONNECT secure.example.net:443" in seen
    assert "GET http://127.0.0.1:8080/b.png" in seen


def test_measure_returns_json_and_awaits_promises() -> None:
    run = render(
        "<p>a</p><p>b</p>",
        javascript=False,
        width=640,
        height=480,
        measure_js="Promise.resolve({n: document.querySelectorAll('p').length, w: innerWidth})",
    )
    assert run.measure == {"n": 2, "w": 640}


def test_measure_error_is_reported() -> None:
    with pytest.raises(BrowserError, match="measure_js raised"):
        render("<p>x</p>", javascript=False, measure_js="no_such_name.x")


def test_missing_chromium_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BrowserError, match="no Chromium found"):
        render("<p>x</p>", javascript=False, chromium=str(tmp_path / "nope"))


def test_timeout_kills_the_browser(tmp_path: Path) -> None:
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    with pytest.raises(BrowserError, match="took over"):
        render("<p>x</p>", javascript=False, chromium=str(fake), timeout_s=1)
