"""Archive option: transcode a stored original to HTJ2K lossless.

Transfer syntax 1.2.840.10008.1.2.4.201, High-Throughput JPEG 2000 Image Compression
(Lossless Only), PS3.5 A.4.11. Each frame is encoded reversibly with OpenJPH (through
imagecodecs) and encapsulated one fragment per frame with a Basic Offset Table
(PS3.5 A.4), so the result stays a valid Part-10 file and decodes back bit-exact.

Colour images are encoded from their decoded RGB samples (YBR is converted, as
PS3.5 A.4.4 requires the photometric interpretation to describe the decoded data);
the Photometric Interpretation becomes ``RGB`` and Planar Configuration 0.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
from pydicom.encaps import encapsulate
from pydicom.uid import HTJ2KLossless

from core.errors import InvalidDatasetError
from processing.decode import InstanceInfo, iter_frames, read_instance_info

__all__ = ["HTJ2K_LOSSLESS", "transcode_htj2k"]

logger = logging.getLogger(__name__)

HTJ2K_LOSSLESS: Final = HTJ2KLossless


def _stored_frames(info: InstanceInfo) -> list[bytes]:
    """Encode every frame of stored values (Modality LUT *not* applied)."""
    import imagecodecs

    raw = replace(info, modality_lut_applied=False, dtype=info.stored_dtype)
    out = []
    for frame in iter_frames(raw):
        if frame.dtype.itemsize > 2 or frame.dtype.kind == "f":
            raise InvalidDatasetError(
                f"HTJ2K cannot hold {frame.dtype} samples losslessly (PS3.5 A.4.11)"
            )
        out.append(bytes(imagecodecs.htj2k_encode(np.ascontiguousarray(frame),
                                                  reversible=True)))
    return out


def transcode_htj2k(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write ``src`` re-encoded as HTJ2K lossless to ``dst``.

    Parameters
    ----------
    src
        A Part-10 file in any accepted transfer syntax.
    dst
        Where to write the transcoded file (may equal ``src``'s directory).

    Returns
    -------
    pathlib.Path
        ``dst``.

    Raises
    ------
    InvalidDatasetError
        ``src`` cannot be read or decoded, or holds samples HTJ2K cannot encode
        losslessly (float, 32-bit).
    """
    info = read_instance_info(src)
    if info.bits_allocated == 1:
        raise InvalidDatasetError("1-bit (Segmentation) pixel data is not transcoded")
    fragments = _stored_frames(info)
    try:
        ds = pydicom.dcmread(src)
    except Exception as exc:
        raise InvalidDatasetError(f"cannot re-read {Path(src).name}: {exc}") from exc
    ds.PixelData = encapsulate(fragments, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if info.samples_per_pixel == 3:
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = HTJ2K_LOSSLESS
    # Lossless: Lossy Image Compression (0028,2110) stays as it was (PS3.3 C.7.6.1.1.5).
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(dst.suffix + ".part")
    ds.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, dst)
    logger.info("transcoded %s to HTJ2K lossless (%d frames)", info.sop_instance_uid,
                len(fragments))
    return dst
