"""PNG previews of pages: a screenshot by headless Chromium, run as a locked-down subprocess.

A page is untrusted model output (and its prompt is anyone's), so the browser that renders
it is shut off from everything but the page itself:

* the page is loaded as a ``data:`` URL, an opaque origin that can neither show local
  files (``<iframe src="file:///...">``) nor navigate to them (``<meta http-equiv=refresh>``),
  as it could from a ``file://`` URL;
* JavaScript is off (the temporary profile's content settings; the
  ``--blink-settings=scriptEnabled=false`` switch also stops the screenshot itself);
* there is no network: every request goes to a dead proxy, loopback included, and names
  do not resolve;
* a fresh profile in a temporary folder, deleted afterwards; ``--no-sandbox`` only as root,
  where Chromium refuses to start with its sandbox;
* a hard timeout that kills the whole process group, and a cap on the PNG's size.

Renders run off the event loop (an asyncio subprocess) and at most ``concurrency`` at once.
A failure of any kind is one log line and no preview: the page itself is never held back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_MAX_PNG_BYTES = 8 * 1024 * 1024
# Linux caps one command-line argument at 128 KiB (MAX_ARG_STRLEN), NUL included.
MAX_URL_BYTES = 128 * 1024 - 1
# JavaScript off for every site, in the profile (see the module docstring).
_PREFERENCES = {"profile": {"default_content_setting_values": {"javascript": 2}}}


class PreviewError(Exception):
    """The page could not be rendered; the message says why, in a few words."""


def find_chromium(configured: str | None = None) -> str | None:
    """The Chromium binary: ``configured`` (a path or a name on PATH), else the first of
    :data:`CHROMIUM_NAMES` on PATH; None when there is none."""
    if configured:
        return shutil.which(configured)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def data_url(html: bytes) -> str:
    """The page as a ``data:`` URL (base64, so any bytes survive the command line)."""
    return "data:text/html;charset=utf-8;base64," + base64.b64encode(html).decode("ascii")


def chromium_args(
    binary: str, *, url: str, profile: Path, screenshot: Path, width: int, height: int
) -> list[str]:
    """The command line that renders ``url`` into ``screenshot``."""
    args = [
        binary,
        "--headless",
        f"--user-data-dir={profile}",
        f"--screenshot={screenshot}",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
        # No network: a proxy nobody listens on, loopback included, and no name resolution.
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--mute-audio",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
    args.append(url)
    return args


def _make_profile() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="htmlbot-preview-"))
    (folder / "profile" / "Default").mkdir(parents=True)
    (folder / "profile" / "Default" / "Preferences").write_text(json.dumps(_PREFERENCES))
    return folder


def _read_png(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise PreviewError("Chromium wrote no screenshot") from None
    if size == 0:
        raise PreviewError("the screenshot is empty")
    if size > limit:
        raise PreviewError(f"the screenshot is {size} bytes, over the {limit}-byte cap")
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise PreviewError("the screenshot is not a PNG")
    return data


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class Previewer:
    """Renders pages to PNG with the Chromium at ``binary`` (see the module docstring)."""

    def __init__(
        self,
        binary: str,
        *,
        width: int = 1280,
        height: int = 800,
        timeout_s: float = 15.0,
        max_png_bytes: int = DEFAULT_MAX_PNG_BYTES,
        concurrency: int = 2,
    ) -> None:
        self.binary = binary
        self.width = width
        self.height = height
        self.timeout_s = timeout_s
        self.max_png_bytes = max_png_bytes
        self._slots = asyncio.Semaphore(concurrency)

    async def render(self, html: bytes, *, timeout_s: float | None = None) -> bytes:
        """The page's screenshot as PNG bytes, or :class:`PreviewError`.

        ``timeout_s`` (default: the previewer's) counts from the call, the wait for a free
        render slot included: a preview never holds a page back longer than that.
        """
        url = data_url(html)
        if len(url) > MAX_URL_BYTES:
            raise PreviewError(f"the page ({len(html)} bytes) is too big to preview")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout)
        except TimeoutError:
            raise PreviewError(f"no render slot was free within {timeout:.1f} s") from None
        try:
            folder = await asyncio.to_thread(_make_profile)
            try:
                return await self._run(url, folder, max(0.1, deadline - time.monotonic()))
            finally:
                await asyncio.to_thread(shutil.rmtree, folder, True)
        finally:
            self._slots.release()

    async def _run(self, url: str, folder: Path, limit_s: float) -> bytes:
        screenshot = folder / "page.png"
        args = chromium_args(
            self.binary,
            url=url,
            profile=folder / "profile",
            screenshot=screenshot,
            width=self.width,
            height=self.height,
        )
        # Chromium's caches and crash reports go to the temporary folder too.
        env = {**os.environ, "HOME": str(folder), "XDG_CONFIG_HOME": str(folder)}
        env["XDG_CACHE_HOME"] = str(folder)
        try:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group, killed as a whole
            )
        except OSError as exc:
            raise PreviewError(f"cannot start {self.binary}: {exc}") from None
        try:
            _out, err = await asyncio.wait_for(process.communicate(), limit_s)
        except TimeoutError:
            raise PreviewError(f"Chromium took over {limit_s:.1f} s; killed") from None
        finally:
            # Also on success: nothing it started may outlive the render.
            _kill_group(process.pid)
            if process.returncode is None:
                await process.wait()
        if process.returncode != 0:
            last = (err or b"").decode("utf-8", "replace").strip().splitlines()[-1:]
            detail = f": {last[0][:200]}" if last else ""
            raise PreviewError(f"Chromium exited with status {process.returncode}{detail}")
        return await asyncio.to_thread(_read_png, screenshot, self.max_png_bytes)

    async def try_render(
        self, html: bytes, *, what: str, timeout_s: float | None = None
    ) -> bytes | None:
        """:meth:`render`, or None after one log line saying why there is no preview."""
        started = time.monotonic()
        try:
            png = await self.render(html, timeout_s=timeout_s)
        except PreviewError as exc:
            log.warning("%s: no preview: %s", what, exc)
            return None
        except Exception:
            log.exception("%s: no preview: rendering failed unexpectedly", what)
            return None
        log.debug("%s: preview rendered in %.2f s", what, time.monotonic() - started)
        return png
