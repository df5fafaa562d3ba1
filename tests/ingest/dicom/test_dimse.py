from __future__ import annotations

from io import BytesIO

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from ingest.dicom.dimse import C_STORE_RSP, Command, decode_command, encode_response


def test_response_decodes_with_pynetdicom() -> None:
    request = Command(command_field=0x0001, message_id=7, has_dataset=True,
                      affected_sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                      affected_sop_instance_uid="1.2.3.45")
    raw = encode_response(C_STORE_RSP, request, 0xC000, "missing SOPInstanceUID")
    ds = decode(BytesIO(raw), True, True)
    assert ds.CommandField == 0x8001 and ds.MessageIDBeingRespondedTo == 7
    assert ds.Status == 0xC000 and ds.ErrorComment == "missing SOPInstanceUID"
    assert ds.AffectedSOPInstanceUID == "1.2.3.45" and ds.CommandDataSetType == 0x0101
    assert ds.CommandGroupLength == len(raw) - 12


def test_request_encoded_by_pynetdicom_decodes() -> None:
    ds = Dataset()
    ds.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.CommandField = 0x0001
    ds.MessageID = 3
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000
    ds.AffectedSOPInstanceUID = "1.2.3.4.5"
    raw = encode(ds, True, True)
    assert raw is not None
    cmd = decode_command(raw)
    assert (cmd.command_field, cmd.message_id, cmd.has_dataset) == (1, 3, True)
    assert cmd.affected_sop_instance_uid == "1.2.3.4.5"
