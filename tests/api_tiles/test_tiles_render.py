"""processing.render: pure windowing, planes, resampling and encoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from processing.render import (
    MIN_REFORMAT_SLICES,
    PRESETS,
    RawWindow,
    Window,
    acquisition_plane,
    apply_window,
    auto_window,
    default_window,
    encode,
    parse_window,
    plane_view,
    planes_of,
    raw_uint16,
    resample_axis,
    resize,
    to_display,
)

AXIAL = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
# Sagittal MR: rows run posterior, columns run inferior, normal points left.
SAGITTAL = ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), (-1.0, 0.0, 0.0))


def voi_reference(x: float, c: float, w: float) -> float:
    """PS3.3 C.11.2.1.2.1, written out literally for y ∈ [0, 255]."""
    if x <= c - 0.5 - (w - 1) / 2:
        return 0.0
    if x > c - 0.5 + (w - 1) / 2:
        return 255.0
    return ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32, np.float32, np.uint8])
@pytest.mark.parametrize("window", [Window(40, 400), Window(-600, 1500), Window(0.5, 2),
                                    Window(100, 1)])
def test_voi_lut_linear_function(dtype: type, window: Window) -> None:
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    lo, hi = (max(info.min, -2000), min(info.max, 3000)) if info else (-2000, 3000)
    values: np.ndarray = np.arange(lo, hi, dtype=np.int64).astype(dtype)
    got = apply_window(values, window)
    if window.width == 1:
        want = np.where(values <= window.center - 0.5, 0, 255)
    else:
        want = np.rint([voi_reference(float(v), window.center, window.width) for v in values])
    assert got.dtype == np.uint8
    assert np.array_equal(got, want.astype(np.uint8))


def test_modality_lut_before_window_and_monochrome1_inverted() -> None:
    stored = np.array([0, 1024, 1064, 4095], dtype=np.uint16)  # HU = stored - 1024
    got = apply_window(stored, Window(40, 400), slope=1, intercept=-1024)
    assert got.tolist() == [0, 102, 128, 255]
    inverted = to_display(stored, Window(40, 400), photometric="MONOCHROME1", intercept=-1024)
    assert inverted.tolist() == [255, 153, 127, 0]


def test_rgb_passes_through() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    assert to_display(rgb, None, photometric="RGB") is rgb
    deep = (rgb.astype(np.uint16) << 8) | 0xFF
    assert np.array_equal(to_display(deep, None, photometric="RGB"), rgb)


def test_parse_window() -> None:
    assert parse_window(None) is None and parse_window("default") is None
    assert parse_window("lung") == PRESETS["lung"] == Window(-600, 1500)
    assert PRESETS["brain"] == Window(40, 80) and PRESETS["bone"] == Window(300, 1500)
    assert PRESETS["abdomen"] == Window(40, 400)
    assert parse_window("-40.5,350") == Window(-40.5, 350)
    assert isinstance(parse_window("raw"), RawWindow)
    for bad in ("40", "a,b", "40,0", "40,-3", "nan,3", "liver"):
        with pytest.raises(ValueError):
            parse_window(bad)


def test_default_and_auto_window() -> None:
    assert default_window([{"center": "x"}, {"center": 40, "width": 400}]) == Window(40, 400)
    assert default_window([]) is None
    w = auto_window(np.arange(1000, dtype=np.int16), intercept=-500)
    assert -500 < w.center - w.width / 2 < -490 and 490 < w.center + w.width / 2 < 500


def test_raw_uint16_round_trip() -> None:
    v = np.array([-32768, -1024, 0, 3071, 32767], dtype=np.int16)
    u, offset = raw_uint16(v)
    assert u.dtype == np.uint16 and offset == -32768
    assert np.array_equal(u.astype(np.int32) + offset, v)
    png = encode(u.reshape(1, -1), "png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))).ravel(), u)


def test_axial_ct_is_exact_and_reslices_have_physical_aspect() -> None:
    view = plane_view("volume", (100, 512, 400), (2.5, 0.7, 0.7), AXIAL, "axial")
    assert view.exact and (view.width, view.height, view.depth) == (400, 512, 100)
    cor = plane_view("volume", (100, 512, 400), (2.5, 0.7, 0.7), AXIAL, "coronal")
    assert (cor.fixed, cor.rows.source, cor.cols.source) == (1, 0, 2)
    assert cor.rows.flip and not cor.cols.flip  # superior up: z (normal +S) reversed
    assert (cor.width, cor.height, cor.depth) == (400, round(100 * 2.5 / 0.7), 512)
    sag = plane_view("volume", (100, 512, 400), (2.5, 0.7, 0.7), AXIAL, "sagittal")
    assert (sag.fixed, sag.rows.source, sag.cols.source) == (2, 0, 1)
    assert (sag.width, sag.height) == (512, round(100 * 2.5 / 0.7))


def test_planes_follow_the_direction_cosines() -> None:
    # A sagittal MR acquisition: its native plane is the sagittal view, unflipped.
    sag = plane_view("volume", (30, 256, 256), (4.0, 1.0, 1.0), SAGITTAL, "sagittal")
    assert sag.fixed == 0 and sag.exact
    ax = plane_view("volume", (30, 256, 256), (4.0, 1.0, 1.0), SAGITTAL, "axial")
    assert ax.fixed == 1  # the column axis runs superior→inferior
    assert (ax.cols.source, ax.cols.flip) == (0, True)  # normal points to patient right
    assert (ax.rows.source, ax.rows.flip) == (2, False)  # rows run posterior
    with pytest.raises(ValueError):
        plane_view("plane", (1, 10, 10), (1, 1, 1), AXIAL, "coronal")
    assert plane_view("plane", (1, 10, 20), (1, 0.5, 0.5), AXIAL, "native").width == 20


def test_resample_axis() -> None:
    block = np.array([[0, 10], [100, 110]], dtype=np.int16)
    assert resample_axis(block, np.array([0.0, 1.0]), 0) is not None
    mid = resample_axis(block, np.array([0.5]), 0)
    assert mid.tolist() == [[50, 60]] and mid.dtype == np.int16
    assert resample_axis(block, np.array([3.0, 3.5]), 1, offset=3).tolist() == [[0, 5],
                                                                                [100, 105]]


def test_resize_and_encode() -> None:
    img = np.tile(np.arange(64, dtype=np.uint8), (64, 1))
    small = resize(img, 32, 16)
    assert small.shape == (16, 32)
    raw = resize(np.full((8, 8), -1000, np.int16), 4, 4)
    assert raw.dtype == np.int16 and (raw == -1000).all()
    for fmt in ("png", "jpg", "webp"):
        data = encode(img, fmt)
        assert Image.open(io.BytesIO(data)).size == (64, 64)
    with pytest.raises(ValueError):
        encode(img, "gif")
    with pytest.raises(ValueError):
        encode(img.astype(np.uint16), "jpg")


def _oblique(degrees: float) -> tuple[tuple[float, float, float], ...]:
    """A sagittal acquisition tilted ``degrees`` about the patient's left-right axis."""
    import math

    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    # row and column cosines both in the y-z plane, perpendicular to each other
    row = (0.0, c, s)
    col = (0.0, s, -c)
    normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
              row[0] * col[1] - row[1] * col[0])
    return (row, col, normal)


