"""Run the real headless Chromium on an HTML string and report everything it did.

:func:`render` loads a page in a fresh, throw-away Chromium and returns a :class:`BrowserRun`:

* ``requests``: every request that left the page, as seen by a :class:`RecordingProxy`.
  Chromium is started with ``--proxy-server`` pointing at it and
  ``--proxy-bypass-list=<-loopback>``, so every URL (any host name, loopback included) goes
  to the proxy, which records the request line (``GET http://host/path``, or
  ``CONNECT host:443`` for https and WebSockets) and answers ``204 No Content``. Nothing
  reaches the network; name resolution is switched off too. WebRTC may not send UDP past
  the proxy (``--force-webrtc-ip-handling-policy``), so it cannot leave either.
* ``network``: the requests Chromium's DevTools Network domain reported, with how each one
  ended (``blocked_reason`` says ``csp`` for one a Content-Security-Policy stopped). A request
  the proxy never saw may be listed here: it was stopped inside the browser.
* ``dom``: the document's markup after load (what ``--dump-dom`` prints), ``screenshot``
  (PNG bytes, when asked) and ``measure`` (the JSON value of ``measure_js``, evaluated in the
  page after load; it runs even with ``javascript=False``, which only stops the page's own
  scripts).

The browser is driven over the Chrome DevTools Protocol (``--remote-debugging-port=0``, the
port read from the profile's ``DevToolsActivePort``) with aiohttp's websocket client. The page
is written to a file in a temporary folder and loaded from its ``file://`` URL, the way a
user opens a delivered page; the profile lives in the same folder, which is deleted
afterwards. Chromium runs in its own process group, killed as a whole at the end or on
timeout. Errors of any kind are :class:`BrowserError`.

Example::

    run = render('<img src="http://example.com/x.png">', javascript=False)
    assert [str(r) for r in run.requests] == ["GET http://example.com/x.png"]
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socketserver
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from bot.preview import CHROMIUM_NAMES, PNG_SIGNATURE, find_chromium

# After load, how long to wait for Chromium's "networkIdle" (no request in flight for 0.5 s).
_IDLE_WAIT_S = 3.0
_STARTUP_POLL_S = 0.05
_QUIET_FEATURES = (
    "NetworkTimeServiceQuerying",
    "OptimizationHints",
    "OptimizationHintsFetching",
    "OptimizationGuideModelDownloading",
    "Translate",
    "MediaRouter",
    "AutofillServerCommunication",
    "CertificateTransparencyComponentUpdater",
    "AimEligibilityService",
    "AimServerEligibilityEnabled",
    "LensOverlay",
    "PreconnectToSearch",
    "SearchEnginePreconnector",
    "PreconnectFromKeyedService",
    "SearchWarmup",
)
# What Chromium 150 still sends on its own with all of the above off, into the page's
# browser context too: bare tunnels to Google (no path, no page data). page_requests()
# leaves these out; requests keeps them.
CHROMIUM_SERVICE_TUNNELS = frozenset(
    {"CONNECT www.google.com:443", "CONNECT accounts.google.com:443"}
)


class BrowserError(Exception):
    """Chromium could not run the page; the message says why."""


# -- the recording proxy ----------------------------------------------------------------


@dataclass(frozen=True)
class ProxyRequest:
    """One request that reached the proxy: ``method`` and ``target`` as in the request line
    (an absolute URL for plain http, ``host:port`` for ``CONNECT``)."""

    method: str
    target: str

    def __str__(self) -> str:
        return f"{self.method} {self.target}"


class _ProxyHandler(socketserver.StreamRequestHandler):
    timeout = 5.0
    server: _ProxyServer

    def handle(self) -> None:
        try:
            line = self.rfile.readline(65536).decode("latin-1").strip()
        except OSError:
            return
        parts = line.split()
        if len(parts) < 2:
            return  # a connection that sent nothing (a preconnect, say)
        self.server.record(ProxyRequest(parts[0], parts[1]))
        with contextlib.suppress(OSError):
            # The headers are read (and ignored) so that closing the socket does not reset
            # a connection whose request Chromium is still writing.
            while self.rfile.readline(65536).strip():
                pass
            self.wfile.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n")
            self.wfile.write(b"Connection: close\r\n\r\n")


class _ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.lock = threading.Lock()
        self.seen: list[ProxyRequest] = []

    def record(self, request: ProxyRequest) -> None:
        with self.lock:
            self.seen.append(request)


class RecordingProxy:
    """An HTTP proxy on 127.0.0.1 (a free port) that records each request and answers 204.

    Use as a context manager; ``port`` and ``url`` are set while it runs, and ``requests``
    lists what arrived so far (a copy, in order of arrival)."""

    def __init__(self) -> None:
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RecordingProxy:
        self._server = _ProxyServer()
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="recording-proxy", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not running (use it as a context manager)")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[ProxyRequest]:
        if self._server is None:
            return []
        with self._server.lock:
            return list(self._server.seen)


# -- the result -------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkRequest:
    """A request Chromium's Network domain reported: ``error`` and ``blocked_reason`` are
    set when it failed (``blocked_reason`` is e.g. ``csp`` or ``mixed-content``)."""

    method: str
    url: str
    error: str | None = None
    blocked_reason: str | None = None


@dataclass
class BrowserRun:
    """What one :func:`render` saw (see the module docstring)."""

    requests: list[ProxyRequest]
    browser_requests: list[ProxyRequest]
    network: list[NetworkRequest]
    dom: str
    screenshot: bytes | None = None
    measure: Any = None
    console: list[str] = field(default_factory=list)

    def page_requests(self) -> list[ProxyRequest]:
        """``requests`` without Chromium's own tunnels (:data:`CHROMIUM_SERVICE_TUNNELS`):
        what the page made. A page's own https request to those two hosts would be left out
        too; a test of leaks should point its probes elsewhere."""
        return [r for r in self.requests if str(r) not in CHROMIUM_SERVICE_TUNNELS]

    def remote_network(self) -> list[NetworkRequest]:
        """``network`` without the page's own file and ``data:``/``blob:``/``about:`` URLs."""
        local = ("file:", "data:", "blob:", "about:", "chrome")
        return [r for r in self.network if not r.url.startswith(local)]


