"""DICOMweb helpers (PS3.18) behind :mod:`api.routes.dicomweb`: media types and
multipart bodies, QIDO-RS parsing and DICOM JSON, pixel data, STOW-RS."""

from api.dicomweb._multipart import MediaRange, iter_parts, multipart_body, parse_accept
from api.dicomweb._qido import Search, fill_bulkdata_uris, parse_search, qido_json
from api.dicomweb._stow import StowResult, store_body

__all__ = [
    "MediaRange",
    "Search",
    "StowResult",
    "fill_bulkdata_uris",
    "iter_parts",
    "multipart_body",
    "parse_accept",
    "parse_search",
    "qido_json",
    "store_body",
]
