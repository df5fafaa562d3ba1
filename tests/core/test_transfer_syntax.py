"""One accepted-syntax list: the receiver offers it, the decoder refuses the rest."""

from __future__ import annotations

from pydicom.uid import MPEG4HP41, ExplicitVRLittleEndian

from core.transfer_syntax import ACCEPTED, DECODED, VIDEO
from ingest.dicom.scp import storage_contexts
from processing.decode import ACCEPTED_TRANSFER_SYNTAXES


def test_every_storage_context_offers_exactly_the_accepted_list() -> None:
    contexts = storage_contexts(extra_classes=("1.2.3.4.5",))
    assert contexts
    for cx in contexts:
        assert list(cx.transfer_syntax) == list(ACCEPTED)
    # PS3.5 10.1: Explicit VR Little Endian is the one every SCU supports.
    assert ACCEPTED[0] == ExplicitVRLittleEndian


def test_the_decoder_decodes_the_images_and_not_the_video() -> None:
    assert frozenset(DECODED) == ACCEPTED_TRANSFER_SYNTAXES
    assert MPEG4HP41 in VIDEO and MPEG4HP41 not in ACCEPTED_TRANSFER_SYNTAXES
    assert len(set(ACCEPTED)) == len(ACCEPTED)
