"""Vietnamese character sets: Windows-1258 and TCVN3 (VN3), as Python codecs.

Vietnamese hospital systems send three encodings besides ASCII: UTF-8, Windows-1258
(Python's ``cp1258``, which writes most tone marks as *combining* characters after
the base letter, so text must be NFC-normalised after decoding) and TCVN3, the
8-bit "ABC" code of TCVN 5712:1993, variant VN3. Python has no TCVN3 codec and no
maintained PyPI package provides one, so the table below is written out from the
standard: VN3 keeps ASCII in 0x00-0x7F and puts the seven base letters with a
diacritic (``Ă Â Ê Ô Ơ Ư Đ`` and their lower case) at 0xA1-0xAE and the 60
lower-case precomposed letters with tone marks at 0xB5-0xFE. VN3 has no upper-case
toned letters (fonts drew them from a separate upper-case face), so bytes the
table leaves out are undefined and fail to decode, like any strict codec.

Importing this module registers the codec under ``tcvn3`` (aliases ``vn3``,
``tcvn``, ``tcvn5712``, ``tcvn-5712``); :func:`codec_for` maps the names senders
write in HL7 MSH-18 or in a profile to a Python codec.
"""

from __future__ import annotations

import codecs
import unicodedata
from typing import Final

__all__ = ["TCVN3_DECODING", "codec_for", "decode_text", "encode_text", "register"]

#: TCVN 5712:1993 VN3, bytes 0xA1-0xFE (the rest of 0x80-0xFF is undefined).
_VN3_HIGH: Final[dict[int, str]] = {
    0xA1: "Ă", 0xA2: "Â", 0xA3: "Ê", 0xA4: "Ô", 0xA5: "Ơ", 0xA6: "Ư", 0xA7: "Đ",
    0xA8: "ă", 0xA9: "â", 0xAA: "ê", 0xAB: "ô", 0xAC: "ơ", 0xAD: "ư", 0xAE: "đ",
    0xB5: "à", 0xB6: "ả", 0xB7: "ã", 0xB8: "á", 0xB9: "ạ",
    0xBB: "ằ", 0xBC: "ẳ", 0xBD: "ẵ", 0xBE: "ắ", 0xC6: "ặ",
    0xC7: "ầ", 0xC8: "ẩ", 0xC9: "ẫ", 0xCA: "ấ", 0xCB: "ậ",
    0xCC: "è", 0xCE: "ẻ", 0xCF: "ẽ", 0xD0: "é", 0xD1: "ẹ",
    0xD2: "ề", 0xD3: "ể", 0xD4: "ễ", 0xD5: "ế", 0xD6: "ệ",
    0xD7: "ì", 0xD8: "ỉ", 0xDC: "ĩ", 0xDD: "í", 0xDE: "ị",
    0xDF: "ò", 0xE1: "ỏ", 0xE2: "õ", 0xE3: "ó", 0xE4: "ọ",
    0xE5: "ồ", 0xE6: "ổ", 0xE7: "ỗ", 0xE8: "ố", 0xE9: "ộ",
    0xEA: "ờ", 0xEB: "ở", 0xEC: "ỡ", 0xED: "ớ", 0xEE: "ợ",
    0xEF: "ù", 0xF1: "ủ", 0xF2: "ũ", 0xF3: "ú", 0xF4: "ụ",
    0xF5: "ừ", 0xF6: "ử", 0xF7: "ữ", 0xF8: "ứ", 0xF9: "ự",
    0xFA: "ỳ", 0xFB: "ỷ", 0xFC: "ỹ", 0xFD: "ý", 0xFE: "ỵ",
}  # fmt: skip

#: The 256-character decoding table (U+FFFE marks an undefined byte, which
#: ``codecs.charmap_decode`` reports as an error).
TCVN3_DECODING: Final[str] = "".join(
    chr(b) if b < 0x80 else _VN3_HIGH.get(b, "\ufffe") for b in range(256)
)
_TCVN3_ENCODING: Final = codecs.charmap_build(TCVN3_DECODING)
_TCVN3_NAMES: Final = frozenset({"tcvn3", "vn3", "tcvn", "tcvn5712", "tcvn_5712", "tcvn5712_1"})


class _Tcvn3Codec(codecs.Codec):
    def encode(self, input: str, errors: str = "strict") -> tuple[bytes, int]:
        # Decomposed input (from Windows-1258) has no VN3 code: compose first.
        return codecs.charmap_encode(unicodedata.normalize("NFC", input), errors, _TCVN3_ENCODING)

    def decode(self, input: bytes, errors: str = "strict") -> tuple[str, int]:
        return codecs.charmap_decode(input, errors, TCVN3_DECODING)


