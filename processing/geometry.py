"""Series → stacks: pure geometry over header values (no I/O).

CT/MR slices are ordered along the slice normal, the cross product of the row and
column direction cosines of Image Orientation (Patient) (PS3.3 C.7.6.2.1.1), by
projecting Image Position (Patient) onto it; Instance Number is never used for order.
The spacing between slices comes from the positions, not from Slice Thickness or
Spacing Between Slices. A series splits into separate stacks when orientation,
Rows/Columns, Pixel Spacing or the slice spacing changes (localizers, multiple
acquisitions, variable-pitch reconstructions). Positions that do not advance along
the normal are flagged as gantry tilt (PS3.3 C.8.2.1 Gantry/Detector Tilt).

Projection radiographs and ultrasound (CR/DX/MG/US, no Image Plane module) are single
planes; multi-frame images without per-frame positions become time series (cine,
PS3.3 C.7.6.5 Cine module).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "PlaneRef",
    "Stack",
    "StackKind",
    "build_stacks",
]

Vec3 = tuple[float, float, float]
StackKind = Literal["volume", "plane", "cine"]

#: Direction cosines equal within this (PS3.3 C.7.6.2.1.1 allows float noise).
_ORIENTATION_TOL = 1e-4
#: Relative spacing change that starts a new stack.
_SPACING_REL_TOL = 0.02
#: Absolute spacing change (mm) tolerated whatever the relative change.
_SPACING_ABS_TOL = 0.01
#: Angle (rad) between the slice-to-slice step and the normal flagged as tilt.
_TILT_TOL = math.radians(0.5)


@dataclass(frozen=True, slots=True)
class PlaneRef:
    """One 2-D plane to place: a frame of an instance, with its header geometry.

    ``key`` identifies the source (e.g. the instance's path or index) and is carried
    through unchanged into :attr:`Stack.planes`.
    """

    key: str
    sop_instance_uid: str
    frame: int
    rows: int
    columns: int
    position: Vec3 | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    number_of_frames: int = 1
    frame_time_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Stack:
    """A regularly sampled set of planes, ready to become one multiscale image.

    Attributes
    ----------
    kind
        ``volume`` (z along the normal), ``plane`` (one 2-D image) or ``cine``
        (frames in time).
    shape
        ``(planes, rows, columns)``.
    origin
        Patient coordinates (LPS, mm) of the centre of the first voxel.
    spacing
        ``(z, y, x)`` in mm; z is the frame time in seconds for cine.
    direction
        Row cosine, column cosine and slice normal (PS3.3 C.7.6.2.1.1).
    planes
        The planes in stack order.
    warnings
        Human-readable notes (gantry tilt, missing spacing, duplicates).
    """

    kind: StackKind
    shape: tuple[int, int, int]
    origin: Vec3
    spacing: Vec3
    direction: tuple[Vec3, Vec3, Vec3]
    planes: tuple[PlaneRef, ...]
    gantry_tilt: bool = False
    warnings: tuple[str, ...] = field(default=())

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        """Distinct SOP Instance UIDs in stack order."""
        return tuple(dict.fromkeys(p.sop_instance_uid for p in self.planes))


def _cross(a: Vec3, b: Vec3) -> Vec3:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dot(a: Vec3, b: Vec3) -> float:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _norm(a: Vec3) -> Vec3:
    n = math.sqrt(_dot(a, a)) or 1.0
    return (a[0] / n, a[1] / n, a[2] / n)


def _sub(a: Vec3, b: Vec3) -> Vec3:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def _same_orientation(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(abs(x - y) <= _ORIENTATION_TOL for x, y in zip(a, b, strict=True))


def _spacing_changed(step: float, ref: float) -> bool:
    return abs(step - ref) > max(_SPACING_ABS_TOL, _SPACING_REL_TOL * abs(ref))


def _pixel_spacing(p: PlaneRef, warnings: list[str]) -> tuple[float, float]:
    if p.pixel_spacing is None or min(p.pixel_spacing) <= 0:
        warnings.append("no Pixel Spacing (PS3.3 C.7.6.2.1.7): 1 mm assumed")
        return (1.0, 1.0)
    return p.pixel_spacing


def _flat_stack(p: PlaneRef) -> Stack:
    """A single 2-D plane or a cine loop (no patient geometry)."""
    warnings: list[str] = []
    ps = _pixel_spacing(p, warnings)
    direction: tuple[Vec3, Vec3, Vec3] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    if p.orientation is not None:
        row = _norm(p.orientation[:3])
        col = _norm(p.orientation[3:])
        direction = (row, col, _norm(_cross(row, col)))
    origin = p.position or (0.0, 0.0, 0.0)
    if p.number_of_frames > 1:
        dt = (p.frame_time_ms or 0.0) / 1000.0
        if dt <= 0:
            warnings.append("no Frame Time (PS3.3 C.7.6.5.1.2): 1 s between frames assumed")
            dt = 1.0
        planes = tuple(
            PlaneRef(p.key, p.sop_instance_uid, f, p.rows, p.columns, p.position,
                     p.orientation, p.pixel_spacing, p.number_of_frames, p.frame_time_ms)
            for f in range(p.number_of_frames)
        )
        return Stack("cine", (p.number_of_frames, p.rows, p.columns), origin,
                     (dt, ps[0], ps[1]), direction, planes, False, tuple(warnings))
    return Stack("plane", (1, p.rows, p.columns), origin, (1.0, ps[0], ps[1]), direction,
                 (p,), False, tuple(warnings))


def _volume_stacks(group: list[PlaneRef]) -> list[Stack]:
    """Order one orientation/size group along its normal and split it into stacks."""
    o = group[0].orientation
    assert o is not None
    row, col = _norm(o[:3]), _norm(o[3:])
    normal = _norm(_cross(row, col))
    keyed = sorted(group, key=lambda p: (_dot(p.position, normal), p.key, p.frame))  # type: ignore[arg-type]

    # Planes at the same position belong to different acquisitions: the n-th
    # occurrence of each position goes to the n-th run (PS3.3 C.7.3.1 does not
    # forbid repeated positions in one series, e.g. dynamic or multi-echo series).
    runs: list[list[PlaneRef]] = []
    last_d: float | None = None
    occurrence = 0
    for p in keyed:
        d = _dot(p.position, normal)  # type: ignore[arg-type]
        if last_d is not None and abs(d - last_d) <= _SPACING_ABS_TOL:
            occurrence += 1
        else:
            occurrence = 0
        last_d = d
        while len(runs) <= occurrence:
            runs.append([])
        runs[occurrence].append(p)

    stacks: list[Stack] = []
    for run in runs:
        current: list[PlaneRef] = [run[0]]
        step_ref: float | None = None
        for p in run[1:]:
            step = _dot(_sub(p.position, current[-1].position), normal)  # type: ignore[arg-type]
            if step_ref is not None and _spacing_changed(step, step_ref):
                stacks.append(_make_volume(current, row, col, normal))
                current, step_ref = [p], None
                continue
            if step_ref is None:
                step_ref = step
            current.append(p)
        stacks.append(_make_volume(current, row, col, normal))
    return stacks


def _make_volume(planes: list[PlaneRef], row: Vec3, col: Vec3, normal: Vec3) -> Stack:
    warnings: list[str] = []
    first = planes[0]
    ps = _pixel_spacing(first, warnings)
    tilt = False
    if len(planes) > 1:
        first_pos, last_pos = first.position, planes[-1].position
        assert first_pos is not None and last_pos is not None
        span = _sub(last_pos, first_pos)
        along = _dot(span, normal)
        dz = along / (len(planes) - 1)
        length = math.sqrt(_dot(span, span))
        angle = math.acos(min(1.0, abs(along) / length)) if length > 0 else 0.0
        if angle > _TILT_TOL:
            tilt = True
            warnings.append(
                f"gantry tilt: slices advance {math.degrees(angle):.2f}° off the normal; "
                "the volume is sheared, not resampled (PS3.3 C.8.2.1)"
            )
    else:
        dz = 1.0
        warnings.append("single slice: z spacing of 1 mm assumed")
    origin = first.position
    assert origin is not None
    return Stack("volume", (len(planes), first.rows, first.columns), origin,
                 (dz, ps[0], ps[1]), (row, col, normal), tuple(planes), tilt,
                 tuple(warnings))


def build_stacks(planes: Sequence[PlaneRef]) -> tuple[Stack, ...]:
    """Group a series' planes into regularly sampled stacks.

    Parameters
    ----------
    planes
        Every frame of every instance of a series, in any (arrival) order.

    Returns
    -------
    tuple of Stack
        Volumes first, largest first; then single planes and cine loops in input
        order. Planes with position and orientation (Image Plane module,
        PS3.3 C.7.6.2, or Plane Position/Orientation functional groups,
        PS3.3 C.7.6.16.2.3-4) form volumes; others are single planes or cine.
    """
    groups: list[tuple[tuple[float, ...], tuple[int, int], tuple[float, float] | None,
                       list[PlaneRef]]] = []
    flats: list[PlaneRef] = []
    seen_flat: set[str] = set()
    for p in planes:
        if p.position is None or p.orientation is None:
            if p.key not in seen_flat:  # one cine/plane stack per instance
                seen_flat.add(p.key)
                flats.append(p)
            continue
        for ori, size, spacing, members in groups:
            if (
                size == (p.rows, p.columns)
                and _same_orientation(ori, p.orientation)
                and (spacing == p.pixel_spacing or (
                    spacing is not None and p.pixel_spacing is not None
                    and all(abs(a - b) <= 1e-4 for a, b in zip(spacing, p.pixel_spacing,
                                                                strict=True))))
            ):
                members.append(p)
                break
        else:
            groups.append((p.orientation, (p.rows, p.columns), p.pixel_spacing, [p]))

    volumes = [s for *_, members in groups for s in _volume_stacks(members)]
    volumes.sort(key=lambda s: -s.shape[0])
    return tuple(volumes) + tuple(_flat_stack(p) for p in flats)
