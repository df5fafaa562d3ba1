"""How many receiver processes ``pacslab serve`` forks when not told (issue 19)."""

from __future__ import annotations

import pytest

from core.settings import Settings
from pacslab.dicom_process import DicomProcesses, receiver_count


@pytest.mark.parametrize(("cores", "receivers"), [(1, 2), (2, 4), (8, 16), (16, 32),
                                                   (24, 32), (64, 64)])
def test_two_receivers_per_core_up_to_32_never_fewer_than_the_cores(
    cores: int, receivers: int
) -> None:
    assert receiver_count(cores) == receivers


def test_a_configured_count_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    auto = DicomProcesses(Settings(dicom={"port": 0}))
    fixed = DicomProcesses(Settings(dicom={"port": 0, "workers": 3}))
    try:
        assert (auto.count, fixed.count) == (4, 3)
    finally:
        auto.listener.close()
        fixed.listener.close()
