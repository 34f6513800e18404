"""The local backend's job journal: SQLite, so a killed one-process bot resumes its jobs.

One row per job, written at each transition (submitted, started, finished, delivered).
After a SIGKILL or an out-of-memory kill, :meth:`JobJournal.load_unfinished` gives back the
jobs that were queued or running (to run again, in their old order) and the ones that
finished but whose user was never told (to deliver). Nothing else reads it: the queue itself
stays in memory (``bot.scheduler``); the journal only has to be right at the moment of a kill.

Why this shape:

* **WAL and ``synchronous=NORMAL``.** A write is an append to the WAL file: fast enough to
  do inline at every transition (well under a millisecond), and a committed transaction
  survives the process being killed (it is in the OS's page cache; only a power loss can
  lose the last ones, and then the bot's interactions are gone too).
* **One connection behind a lock.** The event loop (through ``asyncio.to_thread``) and the
  worker thread share it; every method is short and blocking.
* **The job as the Redis backend's flat fields** (``bot.queue.codec``), JSON-encoded in one
  column, plus the few columns the queries need. Times are wall-clock (``time.time()``) in
  the file, since monotonic times die with the process, and become monotonic again on load.
* **Never the reason the bot stops.** A file that is corrupt or not a database is renamed
  aside with a warning and a new one started; an error later is logged and the bot goes on
  without that row (worst case: a job is not resumed after a crash).

The file holds interaction tokens (15-minute webhook secrets): it is created ``0600``, and
no log line here prints a row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bot.jobs import Job, JobState
from bot.queue.codec import CodecError, decode_job, encode_job

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL,
    state TEXT NOT NULL,
    fields TEXT NOT NULL,
    deadline REAL NOT NULL,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    order_round INTEGER NOT NULL DEFAULT 0,
    order_seq INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_undelivered ON jobs (delivered, state);
"""
_PENDING = (JobState.QUEUED.value, JobState.RUNNING.value)


