"""WADO-RS (PS3.18 10.4) through TestClient: instances, metadata, frames, rendered."""

from __future__ import annotations

import json
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames

from api.dicomweb import iter_parts
from api.dicomweb._multipart import content_type_params
from tests.api._support import Stored, dataset_bytes, run_metadata_step, store_files


def parts(response: object) -> list[tuple[dict[str, str], bytes]]:
    content_type = response.headers["content-type"]  # type: ignore[attr-defined]
    main, params = content_type_params(content_type)
    assert main == "multipart/related"
    body: bytes = response.content  # type: ignore[attr-defined]
    return [(p.headers, body[p.start : p.end]) for p in iter_parts(body, params["boundary"])]


def instance_url(ct: Stored, i: int = 0) -> str:
    return f"/dicomweb/studies/{ct.study}/series/{ct.series}/instances/{ct.sops[i]}"


def store_testfile(app: FastAPI, name: str) -> tuple[str, str, str, Path]:
    path = Path(get_testdata_file(name))  # type: ignore[arg-type]
    store_files(app.state.archive, [path])
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), path


def test_retrieve_study_series_instance_bit_identical(client: TestClient, ct: Stored) -> None:
    originals = {p.name: dataset_bytes(p.read_bytes()) for p in ct.paths}
    for url, n in (
        (f"/dicomweb/studies/{ct.study}", 4),
        (f"/dicomweb/studies/{ct.study}/series/{ct.series}", 4),
        (instance_url(ct, 2), 1),
    ):
        r = client.get(
            url,
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        assert r.status_code == 200
        got = parts(r)
        assert len(got) == n
        for headers, body in got:
            assert headers["content-type"].startswith("application/dicom")
            assert dataset_bytes(body) in originals.values()


def test_retrieve_default_accept_explicit_le(client: TestClient, ct: Stored) -> None:
    # application/dicom without transfer-syntax means Explicit VR Little Endian; the
    # synthetic CT is stored in it, so it comes back as stored.
    r = client.get(
        instance_url(ct), headers={"Accept": 'multipart/related; type="application/dicom"'}
    )
    assert r.status_code == 200
    ((_, body),) = parts(r)
    assert dataset_bytes(body) == dataset_bytes(ct.paths[0].read_bytes())


def test_transcode_to_implicit_le(client: TestClient, ct: Stored) -> None:
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'
    r = client.get(instance_url(ct), headers={"Accept": accept})
    assert r.status_code == 200
    ((headers, body),) = parts(r)
    assert "1.2.840.10008.1.2" in headers["content-type"]
    from io import BytesIO

    ds = dcmread(BytesIO(body))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    assert ds.SOPInstanceUID == ct.sops[0]
    assert ds.PixelData == dcmread(ct.paths[0]).PixelData


def test_unreachable_transfer_syntax_is_406(client: TestClient, ct: Stored) -> None:
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    r = client.get(instance_url(ct), headers={"Accept": accept})
    assert r.status_code == 406
    assert r.headers["content-type"] == "application/problem+json"


def test_decompress_jpeg_to_explicit_le(client: TestClient, app: FastAPI) -> None:
    study, series, sop, path = store_testfile(app, "JPEG-LL.dcm")
    url = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}"
    r = client.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert r.status_code == 200
    ((_, body),) = parts(r)
    from io import BytesIO

    ds = dcmread(BytesIO(body))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(ds.pixel_array, dcmread(path).pixel_array)  # lossless