@pytest.mark.parametrize(("direction", "plane"), [
    (AXIAL, "axial"),
    (SAGITTAL, "sagittal"),
    (_oblique(25.0), "sagittal"),
    (((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)), "coronal"),
])
def test_a_stack_opens_in_its_acquisition_plane(
        direction: tuple[tuple[float, ...], ...], plane: str) -> None:
    """Issue 13.10: a single oblique slice is shown in its own plane, not as a line."""
    assert acquisition_plane("volume", direction) == plane
    # one slice (or a thin stack): only the acquisition plane is offered
    for depth in (1, MIN_REFORMAT_SLICES - 1):
        assert planes_of("volume", (depth, 256, 192), direction) == (plane,)
    view = plane_view("volume", (1, 256, 192), (1.0, 0.9, 0.9), direction, plane)
    assert view.fixed == 0 and view.depth == 1
    assert {view.width, view.height} == {256, 192}  # the whole slice, not a line
    # a volume adds the two reformats, its acquisition plane first
    planes = planes_of("volume", (MIN_REFORMAT_SLICES, 256, 192), direction)
    assert planes[0] == plane and sorted(planes) == ["axial", "coronal", "sagittal"]
    assert planes_of("plane", (1, 64, 64), direction) == ("native",)
    assert planes_of("cine", (30, 64, 64), direction) == ("native",)


@pytest.mark.parametrize("text", ["\u00b2,400", "40,\u0664\u0660\u0660", "1" * 5000 + ",400",
                                  "inf,400", "40,1e9", "nan,400", " 40,400", "40,400,1"])
def test_parse_window_takes_only_short_ascii_decimals(text: str) -> None:
    with pytest.raises(ValueError):
        parse_window(text)
    assert parse_window("-600,1500") == Window(-600, 1500)
    assert parse_window("40.5,400") == Window(40.5, 400)
