"""What a benchmark ran on: cores, memory, kernel, disk, Python, packages, anchors.

Merged into the ``machine_info`` of ``results.json``, so that a result read months
later says what it measured on, and ``--compare`` can tell whether absolute figures
of two runs are comparable (:func:`benchmarks.report.same_machine`).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

__all__ = ["anchor_versions", "machine_info"]

PACKAGES = ("pacslab", "pydicom", "pynetdicom", "numpy", "zarr", "zarrs", "dask", "fastapi",
            "uvicorn", "SQLAlchemy", "Pillow", "imagecodecs", "pytest-benchmark", "matplotlib")


def _first_line(cmd: list[str]) -> str | None:
    exe = shutil.which(cmd[0]) or (cmd[0] if Path(cmd[0]).is_file() else None)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0][:200] if text else None


def anchor_versions() -> dict[str, str | None]:
    """The versions of the peers benchmarks measure against (None: not installed)."""
    orthanc = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    plugin = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    return {
        "orthanc": _first_line([orthanc, "--version"]),
        "orthanc-dicomweb": _deb_version("orthanc-dicomweb") if plugin.exists() else None,
        "dcmtk storescp": _first_line(["storescp", "--version"]),
        "dcmtk wlmscpfs": _first_line(["wlmscpfs", "--version"]),
    }


def _deb_version(package: str) -> str | None:
    return _first_line(["dpkg-query", "-W", "-f=${Version}", package])


def _disk(path: Path) -> dict[str, Any]:
    """The file system benchmark data is written to (the temporary directory)."""
    path = path.resolve()
    best = None
    for part in psutil.disk_partitions(all=True):
        mount = Path(part.mountpoint)
        if (path == mount or mount in path.parents) and (
                best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    usage = psutil.disk_usage(str(path))
    out: dict[str, Any] = {"path": str(path), "total_gib": round(usage.total / 2**30, 1),
                           "free_gib": round(usage.free / 2**30, 1)}
    if best is not None:
        out.update(device=best.device, fstype=best.fstype, mountpoint=best.mountpoint)
        name = re.sub(r"\d+$", "", Path(best.device).name)  # sda1 -> sda
        rotational = Path(f"/sys/block/{name}/queue/rotational")
        if rotational.exists():
            out["rotational"] = rotational.read_text().strip() == "1"
    return out


def machine_info(tmp: Path) -> dict[str, Any]:
    """Cores, memory, kernel, disk, Python and package versions, anchor versions."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    return {
        "node": platform.node(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "kernel": f"{platform.system()} {platform.release()} {platform.version()}",
        "disk": _disk(tmp),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "packages": versions,
        "anchors": anchor_versions(),
    }
