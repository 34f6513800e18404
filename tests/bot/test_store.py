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


def _old_format(folder: Path, job_id: str, created_at: float) -> None:
    # What the store wrote before pages had versions.
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "job_id": job_id,
        "user_id": int(folder.name),
        "filename": "old.html",
        "prompt": "an old page",
        "model": "m",
        "generated_tokens": 3,
        "seconds": 1.5,
        "warnings": [],
        "created_at": created_at,
        "size": 11,
    }
    (folder / f"{job_id}.json").write_text(json.dumps(meta))
    (folder / f"{job_id}.html").write_bytes(b"<html></html>")


async def test_pages_of_the_old_format_read_as_their_own_v1(tmp_path: Path) -> None:
    _old_format(tmp_path / "4", "01d00001", created_at=1000.0)
    _old_format(tmp_path / "4", "01d00002", created_at=2000.0)
    store = ResultStore(tmp_path)
    pages = await store.list_pages(4)
    assert [h.page_id for h in pages] == ["01d00002", "01d00001"]
    old = pages[1].first
    assert (old.job_id, old.version, old.kind, old.parent_job_id) == ("01d00001", 1, "create", None)
    assert await store.get_version(4, "01d00001", 1) == old
    refined = await store.save(
        user_id=4,
        job_id="01d00003",
        filename="old.html",
        data=b"<html>v2</html>",
        prompt="an old page",
        model="m",
        parent_job_id="01d00001",
        kind="refine",
        instruction="bigger title",
    )
    assert (refined.page_id, refined.version) == ("01d00001", 2)
    assert [h.page_id for h in await store.list_pages(4)] == ["01d00001", "01d00002"]


async def test_trimmed_versions_leave_no_files(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, keep_per_user=1, max_versions=2)
    first = await store.save(
        user_id=1, job_id="aaaa0001", filename="a", data=b"1", prompt="", model="", content="{}"
    )
    for n, parent in ((2, "aaaa0001"), (3, "aaaa0002")):
        await store.save(
            user_id=1,
            job_id=f"aaaa000{n}",
            filename="a",
            data=b"x",
            prompt="",
            model="",
            parent_job_id=parent,
            kind="refine",
            content="{}",
        )
    names = sorted(p.name for p in (tmp_path / "1").iterdir())
    assert names == [f"aaaa000{n}.{ext}" for n in (1, 3) for ext in ("content", "html", "json")]
    await save(store, 1, "bbbb0001")  # a second page: the first goes whole
    assert sorted(p.name for p in (tmp_path / "1").iterdir()) == ["bbbb0001.html", "bbbb0001.json"]
    assert await store.read_content(first) is None


async def test_get_any_finds_the_owner_among_the_users(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    await save(store, 1, "aaaa0001")
    await save(store, 22, "bbbb0001")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "cccc0001.json").write_text("{}")  # not a user folder
    found = await store.get_any("bbbb0001")
    assert found is not None and found.user_id == 22
    assert await store.get_any("cccc0001") is None
    assert await ResultStore(tmp_path / "missing").get_any("aaaa0001") is None


def test_a_version_cap_below_two_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ResultStore(tmp_path, max_versions=1)