def test_metadata_from_index_and_fallback(client: TestClient, app: FastAPI, ct: Stored) -> None:
    url = f"/dicomweb/studies/{ct.study}/series/{ct.series}/metadata"
    before = client.get(url)  # instance job not run: computed from the files
    assert before.status_code == 200
    assert run_metadata_step(app) == 4
    after = client.get(url)
    assert after.json() == before.json()
    items = after.json()
    assert [i["00080018"]["Value"][0] for i in items] == ct.sops
    pixel = items[0]["7FE00010"]
    assert pixel["BulkDataURI"].endswith(f"/instances/{ct.sops[0]}/bulkdata/7FE00010")
    assert items[0]["00100010"]["Value"] == [{"Alphabetic": "NGUYEN^VAN AN"}]
    assert len(client.get(f"/dicomweb/studies/{ct.study}/metadata").json()) == 4
    one = client.get(instance_url(ct, 1) + "/metadata").json()
    assert [i["00080018"]["Value"][0] for i in one] == [ct.sops[1]]


def test_bulkdata(client: TestClient, ct: Stored) -> None:
    r = client.get(instance_url(ct) + "/bulkdata/7FE00010")
    assert r.status_code == 200
    ((_, body),) = parts(r)
    assert body == dcmread(ct.paths[0]).PixelData
    assert client.get(instance_url(ct) + "/bulkdata/00091001").status_code == 404


def test_native_frames(client: TestClient, app: FastAPI) -> None:
    study, series, sop, path = store_testfile(app, "emri_small.dcm")
    url = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/1,3,10"
    r = client.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert r.status_code == 200
    arr = dcmread(path).pixel_array
    got = parts(r)
    assert [b for _, b in got] == [arr[i].tobytes() for i in (0, 2, 9)]
    bad = url.replace("frames/1,3,10", "frames/11")
    assert client.get(bad).status_code == 404
    assert client.get(url.replace("1,3,10", "x")).status_code == 400


