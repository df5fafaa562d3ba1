"""DICOM over TLS (PS3.15 B.1): the receiver wraps the connection and pynetdicom serves it."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage
from pynetdicom import AE

from core.settings import Settings
from core.synthetic import write_ct_series
from tests.support import Receiver

pytestmark = pytest.mark.network


@pytest.fixture
def tls_settings(settings: Settings, tmp_path: Path) -> Settings:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                    "/CN=localhost", "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    settings.dicom.tls_cert, settings.dicom.tls_key = cert, key
    return settings


def test_cstore_over_tls(tls_settings: Settings, tmp_path: Path,
                         request: pytest.FixtureRequest) -> None:
    receiver: Receiver = request.getfixturevalue("receiver")
    ds = dcmread(write_ct_series(tmp_path / "ct", slices=1, rows=32, columns=32)[0])
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                        cafile=str(tls_settings.dicom.tls_cert))
    client.check_hostname = False
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", receiver.port, tls_args=(client, None))
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert receiver.index.get_instance(ds.SOPInstanceUID).version == 1  # type: ignore[attr-defined]

    # a plain-TCP peer gets nowhere on the TLS port
    plain = AE(ae_title="PLAIN")
    plain.add_requested_context(CTImageStorage)
    plain.acse_timeout = plain.network_timeout = 3
    assert not plain.associate("127.0.0.1", receiver.port).is_established
