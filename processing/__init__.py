"""pacslab processing: DICOM pixels → OME-Zarr 0.5 pyramids (issue 3).

The job worker calls :func:`convert_instance` or :func:`convert_series` (or
:func:`convert_many` for several series on one scheduler) and records the returned
:class:`ConversionResult`. :func:`transcode_htj2k` is the archive option.
The pure parts (:mod:`processing.geometry`, :mod:`processing.pyramid`) can be used
without Dask or zarr.
"""

from processing.archive import transcode_htj2k
from processing.decode import InstanceInfo, iter_frames, read_instance_info
from processing.geometry import PlaneRef, Stack, build_stacks
from processing.pyramid import PyramidPlan, plan_pyramid
from processing.tiling import (
    ConversionResult,
    ImageResult,
    convert_instance,
    convert_many,
    convert_series,
    enable_zarrs,
)

__all__ = [
    "ConversionResult",
    "ImageResult",
    "InstanceInfo",
    "PlaneRef",
    "PyramidPlan",
    "Stack",
    "build_stacks",
    "convert_instance",
    "convert_many",
    "convert_series",
    "enable_zarrs",
    "iter_frames",
    "plan_pyramid",
    "read_instance_info",
    "transcode_htj2k",
]
