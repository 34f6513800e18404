"""The on-disk store of finished pages (async, through aiofiles)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.store import ResultStore


async def save(store: ResultStore, user: int, job_id: str, data: bytes = b"<html></html>") -> None:
    await store.save(
        user_id=user, job_id=job_id, filename=f"{job_id}.html", data=data, prompt="p", model="m"
    )


async def test_save_list_get_read(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, keep_per_user=5)
    await save(store, 1, "aaaa0001", b"<html>1</html>")
    await save(store, 1, "aaaa0002", b"<html>2</html>")
    await save(store, 2, "bbbb0001")
    pages = await store.list(1)
    assert [p.job_id for p in pages] == ["aaaa0002", "aaaa0001"]  # newest first
    page = await store.get(1, "aaaa0001")
    assert page is not None and await store.read(page) == b"<html>1</html>"
    assert page.size == len(b"<html>1</html>") and page.model == "m"
    assert page.path == tmp_path / "1" / "aaaa0001.html"
    assert await store.get(2, "aaaa0001") is None  # another user's id
    assert await store.list(3) == []


async def test_save_returns_what_get_reads_back(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    saved = await store.save(
        user_id=5,
        job_id="abcd0001",
        filename="bakery.html",
        data=b"<html>bakery</html>",
        prompt="a bakery",
        model="smol",
        generated_tokens=321,
        seconds=4.56789,
        warnings=("empty", "truncated"),
    )
    assert await store.get(5, "abcd0001") == saved
    assert saved.warnings == ("empty", "truncated") and saved.seconds == pytest.approx(4.568)
    assert saved.generated_tokens == 321 and saved.filename == "bakery.html"


async def test_keeps_only_the_newest_pages_per_user(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, keep_per_user=2)
    for i in range(4):
        await save(store, 1, f"0000000{i}")
    assert [p.job_id for p in await store.list(1)] == ["00000003", "00000002"]
    assert not (tmp_path / "1" / "00000000.html").exists()
    assert not (tmp_path / "1" / "00000000.json").exists()


async def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    await save(store, 1, "aaaa0001", b"<html>old</html>")
    await save(store, 1, "aaaa0001", b"<html>new</html>")  # regenerated: replaced in place
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == ["aaaa0001.html", "aaaa0001.json"]
    page = await store.get(1, "aaaa0001")
    assert page is not None and await store.read(page) == b"<html>new</html>"


async def test_a_failed_write_cleans_up_and_keeps_the_old_page(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    await save(store, 1, "aaaa0001", b"<html>old</html>")
    with pytest.raises(TypeError):
        await store.save(
            user_id=1,
            job_id="aaaa0001",
            filename="x",
            data="not bytes",  # type: ignore[arg-type]
            prompt="",
            model="",
        )
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == ["aaaa0001.html", "aaaa0001.json"]
    page = await store.get(1, "aaaa0001")
    assert page is not None and await store.read(page) == b"<html>old</html>"


async def test_unreadable_or_orphaned_metadata_is_skipped(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    await save(store, 1, "aaaa0001")
    folder = tmp_path / "1"
    (folder / "bbbb0001.json").write_text("{not json")
    (folder / "cccc0001.json").write_text(json.dumps({"job_id": "cccc0001"}))  # no page file
    (folder / "dddd0001.json").write_text(json.dumps({"size": 1}))
    (folder / "dddd0001.html").write_bytes(b"x")  # a page, but metadata without fields
    assert [p.job_id for p in await store.list(1)] == ["aaaa0001"]
    assert await store.get(1, "bbbb0001") is None


@pytest.mark.parametrize("bad", ["../../etc", "x", "ABCDEFGH", "a/b"])
async def test_ids_that_could_escape_the_folder_are_refused(tmp_path: Path, bad: str) -> None:
    store = ResultStore(tmp_path)
    assert await store.get(1, bad) is None
    with pytest.raises(ValueError):
        await save(store, 1, bad)


async def test_survives_a_restart(tmp_path: Path) -> None:
    await save(ResultStore(tmp_path), 7, "cafe0001")
    assert [p.job_id for p in await ResultStore(tmp_path).list(7)] == ["cafe0001"]
