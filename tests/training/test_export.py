"""Pushing to the hub (the hub faked at its edge) and checkpoint discovery."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import huggingface_hub
import pytest

from training.errors import TrainingError
from training.export import find_checkpoint, push_to_hub


class FakeApi:
    calls: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    fail = False

    def create_repo(self, repo_id: str, **kwargs: Any) -> None:
        if self.fail:
            raise RuntimeError("401 Client Error: Unauthorized\nmore detail")
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs: Any) -> None:
        self.calls.append(("upload_folder", kwargs))


def test_push_to_hub_uploads_without_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = push_to_hub(tmp_path, "me/html-lora", private=True)
    assert url == "https://huggingface.co/me/html-lora"
    (create, create_args), (upload, upload_args) = FakeApi.calls
    assert create == "create_repo" and create_args["private"] is True
    assert upload == "upload_folder" and upload_args["folder_path"] == str(tmp_path)
    assert upload_args["ignore_patterns"] == ["checkpoints/*"]


def test_push_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "HfApi", type("Failing", (FakeApi,), {"fail": True}))
    with pytest.raises(
        TrainingError, match=r"push to hub 'me/x' failed: 401 Client Error: Unauthorized$"
    ):
        push_to_hub(tmp_path, "me/x")


def test_find_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="no checkpoint in"):
        find_checkpoint(tmp_path, "latest")
    for step in (3, 12):
        folder = tmp_path / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text("{}")
    partial = tmp_path / "checkpoints" / "step-000020.partial"  # a save that crashed
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{}")
    assert find_checkpoint(tmp_path, "latest").name == "step-000012"
    with pytest.raises(TrainingError, match="is not a checkpoint folder"):
        find_checkpoint(tmp_path, str(tmp_path))