# -- Chromium ---------------------------------------------------------------------------


def chromium_args(
    binary: str, *, profile: Path, proxy_port: int, width: int, height: int
) -> list[str]:
    """The command line of a headless Chromium driven over DevTools, all traffic proxied."""
    args = [
        binary,
        "--headless",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
        f"--proxy-server=http://127.0.0.1:{proxy_port}",
        "--proxy-bypass-list=<-loopback>",
        # The proxy resolves names, so Chromium never needs to; nor may WebRTC go around it.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--force-webrtc-ip-handling-policy=disable_non_proxied_udp",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--disable-search-engine-choice-screen",
        "--metrics-recording-only",
        # Chromium's own calls home (time, hints, search preconnects, AI-mode eligibility):
        # they would go to the proxies too, and drown what the page did.
        "--disable-features=" + ",".join(_QUIET_FEATURES),
        "--no-first-run",
        "--no-default-browser-check",
        "--mute-audio",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
    args.append("about:blank")
    return args


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _stderr_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line[:200] for line in text[-lines:])


async def _devtools_url(profile: Path, process: asyncio.subprocess.Process, log: Path) -> str:
    """The browser's DevTools websocket, once Chromium has written ``DevToolsActivePort``."""
    marker = profile / "DevToolsActivePort"
    while True:
        if process.returncode is not None:
            raise BrowserError(
                f"Chromium exited with status {process.returncode} at start: {_stderr_tail(log)}"
            )
        with contextlib.suppress(OSError):
            lines = marker.read_text().split()
            if len(lines) >= 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        await asyncio.sleep(_STARTUP_POLL_S)


class _Cdp:
    """A minimal DevTools client: numbered commands, and every event kept in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(message.data)
                future = self._pending.pop(data.get("id", -1), None)
                if future is not None and not future.done():
                    future.set_result(data)
                elif "method" in data:
                    self.events.append(data)
                    self._changed.set()
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(BrowserError("the DevTools connection closed"))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self._ws.send_str(json.dumps(message))
        reply = await future
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message', reply['error'])}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def wait_for(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first event (kept so far or still to come) that ``match`` accepts."""
        seen = 0
        while True:
            for event in self.events[seen:]:
                if match(event):
                    return event
            seen = len(self.events)
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def _network_requests(events: list[dict[str, Any]]) -> list[NetworkRequest]:
    failures = {
        e["params"]["requestId"]: e["params"]
        for e in events
        if e["method"] == "Network.loadingFailed"
    }
    found = []
    for event in events:
        if event["method"] != "Network.requestWillBeSent":
            continue
        params = event["params"]
        failed = failures.get(params["requestId"], {})
        found.append(
            NetworkRequest(
                method=params["request"]["method"],
                url=params["request"]["url"],
                error=failed.get("errorText"),
                blocked_reason=failed.get("blockedReason"),
            )
        )
    return found