class _IncrementalEncoder(codecs.IncrementalEncoder):
    def encode(self, input: str, final: bool = False) -> bytes:
        return _Tcvn3Codec().encode(input, self.errors)[0]


class _IncrementalDecoder(codecs.IncrementalDecoder):
    def decode(self, input: bytes, final: bool = False) -> str:  # type: ignore[override]
        return _Tcvn3Codec().decode(input, self.errors)[0]


class _StreamWriter(_Tcvn3Codec, codecs.StreamWriter):
    pass


class _StreamReader(_Tcvn3Codec, codecs.StreamReader):
    pass


def _search(name: str) -> codecs.CodecInfo | None:
    if name.replace("-", "_").lower() not in _TCVN3_NAMES:
        return None
    codec = _Tcvn3Codec()
    return codecs.CodecInfo(
        name="tcvn3",
        encode=codec.encode,
        decode=codec.decode,  # type: ignore[arg-type]
        incrementalencoder=_IncrementalEncoder,
        incrementaldecoder=_IncrementalDecoder,
        streamwriter=_StreamWriter,
        streamreader=_StreamReader,
    )


_registered = False


def register() -> None:
    """Register the ``tcvn3`` codec with :mod:`codecs` (idempotent)."""
    global _registered
    if not _registered:
        codecs.register(_search)
        _registered = True


register()

# Names senders write (HL7 MSH-18 has no Vietnamese entry in table 0211, so
# systems write local values) → Python codec.
_ALIASES: Final[dict[str, str]] = {
    "WINDOWS-1258": "cp1258",
    "WINDOWS1258": "cp1258",
    "CP1258": "cp1258",
    "CP-1258": "cp1258",
    "MS-1258": "cp1258",
    "TCVN3": "tcvn3",
    "TCVN-3": "tcvn3",
    "VN3": "tcvn3",
    "TCVN": "tcvn3",
    "TCVN 5712": "tcvn3",
    "TCVN5712": "tcvn3",
    "TCVN 5712:1993": "tcvn3",
    "TCVN5712:1993": "tcvn3",
}


def codec_for(name: str) -> str | None:
    """The Python codec for a Vietnamese character-set name, or ``None``."""
    return _ALIASES.get(name.strip().upper())


def decode_text(raw: bytes, codec: str) -> str:
    """Decode ``raw`` strictly and normalise to NFC (Unicode UAX #15).

    Windows-1258 writes tone marks as combining characters; the same name read
    from UTF-8 is precomposed. NFC makes both the same string, so names and test
    texts compare equal whatever the sender's code page.
    """
    return unicodedata.normalize("NFC", raw.decode(codec))


_TONES: Final = frozenset("\u0300\u0301\u0303\u0309\u0323")


def encode_text(text: str, codec: str) -> bytes:
    """Encode ``text`` for a sender that reads ``codec``; never fails.

    TCVN3 (VN3) has no upper-case toned letters: they are written with the
    lower-case code. Windows-1258 has no precomposed code for most toned letters: it writes the base
    letter (with its circumflex, breve or horn, which it has) followed by a
    combining tone mark, as Vietnamese Windows software does. Characters a code
    page cannot write at all become ``?``.
    """
    text = unicodedata.normalize("NFC", text)
    try:
        return text.encode(codec)
    except UnicodeEncodeError:
        pass
    name = codecs.lookup(codec).name
    if name == "tcvn3":
        # VN3 has no upper-case toned letters: VN3 fonts draw upper case from the
        # same codes in their upper-case face (".VnTimeH"), so the lower-case code
        # is what a VN3 system expects for "Ầ".
        return b"".join(_vn3_char(ch) for ch in text)
    if name != "cp1258":
        return text.encode(codec, errors="replace")
    out = bytearray()
    for ch in text:
        try:
            out += ch.encode("cp1258")
            continue
        except UnicodeEncodeError:
            pass
        parts = unicodedata.normalize("NFD", ch)
        base = unicodedata.normalize("NFC", "".join(c for c in parts if c not in _TONES))
        tones = "".join(c for c in parts if c in _TONES)
        out += base.encode("cp1258", errors="replace") + tones.encode("cp1258", errors="replace")
    return bytes(out)


def _vn3_char(ch: str) -> bytes:
    for candidate in (ch, ch.lower()):
        try:
            return candidate.encode("tcvn3")
        except UnicodeEncodeError:
            continue
    return b"?"
