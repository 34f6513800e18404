"""A real ``redis-server`` for the tests: started on 127.0.0.1 on a free port, stopped after.

No persistence (``--save '' --appendonly no``), so a plain stop loses the data, as a crashed
cache would. ``restart(keep_data=True)`` stops it with ``SHUTDOWN SAVE`` first, so the data
comes back as from a Redis with persistence: what "Redis restarted under load" needs.
``make redis`` installs the server (Debian's package) when it is missing.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 10.0


def find_redis_server() -> str | None:
    """The ``redis-server`` binary on PATH, or None."""
    return shutil.which("redis-server")


def free_port() -> int:
    """A TCP port nobody listens on now (the server binds it right after)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(port: int, command: bytes, timeout_s: float = 1.0) -> bytes:
    # One inline command over a plain socket: no client library needed to tell it is up.
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(command + b"\r\n")
        try:
            return sock.recv(64)
        except ConnectionResetError:
            return b""


class RedisServer:
    """One redis-server process with its data folder (see the module docstring)."""

    def __init__(self, folder: Path, port: int | None = None, binary: str | None = None) -> None:
        found = binary or find_redis_server()
        if found is None:
            raise RuntimeError("redis-server is not on PATH; `make redis` installs it")
        self.binary = found
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start it and wait until it answers PING."""
        if self.running:
            return
        log = (self.folder / "redis.log").open("ab")
        self._process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.folder),
                "--protected-mode", "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited at start; see {self.folder}/redis.log")
            try:
                if _command(self.port, b"PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING in {START_TIMEOUT_S} s")
            time.sleep(0.02)

    def stop(self, *, save: bool = False) -> None:
        """Stop it; ``save``: write its data to the folder first (restored by start)."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # in case it was paused
            if save:
                # The server closes the connection as it exits: no reply to wait for.
                with contextlib.suppress(OSError):
                    _command(self.port, b"SHUTDOWN SAVE", timeout_s=5.0)
            else:
                (self.folder / "dump.rdb").unlink(missing_ok=True)
                process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections stay open and nothing answers."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def restart(self, *, keep_data: bool = True) -> None:
        """Stop and start again on the same port."""
        self.stop(save=keep_data)
        self.start()