def _console_lines(events: list[dict[str, Any]]) -> list[str]:
    lines = []
    for event in events:
        if event["method"] == "Runtime.consoleAPICalled":
            args = event["params"].get("args", [])
            lines.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        elif event["method"] == "Runtime.exceptionThrown":
            details = event["params"]["exceptionDetails"]
            lines.append(details.get("exception", {}).get("description", details.get("text", "")))
    return lines


async def _open_page(
    cdp: _Cdp, *, proxy_url: str, javascript: bool, width: int, height: int
) -> str:
    """A new tab in a fresh browser context whose traffic all goes to ``proxy_url``; returns
    its DevTools session id.

    The context's own proxy is what separates the page's requests from Chromium's background
    traffic (account, time and search services), which uses the browser-wide proxy.
    """
    context = await cdp.send(
        "Target.createBrowserContext",
        {"disposeOnDetach": True, "proxyServer": proxy_url, "proxyBypassList": "<-loopback>"},
    )
    target = await cdp.send(
        "Target.createTarget",
        {"url": "about:blank", "browserContextId": context["browserContextId"]},
    )
    attached = await cdp.send(
        "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
    )
    session = str(attached["sessionId"])
    for method in ("Page.enable", "Network.enable", "Runtime.enable"):
        await cdp.send(method, session=session)
    await cdp.send("Page.setLifecycleEventsEnabled", {"enabled": True}, session)
    await cdp.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        session,
    )
    if not javascript:
        await cdp.send("Emulation.setScriptExecutionDisabled", {"value": True}, session)
    return session


async def _load(cdp: _Cdp, session: str, url: str, settle_s: float) -> None:
    """Navigate, wait for the load event, then for the network to go quiet."""
    navigated = await cdp.send("Page.navigate", {"url": url}, session)
    if navigated.get("errorText"):
        raise BrowserError(f"cannot load the page: {navigated['errorText']}")
    loader = navigated.get("loaderId")
    frame = navigated.get("frameId")
    # A page that navigates while it loads (a form submitted by a script, say) never fires
    # its load event; the main frame stopping loading ends the wait as well.
    await cdp.wait_for(
        lambda e: (
            e["method"] == "Page.loadEventFired"
            or (e["method"] == "Page.frameStoppedLoading" and e["params"].get("frameId") == frame)
        )
    )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            cdp.wait_for(
                lambda e: (
                    e["method"] == "Page.lifecycleEvent"
                    and e["params"]["name"] == "networkIdle"
                    and e["params"].get("loaderId") == loader
                )
            ),
            _IDLE_WAIT_S,
        )
    await asyncio.sleep(settle_s)


async def _evaluate(cdp: _Cdp, session: str, expression: str) -> Any:
    reply = await cdp.send(
        "Runtime.evaluate",
        {"expression": expression, "returnByValue": True, "awaitPromise": True},
        session,
    )
    if "exceptionDetails" in reply:
        details = reply["exceptionDetails"]
        text = details.get("exception", {}).get("description") or details.get("text", "")
        raise BrowserError(f"measure_js raised: {text[:500]}")
    return reply["result"].get("value")


async def _outer_html(cdp: _Cdp, session: str) -> str:
    # DOM.getOuterHTML works with the page's scripts off, where Runtime results could too,
    # but this is exactly what --dump-dom prints: the document element's markup.
    root = (await cdp.send("DOM.getDocument", {"depth": 1}, session))["root"]
    element = next((c for c in root.get("children", []) if c.get("nodeName") == "HTML"), root)
    reply = await cdp.send("DOM.getOuterHTML", {"nodeId": element["nodeId"]}, session)
    return str(reply["outerHTML"])


async def _drive(
    devtools: str,
    page_url: str,
    *,
    proxy_url: str,
    javascript: bool,
    width: int,
    height: int,
    screenshot: bool,
    measure_js: str | None,
    settle_s: float,
) -> tuple[str, bytes | None, Any, list[dict[str, Any]]]:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(devtools, max_msg_size=0) as ws,
    ):
        cdp = _Cdp(ws)
        try:
            session = await _open_page(
                cdp, proxy_url=proxy_url, javascript=javascript, width=width, height=height
            )
            await _load(cdp, session, page_url, settle_s)
            dom = await _outer_html(cdp, session)
            png = None
            if screenshot:
                shot = await cdp.send("Page.captureScreenshot", {"format": "png"}, session)
                png = base64.b64decode(shot["data"])
                if not png.startswith(PNG_SIGNATURE):
                    raise BrowserError("the screenshot is not a PNG")
            measured = None if measure_js is None else await _evaluate(cdp, session, measure_js)
            # No Browser.close: the caller kills the whole process group at once.
            return dom, png, measured, list(cdp.events)
        finally:
            await cdp.close()