def test_encapsulated_frames_as_stored(client: TestClient, app: FastAPI) -> None:
    study, series, sop, path = store_testfile(app, "emri_small_jpeg_2k_lossless.dcm")
    url = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/2,5"
    ds = dcmread(path)
    stored = list(generate_frames(ds.PixelData, number_of_frames=10))
    r = client.get(url, headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert r.status_code == 200
    got = parts(r)
    assert [b for _, b in got] == [stored[1], stored[4]]
    assert got[0][0]["content-type"].startswith("image/jp2")
    # any media type: as stored
    assert [b for _, b in parts(client.get(url))] == [stored[1], stored[4]]
    # octet-stream without transfer-syntax: decoded to native pixels
    r = client.get(url, headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert r.status_code == 200
    assert parts(r)[0][1] == ds.pixel_array[1].tobytes()
    # a compressed type the frames are not in
    r = client.get(url, headers={"Accept": 'multipart/related; type="image/jls"'})
    assert r.status_code == 406


def decode(image: bytes) -> np.ndarray:
    return np.asarray(imagecodecs.imread(image))


def test_rendered_windowed(client: TestClient, ct: Stored) -> None:
    r = client.get(instance_url(ct) + "/rendered", headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = decode(r.content)
    assert img.shape == (32, 32) and img.dtype == np.uint8
    # WindowCenter 40 / WindowWidth 400 (soft tissue): air is black, bone is white
    assert img[0, 0] == 0
    assert img.max() == 255
    jpeg = client.get(instance_url(ct) + "/rendered")
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert decode(jpeg.content).shape == (32, 32)
    # explicit window from the query: lung window makes air less black than it was
    lung = decode(
        client.get(
            instance_url(ct) + "/rendered",
            params={"window": "-600,1500"},
            headers={"Accept": "image/png"},
        ).content
    )
    assert lung.mean() > img.mean()
    small = client.get(
        instance_url(ct) + "/frames/1/rendered",
        params={"viewport": "16,16"},
        headers={"Accept": "image/png"},
    )
    assert decode(small.content).shape == (16, 16)
    assert client.get(instance_url(ct) + "/rendered", params={"window": "1"}).status_code == 400
    assert (
        client.get(instance_url(ct) + "/rendered", headers={"Accept": "image/gif"}).status_code
        == 406
    )


def test_monochrome1_is_inverted(client: TestClient, app: FastAPI, tmp_path: Path) -> None:
    from tests.api._support import make_study

    mono2 = make_study(tmp_path / "m2", slices=1)
    mono1 = make_study(tmp_path / "m1", slices=1, PhotometricInterpretation="MONOCHROME1")
    store_files(app.state.archive, mono2 + mono1)
    images = []
    for path in (mono2[0], mono1[0]):
        ds = dcmread(path, stop_before_pixels=True)
        url = (
            f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}/rendered"
        )
        images.append(decode(client.get(url, headers={"Accept": "image/png"}).content).astype(int))
    assert np.array_equal(images[1], 255 - images[0])


def test_thumbnails(client: TestClient, app: FastAPI, ct: Stored) -> None:
    for url in (
        f"/dicomweb/studies/{ct.study}/thumbnail",
        f"/dicomweb/studies/{ct.study}/series/{ct.series}/thumbnail",
        instance_url(ct) + "/thumbnail",
    ):
        r = client.get(url, params={"viewport": "8,8"}, headers={"Accept": "image/png"})
        assert r.status_code == 200, url
        assert decode(r.content).shape == (8, 8)
    study, series, sop, _ = store_testfile(app, "SC_rgb_jpeg_dcmtk.dcm")
    r = client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/thumbnail")
    assert r.status_code == 200
    assert decode(r.content).shape[2] == 3  # colour stays colour


@pytest.mark.parametrize(
    "url",
    [
        "/dicomweb/studies/1.2.3",
        "/dicomweb/studies/1.2.3/metadata",
        "/dicomweb/studies/not-a-uid/series",
        "/dicomweb/studies/1.2.3/series/4.5/instances/6.7/frames/1",
    ],
)
def test_unknown_is_404_problem(client: TestClient, url: str) -> None:
    r = client.get(url)
    assert r.status_code == 404
    body = r.json()
    assert r.headers["content-type"] == "application/problem+json"
    assert body["status"] == 404 and body["instance"] == url.split("?")[0]


def test_metadata_json_is_valid_dicom_json(client: TestClient, ct: Stored) -> None:
    from pydicom import Dataset

    items = client.get(f"/dicomweb/studies/{ct.study}/metadata").json()
    ds = Dataset.from_json(json.dumps(items[0]), bulk_data_uri_handler=lambda *_: b"")
    assert ds.SOPInstanceUID == ct.sops[0]


# -- issue 14.7 (frame list amplification) and 13.8 (bulk data transfer syntax) -------


def test_repeated_or_overlong_frame_lists_are_refused(client: TestClient, app: FastAPI) -> None:
    study, series, sop, path = store_testfile(app, "emri_small.dcm")
    base = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/frames/"
    octets = {"Accept": 'multipart/related; type="application/octet-stream"'}
    # 3,000 copies of frame 1 built a 1.6 GB response in memory
    for frames in (",".join(["1"] * 3000), "1,2,1", ",".join(["1"] * 10_001)):
        r = client.get(base + frames, headers=octets)
        assert r.status_code == 400, frames[:20]
        assert r.headers["content-type"] == "application/problem+json"
        assert len(r.content) < len(base + frames) + 1000  # the problem echoes the path
    for frames in ("0", "1,,2", "1," + "9" * 40, "-1"):
        assert client.get(base + frames, headers=octets).status_code == 400, frames
    assert client.get(base + "2,11", headers=octets).status_code == 404  # out of range
    # every frame once, in the order asked: streamed, one part each
    order = [10, *range(1, 10)]
    r = client.get(base + ",".join(map(str, order)), headers=octets)
    assert r.status_code == 200
    arr = dcmread(path).pixel_array
    assert [b for _, b in parts(r)] == [arr[n - 1].tobytes() for n in order]


def test_frames_are_produced_lazily(app: FastAPI, tmp_path: Path) -> None:
    """One frame decoded at a time: the iterator has read nothing before it is pulled."""
    from api.dicomweb._pixels import iter_frames

    path = Path(get_testdata_file("emri_small_jpeg_2k_lossless.dcm"))  # type: ignore[arg-type]
    frames = iter_frames(path, [1, 2, 3], decode=True)
    first = next(frames)
    assert first.number == 1 and len(first.data) == 64 * 64 * 2
    with pytest.raises(Exception, match="frame 11"):
        iter_frames(path, [1, 11])  # checked before any frame is produced


def test_bulkdata_of_compressed_pixel_data_honours_transfer_syntax(
    client: TestClient, app: FastAPI
) -> None:
    study, series, sop, path = store_testfile(app, "emri_small_jpeg_2k_lossless.dcm")
    url = f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/bulkdata/7FE00010"
    ds = dcmread(path)
    native = ds.pixel_array.tobytes()  # lossless: the decoded value of all 10 frames
    for accept in (
        'multipart/related; type="application/octet-stream"',
        'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1',
    ):
        r = client.get(url, headers={"Accept": accept})
        assert r.status_code == 200, r.text
        ((headers, body),) = parts(r)
        assert headers["content-type"] == "application/octet-stream"
        assert body == native
    stored = list(generate_frames(ds.PixelData, number_of_frames=10))
    r = client.get(url, headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert r.status_code == 200
    assert [b for _, b in parts(r)] == stored
    assert parts(r)[0][0]["content-type"].startswith("image/jp2")
    for accept in (
        'multipart/related; type="image/jls"',
        'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.5',
    ):
        assert client.get(url, headers={"Accept": accept}).status_code == 406, accept


def test_bulkdata_of_native_pixel_data_refuses_other_syntaxes(
    client: TestClient, ct: Stored
) -> None:
    url = instance_url(ct) + "/bulkdata/7FE00010"
    accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2'
    ((_, body),) = parts(client.get(url, headers={"Accept": accept}))
    assert body == dcmread(ct.paths[0]).PixelData
    jpeg = accept.replace("1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50")
    assert client.get(url, headers={"Accept": jpeg}).status_code == 406


@pytest.mark.parametrize(
    "name",
    [
        "emri_small_jpeg_2k_lossless.dcm",  # 10 frames, Basic Offset Table
        "emri_small_RLE.dcm",
        "SC_rgb_rle_2frame.dcm",
        "color3d_jpeg_baseline.dcm",  # 120 frames
        "JPEG-LL.dcm",
    ],
)
def test_encapsulated_frames_read_from_the_file(name: str) -> None:
    """Frames sought in the file (the Pixel Data value stays deferred), in any order,
    equal pydicom's own split of the whole value."""
    from api.dicomweb._pixels import iter_frames

    path = Path(get_testdata_file(name))  # type: ignore[arg-type]
    ds = dcmread(path)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    want = list(generate_frames(ds.PixelData, number_of_frames=count))
    order = list(range(count, 0, -1))
    assert [f.data for f in iter_frames(path, order)] == [want[n - 1] for n in order]


def test_streamed_frames_hold_one_frame_in_memory(tmp_path: Path) -> None:
    """All 40 frames of a 5 MiB native instance go through the multipart encoder
    while Python never holds more than a few frames (issue 14.7: the body was
    joined in memory, 3,000 entries cost 1.6 GB)."""
    import tracemalloc

    from api.dicomweb._multipart import multipart_body
    from api.dicomweb._pixels import iter_frames
    from core.synthetic import ct_series

    ds = next(ct_series(1, 256, 256))
    frame_size = 256 * 256 * 2
    ds.NumberOfFrames = 40
    ds.PixelData = b"".join(bytes([n]) * frame_size for n in range(40))
    path = tmp_path / "multi.dcm"
    ds.save_as(path, enforce_file_format=True)
    del ds
    sent = 0
    tracemalloc.start()
    try:
        frames = iter_frames(path, list(range(1, 41)))
        parts = (("application/octet-stream", [f.data]) for f in frames)
        for chunk in multipart_body(parts, "b"):
            sent += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sent > 40 * frame_size
    assert peak < 4 * frame_size, peak
