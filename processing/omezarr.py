"""OME-Zarr 0.5 metadata on Zarr v3, plus our own ``pacslab`` attributes.

Layout of one conversion (``out_url``)::

    out_url/zarr.json          group; attributes.pacslab = series summary, image list
    out_url/0/zarr.json        image group; attributes.ome = OME-Zarr 0.5 multiscales,
                               attributes.pacslab = UIDs, windows, rescale, geometry
    out_url/0/0 … 0/N          one array per level, dimension_names = axis names

Axes follow OME-NGFF 0.5 ordering (time, channel, space): ``z,y,x`` for volumes,
``y,x`` for single planes, ``t,y,x`` for cine, and a ``c`` channel axis for RGB.
Spatial units are millimetre, as DICOM's (PS3.3 C.7.6.2.1.1); the per-level
``scale`` is the voxel size and ``translation`` places the centre of the level's
first voxel in the image's own frame (the DICOM origin projected on the row, column
and normal directions). OME-Zarr 0.5 has no rotation, so the full origin and
direction cosines are kept under ``pacslab``.

:func:`image_attributes` is pure; :func:`create_image` does the zarr I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from processing.geometry import Stack
from processing.pyramid import CodecSpec, LevelPlan, PyramidPlan

if TYPE_CHECKING:
    import zarr

    from processing.decode import InstanceInfo

__all__ = [
    "OME_VERSION",
    "array_axes",
    "create_image",
    "image_attributes",
    "zarr_codecs",
]

OME_VERSION: Final = "0.5"


def array_axes(kind: str, samples_per_pixel: int) -> tuple[str, ...]:
    """Axis names of the stored arrays for a stack kind (OME-NGFF 0.5 order)."""
    spatial = {"volume": ("z", "y", "x"), "plane": ("y", "x"), "cine": ("t", "y", "x")}[kind]
    if samples_per_pixel == 1:
        return spatial
    if kind == "cine":
        return ("t", "c", "y", "x")
    return ("c", *spatial)


def _axis_meta(name: str) -> dict[str, str]:
    if name == "c":
        return {"name": "c", "type": "channel"}
    if name == "t":
        return {"name": "t", "type": "time", "unit": "second"}
    return {"name": name, "type": "space", "unit": "millimeter"}


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return float(sum(x * y for x, y in zip(a, b, strict=True)))


def level_transform(
    stack: Stack, level: LevelPlan, axes: Sequence[str]
) -> tuple[list[float], list[float]]:
    """OME ``scale`` and ``translation`` of one level, in ``axes`` order."""
    row, col, normal = stack.direction
    if stack.kind == "volume":
        base = {"z": _dot(stack.origin, normal), "y": _dot(stack.origin, col),
                "x": _dot(stack.origin, row)}
    else:
        base = {"z": 0.0, "t": 0.0, "y": 0.0, "x": 0.0}
    base.setdefault("t", 0.0)
    spacing0 = dict(zip(("z", "y", "x"), stack.spacing, strict=True))
    spacing0["t"] = spacing0["z"]
    factor = dict(zip(("z", "y", "x"), level.factor, strict=True))
    factor["t"] = factor["z"]
    scale, translation = [], []
    for a in axes:
        if a == "c":
            scale.append(1.0)
            translation.append(0.0)
            continue
        scale.append(spacing0[a] * factor[a])
        # Level k's first voxel centre is the mean of factor level-0 voxel centres.
        translation.append(base[a] + (factor[a] - 1) / 2.0 * spacing0[a])
    return scale, translation


def image_attributes(
    stack: Stack,
    plan: PyramidPlan,
    info: InstanceInfo,
    *,
    name: str = "",
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """Attributes of one image group: ``ome`` (OME-Zarr 0.5) and ``pacslab``.

    Parameters
    ----------
    stack
        Geometry from :func:`processing.geometry.build_stacks`.
    plan
        Levels from :func:`processing.pyramid.plan_pyramid`.
    info
        The first instance of the stack, for UIDs, photometric interpretation
        (PS3.3 C.7.6.3.1.2), Modality LUT (PS3.3 C.11.1) and VOI LUT windows
        (PS3.3 C.11.2).
    """
    axes = array_axes(stack.kind, info.samples_per_pixel)
    datasets = []
    for level in plan.levels:
        scale, translation = level_transform(stack, level, axes)
        datasets.append({
            "path": str(level.index),
            "coordinateTransformations": [
                {"type": "scale", "scale": scale},
                {"type": "translation", "translation": translation},
            ],
        })
    ome = {
        "version": OME_VERSION,
        "multiscales": [{
            "name": name or info.series_instance_uid,
            "axes": [_axis_meta(a) for a in axes],
            "datasets": datasets,
            "type": "mean",
        }],
    }
    pacslab = {
        "study_instance_uid": info.study_instance_uid,
        "series_instance_uid": info.series_instance_uid,
        "frame_of_reference_uid": info.frame_of_reference_uid,
        "sop_class_uid": info.sop_class_uid,
        "sop_instance_uids": list(stack.sop_instance_uids),
        "frames": [[p.sop_instance_uid, p.frame] for p in stack.planes]
        if any(p.frame for p in stack.planes) else None,
        "modality": info.modality,
        "kind": stack.kind,
        "photometric_interpretation": info.photometric_interpretation,
        "stored_photometric_is_inverted": info.photometric_interpretation == "MONOCHROME1",
        "output_photometric": info.output_photometric,
        "rescale": {
            "slope": info.rescale_slope,
            "intercept": info.rescale_intercept,
            "type": info.rescale_type,
            "applied": info.modality_lut_applied,
        },
        "windows": [
            {"center": w.center, "width": w.width, "explanation": w.explanation}
            for w in info.windows
        ],
        "bits_stored": info.bits_stored,
        "transfer_syntax_uid": info.transfer_syntax_uid,
        "origin_lps_mm": list(stack.origin),
        "direction_cosines": [list(v) for v in stack.direction],
        "spacing_zyx": list(stack.spacing),
        "gantry_tilt": stack.gantry_tilt,
        "warnings": list(warnings),
    }
    return {"ome": ome, "pacslab": pacslab}


def zarr_codecs(spec: CodecSpec) -> Any:
    """The zarr-python v3 compressor for a :class:`CodecSpec`."""
    from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

    if spec.name == "blosc":
        return BloscCodec(cname="zstd", clevel=spec.level, shuffle=BloscShuffle[spec.shuffle])
    return ZstdCodec(level=spec.level)


def _array_layout(level: LevelPlan, axes: Sequence[str], kind: str,
                  samples: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    dims = {"z": 0, "t": 0, "y": 1, "x": 2}
    shape, chunks, shards = [], [], []
    for a in axes:
        if a == "c":
            shape.append(samples)
            chunks.append(samples)
            shards.append(samples)
            continue
        i = dims[a]
        shape.append(level.shape[i])
        chunks.append(level.chunks[i])
        shards.append(level.shards[i])
    del kind
    return tuple(shape), tuple(chunks), tuple(shards)


def create_image(
    parent: zarr.Group,
    path: str,
    stack: Stack,
    plan: PyramidPlan,
    info: InstanceInfo,
    *,
    warnings: Sequence[str] = (),
) -> zarr.Group:
    """Create the image group and its (empty) level arrays under ``parent``."""
    attrs = image_attributes(stack, plan, info, warnings=warnings)
    group = parent.create_group(path, attributes=attrs, overwrite=True)
    axes = array_axes(stack.kind, info.samples_per_pixel)
    dtype = np.dtype(info.dtype)
    for level in plan.levels:
        shape, chunks, shards = _array_layout(level, axes, stack.kind, info.samples_per_pixel)
        group.create_array(
            str(level.index),
            shape=shape,
            dtype=dtype.newbyteorder("="),
            chunks=chunks,
            shards=shards,
            compressors=zarr_codecs(plan.codec),
            fill_value=0,
            dimension_names=axes,
            overwrite=True,
        )
    return group
