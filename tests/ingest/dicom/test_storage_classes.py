"""Private storage SOP classes: accepted only when listed (issue 16 §5), served like others."""

from __future__ import annotations

import pytest
from pynetdicom import AE

from core.errors import NotFoundError
from core.settings import QueryRetrieveSettings, Settings
from tests.ingest.dicom.qr_data import Study, build, store
from tests.support import Receiver

pytestmark = pytest.mark.network

PRIVATE = "1.2.826.0.1.3680043.8.498.99.16.1"  # a vendor's private storage class
OTHER_PRIVATE = "1.2.826.0.1.3680043.8.498.99.16.2"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"qr": QueryRetrieveSettings(private_storage_classes=[PRIVATE])}
    )


def test_listed_private_class_is_stored_and_indexed(receiver: Receiver) -> None:
    study = Study("PV001", "BUI^THI K", "20240801", "A8001", [("OT", PRIVATE, 2)])
    store(receiver.port, build(study), calling="VENDOR")
    for uid in study.sop_uids[0]:
        inst = receiver.index.get_instance(uid)  # type: ignore[attr-defined]
        assert inst.sop_class_uid == PRIVATE


def test_unlisted_private_class_is_refused(receiver: Receiver) -> None:
    study = Study("PV002", "BUI^THI L", "20240802", "A8002", [("OT", OTHER_PRIVATE, 1)])
    datasets = build(study)
    ae = AE(ae_title="VENDOR")
    ae.add_requested_context(OTHER_PRIVATE, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="PACSLAB")
    # The only proposed context is rejected (PS3.8 9.3.3.2: abstract syntax not
    # supported), so there is no association, or one that cannot carry the class.
    if assoc.is_established:
        assert assoc.accepted_contexts == []
        with pytest.raises(ValueError):
            assoc.send_c_store(datasets[0])
        assoc.release()
    with pytest.raises(NotFoundError):
        receiver.index.get_instance(study.sop_uids[0][0])  # type: ignore[attr-defined]
