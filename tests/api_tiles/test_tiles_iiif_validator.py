"""IIIF Image API 3.0 level 2, judged by the IIIF consortium's own validator (issue 13).

``iiif-validator`` (PyPI) requests its test image (a 10 × 10 grid of coloured
squares, built here from the colour table the validator itself checks against)
through every level-0..2 feature and checks the pixels it gets back: regions
(full, square, pixels, percent), sizes (max, ``w,``, ``,h``, ``w,h``, ``!w,h``,
``pct:``, no upscaling without ``^``), rotations by 90° (and mirroring),
qualities (default, color, gray, bitonal), jpg and png, info.json,
JSON-LD media type, CORS, the base-URI redirect and the error codes.

The image goes the production way: the grid becomes an RGB Secondary Capture
instance (PS3.3 A.8), is accepted into the archive and converted to a pyramid by the
worker, and the validator talks HTTP to uvicorn. Its identifier is ours
(``{series}@{version}:0:native:0``): the validator takes any identifier (``-i``), and
the image, not the name, is what it checks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from core.synthetic import write_projection_image

from .tiles_data import convert, running, tiles_settings


def _validator_grid() -> np.ndarray:
    """The validator's test image as it checks it: 1000 × 1000 RGB, square (x, y) of
    100 × 100 pixels at column x, row y filled with ``ValidationInfo.colorInfo[x][y]``
    (the validator compares the dominant colour of what it gets back with that table).
    Built from the installed package's table rather than a copied image file."""
    validator = pytest.importorskip("iiif_validator.validator",
                                    reason="iiif-validator is not installed")
    colors = np.asarray(validator.ValidationInfo().colorInfo, dtype=np.uint8)  # [x][y] -> rgb
    # Rows are y, columns x: transpose the table, then blow each cell up to 100 × 100.
    return np.repeat(np.repeat(colors.transpose(1, 0, 2), 100, axis=0), 100, axis=1)


@pytest.fixture(scope="module")
def validator_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(server, identifier) of the validator's image behind a running server."""
    from pydicom import dcmread

    root = tmp_path_factory.mktemp("iiif-validator")
    with pytest.MonkeyPatch.context() as mp:
        import os

        for key in list(os.environ):
            if key.startswith("PACSLAB_"):
                mp.delenv(key)
        settings = tiles_settings(root)
    rgb = np.ascontiguousarray(_validator_grid())
    path = write_projection_image(root / "sc.dcm", rgb.shape[0], rgb.shape[1],
                                  lambda r0, r1: rgb[r0:r1], samples_per_pixel=3)
    series = str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
    version = convert(settings, [path])[series]
    with running(settings) as server:
        yield server, f"{series}@{version}:0:native:0"


def _level2_tests() -> list[str]:
    validator = pytest.importorskip("iiif_validator.validator",
                                    reason="iiif-validator is not installed")
    tests = validator.TestSuite(validator.ValidationInfo()).list_tests("3.0")
    return sorted(name for name, info in tests.items() if info["level"] <= 2)


@pytest.mark.network
@pytest.mark.parametrize("name", _level2_tests())
def test_iiif_validator_level2(validator_image: tuple[str, str], name: str) -> None:
    from iiif_validator.validator import ImageAPI, TestSuite, ValidationInfo

    server, identifier = validator_image
    result = ImageAPI(identifier, server.removeprefix("http://"), "iiif", "http", "",
                      "3.0", debug=False)
    TestSuite(ValidationInfo()).run_test(name, result)
    e = result.exception
    assert e is None, (f"{name}: {e} (url {getattr(e, 'url', None)}, "
                       f"status {getattr(e, 'status', None)})")


def test_validator_covers_level2() -> None:
    """The level-2 list is the validator's, not ours: it must hold the key features."""
    names = set(_level2_tests())
    assert {"info_json", "id_squares", "region_percent", "region_square", "size_bwh",
            "size_noup", "rot_full_basic", "quality_bitonal", "quality_grey",
            "quality_color", "format_png", "cors", "jsonld", "id_error_random"} <= names


@pytest.mark.network
def test_iiif_validate_command_line(validator_image: tuple[str, str]) -> None:
    """The validator's own command line, as CI of other IIIF servers runs it."""
    import shutil
    import subprocess
    import sys

    script = shutil.which("iiif-validate.py", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("iiif-validate.py is not installed (pip install iiif-validator)")
    server, identifier = validator_image
    run = subprocess.run(
        [sys.executable, script, "-s", server.removeprefix("http://"), "-p", "iiif",
         "-i", identifier, "--version=3.0", "--level", "2"],
        capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    done = re.search(r"Done \((\d+) tests, (\d+) failures\)", run.stderr)
    assert done is not None and done.group(2) == "0", run.stderr[-3000:]
    assert int(done.group(1)) == len(_level2_tests()) >= 30