async def render_async(
    html: str,
    *,
    javascript: bool,
    width: int = 1280,
    height: int = 800,
    screenshot: bool = False,
    measure_js: str | None = None,
    timeout_s: float = 20.0,
    chromium: str | None = None,
    settle_s: float = 0.2,
) -> BrowserRun:
    """:func:`render` for callers already inside an event loop."""
    binary = find_chromium(chromium)
    if binary is None:
        wanted = chromium or " / ".join(CHROMIUM_NAMES)
        raise BrowserError(
            f"no Chromium found ({wanted}): install it (apt-get install chromium) "
            "or pass chromium=<path>"
        )
    folder = Path(tempfile.mkdtemp(prefix="htmlbot-browser-"))
    try:
        page = folder / "page.html"
        page.write_text(html, encoding="utf-8")
        with RecordingProxy() as proxy, RecordingProxy() as background:
            result = await _run_chromium(
                binary,
                folder,
                page.as_uri(),
                proxy_port=background.port,
                proxy_url=proxy.url,
                javascript=javascript,
                width=width,
                height=height,
                screenshot=screenshot,
                measure_js=measure_js,
                timeout_s=timeout_s,
                settle_s=settle_s,
            )
            dom, png, measured, events = result
            # A request the browser sent just before it closed is still being recorded.
            await asyncio.sleep(0.05)
            requests = proxy.requests
            browser_requests = background.requests
        return BrowserRun(
            requests=requests,
            browser_requests=browser_requests,
            network=_network_requests(events),
            dom=dom,
            screenshot=png,
            measure=measured,
            console=_console_lines(events),
        )
    finally:
        await asyncio.to_thread(shutil.rmtree, folder, True)


async def _run_chromium(
    binary: str,
    folder: Path,
    page_url: str,
    *,
    proxy_port: int,
    timeout_s: float,
    **options: Any,
) -> tuple[str, bytes | None, Any, list[dict[str, Any]]]:
    profile = folder / "profile"
    profile.mkdir()
    log = folder / "chromium.log"
    args = chromium_args(
        binary,
        profile=profile,
        proxy_port=proxy_port,
        width=options["width"],
        height=options["height"],
    )
    # Chromium's caches and crash reports go to the temporary folder too.
    env = {**os.environ, "HOME": str(folder), "XDG_CONFIG_HOME": str(folder)}
    env["XDG_CACHE_HOME"] = str(folder)
    with log.open("wb") as stderr:
        try:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                env=env,
                start_new_session=True,  # its own process group, killed as a whole
            )
        except OSError as exc:
            raise BrowserError(f"cannot start {binary}: {exc}") from None

    async def session() -> tuple[str, bytes | None, Any, list[dict[str, Any]]]:
        devtools = await _devtools_url(profile, process, log)
        return await _drive(devtools, page_url, **options)

    try:
        return await asyncio.wait_for(session(), timeout_s)
    except TimeoutError:
        raise BrowserError(
            f"Chromium took over {timeout_s:.1f} s; killed ({_stderr_tail(log)})"
        ) from None
    except aiohttp.ClientError as exc:
        raise BrowserError(f"DevTools connection failed: {exc}") from None
    finally:
        _kill_group(process.pid)
        if process.returncode is None:
            await process.wait()


def render(
    html: str,
    *,
    javascript: bool,
    width: int = 1280,
    height: int = 800,
    screenshot: bool = False,
    measure_js: str | None = None,
    timeout_s: float = 20.0,
    chromium: str | None = None,
    settle_s: float = 0.2,
) -> BrowserRun:
    """Load ``html`` in a fresh headless Chromium and report what happened.

    ``javascript`` switches the page's own scripts on or off. ``measure_js``, when given, is
    evaluated in the page after load (a promise is awaited) and its JSON value returned as
    ``measure``. ``settle_s`` is an extra wait after the load event and the network going
    quiet, for timers the page set. The whole run is bounded by ``timeout_s``. Raises
    :class:`BrowserError` when Chromium is missing, fails, or runs too long. Not for use
    inside a running event loop: use :func:`render_async` there.
    """
    return asyncio.run(
        render_async(
            html,
            javascript=javascript,
            width=width,
            height=height,
            screenshot=screenshot,
            measure_js=measure_js,
            timeout_s=timeout_s,
            chromium=chromium,
            settle_s=settle_s,
        )
    )
