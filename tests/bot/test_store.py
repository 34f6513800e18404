"""The on-disk store of finished pages."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.store import ResultStore


def save(store: ResultStore, user: int, job_id: str, data: bytes = b"<html></html>") -> None:
    store.save(
        user_id=user, job_id=job_id, filename=f"{job_id}.html", data=data, prompt="p", model="m"
    )


def test_save_list_get_read(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, keep_per_user=5)
    save(store, 1, "aaaa0001", b"<html>1</html>")
    save(store, 1, "aaaa0002", b"<html>2</html>")
    save(store, 2, "bbbb0001")
    pages = store.list(1)
    assert [p.job_id for p in pages] == ["aaaa0002", "aaaa0001"]  # newest first
    page = store.get(1, "aaaa0001")
    assert page is not None and store.read(page) == b"<html>1</html>"
    assert page.size == len(b"<html>1</html>") and page.model == "m"
    assert store.get(2, "aaaa0001") is None  # another user's id
    assert store.list(3) == []


def test_keeps_only_the_newest_pages_per_user(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, keep_per_user=2)
    for i in range(4):
        save(store, 1, f"0000000{i}")
    assert [p.job_id for p in store.list(1)] == ["00000003", "00000002"]
    assert not (tmp_path / "1" / "00000000.html").exists()


@pytest.mark.parametrize("bad", ["../../etc", "x", "ABCDEFGH", "a/b"])
def test_ids_that_could_escape_the_folder_are_refused(tmp_path: Path, bad: str) -> None:
    store = ResultStore(tmp_path)
    assert store.get(1, bad) is None
    with pytest.raises(ValueError):
        save(store, 1, bad)


def test_survives_a_restart(tmp_path: Path) -> None:
    save(ResultStore(tmp_path), 7, "cafe0001")
    assert [p.job_id for p in ResultStore(tmp_path).list(7)] == ["cafe0001"]
