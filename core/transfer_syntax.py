"""The transfer syntaxes pacslab accepts and decodes: one list (PS3.5 Annex A, 8, 10).

The DICOM receiver's presentation contexts (``ingest/dicom/scp.py``) and the pixel
decoder's refusal of anything else (``processing/decode.py``) were two hand-kept
lists of UID literals; both now read these tuples, written with pydicom's
:mod:`pydicom.uid` constants (pydicom's table of PS3.6 Annex A), so adding a
syntax is one line here.
"""

from __future__ import annotations

from typing import Final

from pydicom.uid import (
    HEVCMP51,
    HTJ2K,
    JPEG2000,
    MPEG2MPML,
    MPEG4HP41,
    MPEG4HP41BD,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

__all__ = ["ACCEPTED", "DECODED", "VIDEO"]

#: Decoded to pixels (and so to pyramids and rendered frames) by ``processing.decode``:
#: the native encodings (Explicit VR Big Endian is retired, PS3.5 A.3, but old
#: modalities still send it) and the image compressions pydicom's plugins or
#: imagecodecs decode.
DECODED: Final[tuple[UID, ...]] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
)

#: Video (ultrasound, endoscopy): stored and served as received, never decoded.
VIDEO: Final[tuple[UID, ...]] = (MPEG2MPML, MPEG4HP41, MPEG4HP41BD, HEVCMP51)

#: What the receiver accepts, as received and never transcoded; Explicit VR Little
#: Endian first (the one every SCU must support, PS3.5 10.1).
ACCEPTED: Final[tuple[UID, ...]] = (*DECODED, *VIDEO)
