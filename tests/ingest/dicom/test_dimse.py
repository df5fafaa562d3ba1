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


def test_move_response_with_counts_and_store_request_decode_with_pynetdicom() -> None:
    from ingest.dicom.dimse import C_MOVE_RSP, encode_store_rq

    request = Command(command_field=0x0021, message_id=9, has_dataset=True,
                      affected_sop_class_uid="1.2.840.10008.5.1.4.1.2.2.2")
    raw = encode_response(C_MOVE_RSP, request, 0xFF00, counts=(4, 1, 0, 0))
    ds = decode(BytesIO(raw), True, True)
    assert ds.CommandField == 0x8021 and ds.MessageIDBeingRespondedTo == 9
    assert (ds.NumberOfRemainingSuboperations, ds.NumberOfCompletedSuboperations,
            ds.NumberOfFailedSuboperations, ds.NumberOfWarningSuboperations) == (4, 1, 0, 0)
    final = decode(BytesIO(encode_response(C_MOVE_RSP, request, 0xB000, has_dataset=True,
                                           counts=(None, 1, 1, 0))), True, True)
    assert "NumberOfRemainingSuboperations" not in final  # PS3.4 C.4.2.1.5: final
    assert final.CommandDataSetType != 0x0101
    rq = encode_store_rq(3, "1.2.840.10008.5.1.4.1.1.2", "1.2.3", move_originator_aet="MOVESCU",
                         move_originator_id=9)
    ds = decode(BytesIO(rq), True, True)
    assert ds.MoveOriginatorApplicationEntityTitle == "MOVESCU"
    assert ds.MoveOriginatorMessageID == 9 and ds.MessageID == 3
    assert ds.CommandGroupLength == len(rq) - 12


def test_status_and_cancel_fields_are_decoded() -> None:
    from ingest.dicom.dimse import C_STORE_RSP as RSP

    request = Command(command_field=0x0001, message_id=5, has_dataset=True,
                      affected_sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                      affected_sop_instance_uid="1.2.3")
    rsp = decode_command(encode_response(RSP, request, 0xB007))
    assert (rsp.status, rsp.message_id_responded) == (0xB007, 5)
    cancel = Dataset()
    cancel.CommandField = 0x0FFF
    cancel.MessageIDBeingRespondedTo = 7
    cancel.CommandDataSetType = 0x0101
    raw = encode(cancel, True, True)
    assert raw is not None
    cmd = decode_command(raw)
    assert (cmd.command_field, cmd.message_id_responded, cmd.status) == (0x0FFF, 7, None)
