"""A real DICOMweb client (dicomweb-client) against a real uvicorn server on loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from dicomweb_client.api import DICOMwebClient
from fastapi import FastAPI
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.filewriter import dcmwrite

from tests.api._support import Stored, dataset_bytes, make_study
from tests.support import free_port, wait_until

pytestmark = pytest.mark.network


@pytest.fixture
def server(app: FastAPI) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    port = free_port()
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, interval=0.02, message="uvicorn did not start")
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/dicomweb"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def part10(ds: object) -> bytes:
    out = BytesIO()
    dcmwrite(out, ds, enforce_file_format=True)  # type: ignore[arg-type]
    return out.getvalue()


def test_search_retrieve_frames_metadata(server: str, ct: Stored) -> None:
    client = DICOMwebClient(url=server)
    studies = client.search_for_studies()
    assert [s["0020000D"]["Value"][0] for s in studies] == [ct.study]
    assert client.search_for_studies(search_filters={"PatientID": "nobody"}) == []
    series = client.search_for_series(ct.study)
    assert series[0]["0020000E"]["Value"] == [ct.series]
    instances = client.search_for_instances(ct.study, ct.series)
    assert [i["00080018"]["Value"][0] for i in instances] == ct.sops
    assert len(client.search_for_instances(ct.study, ct.series, limit=2, offset=1)) == 2

    for sop, path in zip(ct.sops, ct.paths, strict=True):
        ds = client.retrieve_instance(
            ct.study, ct.series, sop, media_types=(("application/dicom", "*"),)
        )
        # bytes of the data set identical to what was sent
        assert dataset_bytes(part10(ds)) == dataset_bytes(path.read_bytes())

    metadata = client.retrieve_series_metadata(ct.study, ct.series)
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sorted(ct.sops)
    assert "BulkDataURI" in metadata[0]["7FE00010"]

    (frame,) = client.retrieve_instance_frames(
        ct.study,
        ct.series,
        ct.sops[1],
        frame_numbers=[1],
        media_types=("application/octet-stream",),
    )
    assert frame == dcmread(ct.paths[1]).PixelData


def test_store_instances(server: str, app: FastAPI, tmp_path: Path) -> None:
    client = DICOMwebClient(url=server)
    paths = make_study(tmp_path / "stow", slices=2)
    datasets = [dcmread(p) for p in paths]
    response = client.store_instances(datasets)
    assert len(response.ReferencedSOPSequence) == 2
    assert "FailedSOPSequence" not in response
    study = str(datasets[0].StudyInstanceUID)
    got = client.retrieve_study(study, media_types=(("application/dicom", "*"),))
    assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(
        str(d.SOPInstanceUID) for d in datasets
    )
    by_uid = {str(d.SOPInstanceUID): d for d in got}
    for d in datasets:
        assert np.array_equal(by_uid[str(d.SOPInstanceUID)].pixel_array, d.pixel_array)
    assert app.state.index.counts()["instances"] == 2


def test_compressed_bulkdata_and_frames_decoded(server: str, app: FastAPI) -> None:
    """python dicomweb-client asks octet-stream for bulk data and frames: compressed
    Pixel Data comes back decoded (issue 13.8), at the BulkDataURI of the metadata."""
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("emri_small_jpeg_2k_lossless.dcm"))  # type: ignore[arg-type]
    with path.open("rb") as fp:
        from storage.staging import stage_part10

        staged = stage_part10(app.state.archive.staging_dir(), fp, fsync=False)
    app.state.archive.accept(staged, calling_ae="TEST")
    ds = dcmread(path)
    client = DICOMwebClient(url=server)
    meta = client.retrieve_instance_metadata(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    )
    uri = meta["7FE00010"]["BulkDataURI"]
    assert uri.startswith(server + "/studies/")
    octets = ("application/octet-stream",)
    assert client.retrieve_bulkdata(uri, media_types=octets) == [ds.pixel_array.tobytes()]
    # any media type (*/*): the frames as stored, one part each
    assert client.retrieve_bulkdata(uri) == list(generate_frames(ds.PixelData, number_of_frames=10))
    frames = client.retrieve_instance_frames(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
        frame_numbers=[3, 7], media_types=octets,
    )
    assert frames == [ds.pixel_array[2].tobytes(), ds.pixel_array[6].tobytes()]
