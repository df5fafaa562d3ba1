"""The layer rules of STYLE.md §1 as import-linter contracts (``.importlinter``).

``lint-imports`` runs over the real packages and must keep every contract. To
show the contracts can fail, the same check runs over a copy of the packages in
``tmp_path`` with one deliberately wrong import added: it must break exactly the
contract that forbids it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pacslab", "api", "ingest", "worklist", "services", "processing", "storage", "core")
CONFIG = ROOT / ".importlinter"


def lint_imports(where: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter's command line on the packages under ``where``."""
    env = {**os.environ, "PYTHONPATH": str(where)}
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command as c; "
            "sys.exit(c())",
            "--config",
            str(where / ".importlinter"),
            "--no-cache",
        ],
        cwd=where,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_layer_contracts_hold() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def _copy_sources(to: Path) -> None:
    """The Python sources of our packages (grimp reads only ``.py`` files)."""

    def skip(folder: str, names: list[str]) -> list[str]:
        return [
            n
            for n in names
            if n == "__pycache__" or (not n.endswith(".py") and not (Path(folder) / n).is_dir())
        ]

    for package in PACKAGES:
        shutil.copytree(ROOT / package, to / package, ignore=skip)
    shutil.copy(CONFIG, to / ".importlinter")


def test_a_type_checking_import_from_above_is_allowed(tmp_path: Path) -> None:
    # STYLE.md §1: a type from a layer above comes in under TYPE_CHECKING.
    _copy_sources(tmp_path)
    (tmp_path / "storage" / "_typed.py").write_text(
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
        "    from services.analyzers import AnalyzerService\n"
    )
    done = lint_imports(tmp_path)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        # core imports nothing of ours.
        ("core/_wrong.py", "import storage.abc\n", "core imports nothing of ours"),
        # An edge importing another edge (the lab inbox reusing the order reader).
        (
            "ingest/_wrong.py",
            "from worklist.orders import hl7v2\n",
            "Edges never import each other",
        ),
        # A lower layer reaching up (storage calling into a service).
        ("storage/_wrong.py", "import services.analyzers\n", "Layers:"),
        # A service reaching up into an edge (the tile service using the API's state).
        ("services/_wrong.py", "import api.state\n", "Layers:"),
        # The API pulling in the job worker.
        ("api/_wrong.py", "import processing.worker\n", "api imports only pure functions"),
    ],
)
def test_a_wrong_import_breaks_its_contract(
    tmp_path: Path, module: str, source: str, broken: str
) -> None:
    _copy_sources(tmp_path)
    assert lint_imports(tmp_path).returncode == 0  # the copy is as clean as the original
    (tmp_path / module).write_text(source)
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(broken)]
    assert lines and lines[0].endswith("BROKEN"), done.stdout
    wrong = module.removesuffix(".py").replace("/", ".")
    assert wrong in done.stdout
