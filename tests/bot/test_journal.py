"""The SQLite job journal of the local backend: what a restart reads back."""

from __future__ import annotations

import logging
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest

from bot.jobs import DeliveryInfo, Job, JobState
from bot.queue.journal import JobJournal
from model.types import FinishReason, GenerationResult, SamplingParams

TOKEN = "secret-interaction-token-0123456789"


def make_job(user: int = 1, prompt: str = "a bakery", ttl: float = 600.0) -> Job:
    job = Job.create(
        user_id=user,
        prompt=prompt,
        ttl_s=ttl,
        style="retro",
        sampling=SamplingParams(max_new_tokens=321, temperature=0.5, seed=42),
        user_name=f"user{user}",
        guild_id=77,
        channel_id=88,
        private=True,
        delivery=DeliveryInfo(
            application_id=5, token=TOKEN, interaction_id=99, shard_id=1, attachment_limit=1024
        ),
    )
    job.regenerated = True
    return job


def result_for(job: Job, text: str = "<html>page</html>") -> GenerationResult:
    return GenerationResult(
        request_id=job.job_id,
        text=text,
        finish_reason=FinishReason.HTML_COMPLETE,
        prompt_tokens=12,
        generated_tokens=34,
        time_to_first_token_s=0.25,
        total_s=3.5,
    )


def test_a_job_round_trips_with_its_delivery_and_deadline(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path / "state.sqlite3")
    job = make_job(ttl=600.0)
    journal.record_submitted(job)
    [loaded] = JobJournal(tmp_path / "state.sqlite3").load_unfinished()
    assert loaded is not job and loaded.job_id == job.job_id
    assert loaded.state is JobState.QUEUED
    assert loaded.request.prompt == "a bakery" and loaded.request.style == "retro"
    assert loaded.request.sampling == job.request.sampling
    assert loaded.request.mode is job.request.mode and loaded.request.safety is job.request.safety
    assert (loaded.user_id, loaded.user_name, loaded.guild_id, loaded.channel_id) == (
        1,
        "user1",
        77,
        88,
    )
    assert loaded.private and loaded.regenerated
    assert loaded.delivery == job.delivery and loaded.delivery is not None
    assert loaded.delivery.token == TOKEN
    # The deadline was stored as a wall-clock time and comes back as a monotonic one.
    assert loaded.expires_at - time.monotonic() == pytest.approx(600.0, abs=30.0)
    assert loaded.created_at == pytest.approx(job.created_at, abs=30.0)


def test_a_finished_job_keeps_its_result_error_and_note(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path / "j.db")
    done, failed, cancelled = make_job(1), make_job(2), make_job(3)
    for job in (done, failed, cancelled):
        journal.record_submitted(job)
        job.state = JobState.RUNNING
        job.attempts = 1
        journal.record_started(job)
    done.result, done.state = result_for(done, "<html>ünïcode</html>"), JobState.DONE
    failed.error, failed.state = "Out of memory.", JobState.FAILED
    cancelled.cancel_note, cancelled.state = "The bot is restarting.", JobState.CANCELLED
    for job in (done, failed, cancelled):
        journal.record_finished(job)
    loaded = {job.job_id: job for job in JobJournal(tmp_path / "j.db").load_unfinished()}
    assert loaded[done.job_id].state is JobState.DONE
    assert loaded[done.job_id].result == done.result
    assert loaded[done.job_id].attempts == 1
    assert loaded[done.job_id].finished_at is not None
    assert loaded[failed.job_id].error == "Out of memory."
    assert loaded[cancelled.job_id].cancel_note == "The bot is restarting."
    assert loaded[cancelled.job_id].state is JobState.CANCELLED


def test_unfinished_jobs_come_back_running_first_then_in_queue_order(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path / "j.db")
    jobs = [make_job(user) for user in range(6)]
    keys = [(1, 5), (0, 9), (2, 1), (0, 2), (0, 1), (1, 1)]
    for job, key in zip(jobs, keys, strict=True):
        journal.record_submitted(job, key)
    running = jobs[4]
    running.state = JobState.RUNNING
    journal.record_started(running)
    finished_late, finished_early, delivered = jobs[3], jobs[0], jobs[2]
    for job in (finished_early, finished_late, delivered):
        job.state = JobState.DONE
        journal.record_finished(job)
        time.sleep(0.01)  # distinct finish times: an order, not a timing check
    journal.record_delivered(delivered.job_id)
    order = [job.job_id for job in journal.load_unfinished()]
    queued = [jobs[1], jobs[5]]  # keys (0, 9) then (1, 1)
    assert order == [job.job_id for job in [running, *queued, finished_early, finished_late]]


