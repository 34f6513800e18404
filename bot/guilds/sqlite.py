"""Opening the local backend's settings database (aiosqlite), next to ``STATE_DB``.

WAL with ``synchronous=NORMAL`` like the job journal: a committed change survives the
process being killed. A file that is not a database (or is corrupt) is moved aside with a
warning and a new one started: losing the server settings is better than a bot that
doesn't start.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiosqlite

log = logging.getLogger(__name__)


def guild_db_path(settings: Any) -> Path:
    """Where the local backend keeps server settings and usage: beside the job journal
    (``htmlbot.sqlite3`` -> ``htmlbot-guilds.sqlite3``)."""
    journal = Path(settings.state_db_path)
    return journal.with_name(f"{journal.stem}-guilds.sqlite3")


async def open_database(path: Path | str, schema: str) -> aiosqlite.Connection:
    """A connection to ``path`` in WAL mode with ``schema`` applied (autocommit)."""
    path = Path(path)
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    try:
        return await _open(path, schema)
    except sqlite3.DatabaseError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        log.warning("%s is not a usable database (%s); moved to %s", path, exc, aside)
        await asyncio.to_thread(path.rename, aside)
        return await _open(path, schema)


async def _open(path: Path, schema: str) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        # Several bots' processes may share the file; a writer waits rather than fails.
        await conn.execute("PRAGMA busy_timeout=5000")
        await conn.executescript(schema)
    except BaseException:
        await conn.close()
        raise
    return conn
