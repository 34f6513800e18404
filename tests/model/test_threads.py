"""configure_cpu_threads: the configured count wins, the default fits the cores, GPU untouched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model import threads
from model.threads import available_cpus, configure_cpu_threads, default_cpu_threads


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_cores(monkeypatch: pytest.MonkeyPatch, cores: int) -> None:
    monkeypatch.setattr(threads, "available_cpus", lambda: cores)


def test_a_requested_count_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cores(monkeypatch, 2)
    assert configure_cpu_threads(1) == 1
    assert torch.get_num_threads() == 1
    assert configure_cpu_threads(2) == 2
    assert torch.get_num_threads() == 2


def test_none_uses_the_default_for_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cores(monkeypatch, 2)
    chosen = configure_cpu_threads(None)
    assert chosen == default_cpu_threads(2) == torch.get_num_threads()


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 16])
def test_the_default_fits_the_cores(cores: int) -> None:
    assert 1 <= default_cpu_threads(cores) <= cores


def test_two_shared_cores_get_one_thread() -> None:
    # bench/RESULTS.md "CPU threads": on 2 busy cores one thread is several times faster.
    assert default_cpu_threads(2) == 1


def test_a_gpu_model_leaves_torch_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cores(monkeypatch, 2)
    torch.set_num_threads(2)
    assert configure_cpu_threads(1, device="cuda:0") == 2
    assert torch.get_num_threads() == 2


def test_a_count_below_one_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least 1, got 0"):
        configure_cpu_threads(0)


def test_a_container_quota_lowers_the_cores(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # docker --cpus=1.5
    monkeypatch.setattr(threads, "_CPU_MAX", cpu_max)
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert available_cpus() == 2
    cpu_max.write_text("max 100000\n")
    assert available_cpus() == 8