def test_set_order_and_forget(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path / "j.db")
    first, second = make_job(1), make_job(2)
    journal.record_submitted(first)
    journal.record_submitted(second)
    journal.set_order(first.job_id, (3, 1))
    journal.set_order(second.job_id, (2, 7))
    assert [job.job_id for job in journal.load_unfinished()] == [second.job_id, first.job_id]
    journal.forget(second.job_id)
    assert [job.job_id for job in journal.load_unfinished()] == [first.job_id]


def test_a_requeued_job_is_pending_again(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path / "j.db")
    job = make_job()
    journal.record_submitted(job, (0, 1))
    job.state = JobState.RUNNING
    journal.record_started(job)
    job.state = JobState.QUEUED  # put back after an out-of-memory
    journal.record_submitted(job, (0, 1))
    [loaded] = journal.load_unfinished()
    assert loaded.state is JobState.QUEUED and loaded.started_at is None


def test_the_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.sqlite3"
    journal = JobJournal(path)
    journal.record_submitted(make_job())
    for name in (path, Path(f"{path}-wal")):
        assert stat.S_IMODE(name.stat().st_mode) == 0o600, name


def test_an_existing_file_is_narrowed_to_the_owner(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    JobJournal(path).close()
    path.chmod(0o644)
    JobJournal(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_corrupt_file_is_moved_aside_and_a_new_one_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.sqlite3"
    path.write_bytes(b"this is not a database, " * 100)
    with caplog.at_level(logging.WARNING, logger="bot.queue.journal"):
        journal = JobJournal(path)
    assert "unreadable" in caplog.text
    aside = list(tmp_path.glob("state.sqlite3.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not a database")
    job = make_job()
    journal.record_submitted(job)
    assert [loaded.job_id for loaded in JobJournal(path).load_unfinished()] == [job.job_id]


def test_a_database_of_another_schema_version_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    JobJournal(path).record_submitted(make_job())
    assert len(list(tmp_path.glob("state.sqlite3.corrupt-*"))) == 1


def test_an_unusable_path_runs_without_a_file_instead_of_crashing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.ERROR, logger="bot.queue.journal"):
        journal = JobJournal(blocker / "state.sqlite3")  # its folder is a file
    assert "will not survive a restart" in caplog.text
    job = make_job()
    journal.record_submitted(job)  # still works, in memory
    assert [loaded.job_id for loaded in journal.load_unfinished()] == [job.job_id]


def test_an_undecodable_row_is_dropped_without_logging_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "j.db"
    journal = JobJournal(path)
    good, bad = make_job(1), make_job(2)
    journal.record_submitted(good)
    journal.record_submitted(bad)
    conn = sqlite3.connect(path)
    conn.execute(
        "UPDATE jobs SET fields = json_set(fields, '$.max_new_tokens', ?) WHERE job_id = ?",
        (f"x{TOKEN}", bad.job_id),
    )
    conn.commit()
    conn.close()
    with caplog.at_level(logging.DEBUG):
        loaded = journal.load_unfinished()
    assert [job.job_id for job in loaded] == [good.job_id]
    assert bad.job_id in caplog.text and TOKEN not in caplog.text
    assert [job.job_id for job in journal.load_unfinished()] == [good.job_id]  # forgotten


def test_prune_drops_delivered_and_dead_rows_only(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path / "j.db")
    delivered, dead, live = make_job(1), make_job(2, ttl=-5.0), make_job(3)
    for job in (delivered, dead, live):
        journal.record_submitted(job)
    journal.record_delivered(delivered.job_id)
    assert journal.prune(older_than_s=3600) == 0  # all touched just now
    assert journal.prune(older_than_s=-1) == 2
    assert [job.job_id for job in journal.load_unfinished()] == [live.job_id]


def test_writes_from_several_threads_all_land(tmp_path: Path) -> None:
    journal = JobJournal(tmp_path / "j.db")
    jobs = [make_job(user) for user in range(80)]

    def write(part: list[Job]) -> None:
        for job in part:
            journal.record_submitted(job)
            job.state = JobState.RUNNING
            journal.record_started(job)

    threads = [threading.Thread(target=write, args=(jobs[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    loaded = journal.load_unfinished()
    assert sorted(job.job_id for job in loaded) == sorted(job.job_id for job in jobs)
    assert all(job.state is JobState.RUNNING for job in loaded)