class JobJournal:
    """A SQLite file of the local backend's jobs (see the module docstring)."""

    def __init__(self, path: Path | str, *, prune_after_s: float = 86400.0) -> None:
        self.path = Path(path)
        self.prune_after_s = prune_after_s
        self._lock = threading.Lock()
        self._conn = self._open()
        self.prune()

    # -- writes ------------------------------------------------------------------------

    def record_submitted(self, job: Job, order_key: tuple[int, int] | None = None) -> None:
        """The job is queued (new, put back after an out-of-memory, or restored).

        ``order_key`` is its place in the queue (``Scheduler.order_key``), which
        :meth:`load_unfinished` sorts by; :meth:`set_order` can give it later.
        """
        wall, mono = time.time(), time.monotonic()
        round_, seq = order_key or (0, 0)
        row = (
            job.job_id,
            job.user_id,
            job.state.value,
            self._encode(job),
            wall + job.expires_at - mono,
            wall + job.created_at - mono,
            round_,
            seq,
            wall,
        )
        self._execute(
            "record_submitted",
            """INSERT INTO jobs (job_id, user_id, state, fields, deadline, submitted_at,
                   order_round, order_seq, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (job_id) DO UPDATE SET
                   state = excluded.state, fields = excluded.fields,
                   deadline = excluded.deadline, order_round = excluded.order_round,
                   order_seq = excluded.order_seq, started_at = NULL, finished_at = NULL,
                   delivered = 0, updated_at = excluded.updated_at""",
            row,
        )

    def set_order(self, job_id: str, order_key: tuple[int, int]) -> None:
        """The queued job's place (known once the scheduler has queued it)."""
        self._execute(
            "set_order",
            "UPDATE jobs SET order_round = ?, order_seq = ? WHERE job_id = ?",
            (order_key[0], order_key[1], job_id),
        )

    def record_started(self, job: Job) -> None:
        """The worker took the job (RUNNING; its attempts count went up)."""
        self._update_state("record_started", job, "started_at")

    def record_finished(self, job: Job) -> None:
        """The job ended (DONE, FAILED, CANCELLED or EXPIRED), with its result, error and
        cancel note; it stays in the journal until :meth:`record_delivered`."""
        self._update_state("record_finished", job, "finished_at")

    def record_cancel_requested(self, job_id: str) -> None:
        """The user cancelled the running job: a restart must not run it again."""
        # Only that field: the worker may be recording the job's end at the same moment.
        self._execute(
            "record_cancel_requested",
            """UPDATE jobs SET fields = json_set(fields, '$.cancel_requested', '1'),
                   updated_at = ? WHERE job_id = ?""",
            (time.time(), job_id),
        )

    def record_delivered(self, job_id: str) -> None:
        """The user has been told the job's outcome: a restart must not deliver it again."""
        self._execute(
            "record_delivered",
            "UPDATE jobs SET delivered = 1, updated_at = ? WHERE job_id = ?",
            (time.time(), job_id),
        )

    def forget(self, job_id: str) -> None:
        """Drop the job's row (e.g. the queue refused it after it was journaled)."""
        self._execute("forget", "DELETE FROM jobs WHERE job_id = ?", (job_id,))

    def prune(self, older_than_s: float | None = None) -> int:
        """Drop rows untouched for ``older_than_s`` (default ``prune_after_s``) that no
        restart needs: delivered ones, and ones whose interaction token is dead anyway
        (a finished page whose token died was kept in the page store when it was
        delivered... or is lost with its row after this long). Returns how many."""
        now = time.time()
        cutoff = now - (self.prune_after_s if older_than_s is None else older_than_s)
        with self._cursor("prune") as cursor:
            if cursor is None:
                return 0
            cursor.execute(
                "DELETE FROM jobs WHERE updated_at < ? AND (delivered = 1 OR deadline < ?)",
                (cutoff, now),
            )
            return cursor.rowcount
        return 0  # the error was logged

    # -- the restart -------------------------------------------------------------------

    def load_unfinished(self) -> list[Job]:
        """What a restart must pick up, as Jobs with monotonic times of this process.

        First the jobs that were queued or running (RUNNING ones first, then the queued in
        their old take order; states as recorded, so the caller can tell who was already
        running), then the finished ones never delivered, oldest first. Rows that can't be
        decoded are logged and dropped.
        """
        with self._cursor("load_unfinished") as cursor:
            if cursor is None:
                return []
            rows = cursor.execute(
                f"""SELECT job_id, state, fields, deadline, submitted_at, started_at,
                           finished_at
                    FROM jobs WHERE delivered = 0
                    ORDER BY state NOT IN {_PENDING!r}, state != 'running',
                             CASE WHEN state IN {_PENDING!r} THEN order_round END,
                             CASE WHEN state IN {_PENDING!r} THEN order_seq END,
                             finished_at, submitted_at"""
            ).fetchall()
        wall, mono = time.time(), time.monotonic()
        jobs: list[Job] = []
        for job_id, state, fields_json, *times in rows:
            job = self._decode(job_id, state, fields_json, times, wall, mono)
            if job is None:
                self.forget(job_id)
            else:
                jobs.append(job)
        return jobs

    def close(self) -> None:
        """Close the file (the journal is unusable afterwards)."""
        with self._lock:
            self._conn.close()

    # -- internals ---------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        for attempt in range(2):
            try:
                return self._connect()
            except sqlite3.DatabaseError as exc:
                if attempt or not _is_corrupt(exc):
                    error: Exception = exc
                    break
                aside = self._move_aside()
                log.warning(
                    "job journal %s is unreadable (%s); moved it to %s and started a new "
                    "one: jobs queued before the last stop are not resumed",
                    self.path,
                    exc,
                    aside,
                )
            except (sqlite3.Error, OSError) as exc:
                error = exc
                break
        log.error(
            "can't open a job journal at %s (%s): jobs will not survive a restart",
            self.path,
            error,
        )
        return self._connect(memory=True)

    def _connect(self, *, memory: bool = False) -> sqlite3.Connection:
        target = ":memory:"
        if not memory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _create_private(self.path)
            target = str(self.path)
        conn = sqlite3.connect(target, check_same_thread=False, isolation_level=None, timeout=5)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            (check,) = conn.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version not in (0, SCHEMA_VERSION):
                raise sqlite3.DatabaseError(f"schema version {version}, expected {SCHEMA_VERSION}")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        if not memory:
            for suffix in ("-wal", "-shm"):  # SQLite copies the mode, but make sure
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(f"{self.path}{suffix}", 0o600)
        return conn

    def _move_aside(self) -> Path:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        return aside

    @contextlib.contextmanager
    def _cursor(self, what: str) -> Iterator[sqlite3.Cursor | None]:
        # Yields None after logging when the database fails: the journal is best effort.
        with self._lock:
            try:
                cursor = self._conn.cursor()
            except sqlite3.Error as exc:
                log.warning("job journal: %s failed (%s)", what, exc)
                yield None
                return
            try:
                yield cursor
            except sqlite3.Error as exc:
                log.warning("job journal: %s failed (%s)", what, exc)
            finally:
                cursor.close()

    def _execute(self, what: str, sql: str, params: tuple[object, ...]) -> None:
        with self._cursor(what) as cursor:
            if cursor is not None:
                cursor.execute(sql, params)

    def _update_state(self, what: str, job: Job, time_column: str) -> None:
        wall = time.time()
        self._execute(
            what,
            f"UPDATE jobs SET state = ?, fields = ?, {time_column} = ?, updated_at = ? "
            "WHERE job_id = ?",
            (job.state.value, self._encode(job), wall, wall, job.job_id),
        )

    @staticmethod
    def _encode(job: Job) -> str:
        return json.dumps(encode_job(job), ensure_ascii=False)

    @staticmethod
    def _decode(
        job_id: str,
        state: str,
        fields_json: str,
        times: list[float | None],
        wall: float,
        mono: float,
    ) -> Job | None:
        deadline, submitted_at, started_at, finished_at = times
        try:
            fields = json.loads(fields_json)
            if not isinstance(fields, dict):
                raise CodecError("not an object")
            fields["state"] = state
            stamps = {
                "deadline": deadline,
                "submitted_at": submitted_at,
                "started_at": started_at,
                "finished_at": finished_at,
            }
            fields.update({name: repr(value) for name, value in stamps.items() if value})
            # The codec's "Redis clock" is the wall clock here: same conversion.
            return decode_job(fields, redis_now=wall, mono_now=mono)
        except (CodecError, ValueError, TypeError) as exc:
            # No row content in the message: it holds the interaction token.
            log.warning("job journal: dropped undecodable job %s (%s)", job_id, type(exc).__name__)
            return None


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    # Corrupt or not a database: move it aside. Locked, read-only, out of disk space...:
    # the file may be fine, so leave it alone and run without a journal this time.
    name = getattr(exc, "sqlite_errorname", None)
    if name is None:  # raised by our own checks (quick_check, schema version)
        return not isinstance(exc, sqlite3.OperationalError)
    return name in ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def _create_private(path: Path) -> None:
    # Created 0600 before SQLite opens it (SQLite would use the umask); an existing file
    # is narrowed too. The -wal and -shm files take the database file's mode.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)
