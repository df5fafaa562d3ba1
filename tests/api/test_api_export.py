"""Export (issue 17.3): ZIP file-sets checked by DCMTK and dicom3tools, the
de-identified ones against PS3.15 Table E.1-1; the HTTP route, its auth and the CLI."""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from core.settings import Settings
from core.synthetic import write_ct_series
from services.deidentify import table_e1_1
from tests.api._support import dataset_bytes, store_files
from tests.support import dcmtk

#: Identifying values put into the originals; none may be left in a de-identified export.
PHI = {
    "PatientName": "NGUYEN^VAN AN",
    "PatientID": "SYN0001",
    "AccessionNumber": "ACC0001",
    "InstitutionName": "BENH VIEN CHO RAY",
    "InstitutionAddress": "201B NGUYEN CHI THANH",
    "PatientAddress": "12 LE LOI QUAN 1",
    "StudyDescription": "CT NGUC CO CAN QUANG",
    "OperatorsName": "TRAN^THI BICH",
    "OtherPatientIDs": "OTHER-ID-778",
}
PRIVATE_VALUE = "SECRET PRIVATE NOTE"


@dataclass
class Study:
    study: str
    series: list[str]
    paths: list[Path]
    uids: set[str]  # every UID of the originals that Table E.1-1 replaces


def _enrich(path: Path, referenced: tuple[str, str] | None) -> None:
    ds = dcmread(path)
    for keyword, value in PHI.items():
        if keyword not in ("PatientName", "PatientID", "AccessionNumber"):
            setattr(ds, keyword, value)
    ds.PatientBirthDate = "19700315"
    # One study: the same study attributes in every instance (the generator stamps
    # each series with the time it was made).
    ds.StudyDate, ds.StudyTime = "20260301", "101500"
    block = ds.private_block(0x0011, "PACSLAB TEST", create=True)
    block.add_new(0x01, "LO", PRIVATE_VALUE)
    if referenced is not None:  # a reference inside a sequence (U, nested)
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = referenced
        ds.SourceImageSequence = Sequence([item])
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def study(app: FastAPI, tmp_path: Path) -> Study:
    """One study, two series (4 slices 32x32, 2 slices 16x16), with PHI and references."""
    first = write_ct_series(tmp_path / "a", slices=4, rows=32, columns=32)
    head = dcmread(first[0], stop_before_pixels=True)
    second = write_ct_series(
        tmp_path / "b", slices=2, rows=16, columns=16, study_instance_uid=head.StudyInstanceUID
    )
    for i, path in enumerate(first + second):
        _enrich(path, (str(head.SOPClassUID), str(head.SOPInstanceUID)) if i else None)
    paths = first + second
    store_files(app.state.archive, paths)
    uids: set[str] = set()
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        uids |= {
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            str(ds.SOPInstanceUID),
            str(ds.FrameOfReferenceUID),
        }
    return Study(
        str(head.StudyInstanceUID),
        [
            str(head.SeriesInstanceUID),
            str(dcmread(second[0], stop_before_pixels=True).SeriesInstanceUID),
        ],
        paths,
        uids,
    )


def unpack(body: bytes, into: Path) -> list[Path]:
    """The archive's members on disk (DICOMDIR first), after checking the ZIP itself."""
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        zf.extractall(into)
    assert names[0] == "DICOMDIR"
    for name in names[1:]:
        parts = name.split("/")
        assert len(parts) <= 8  # PS3.10 8.2: at most 8 components
        assert all(1 <= len(c) <= 8 for c in parts), name
        assert all(set(c) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") for c in parts)
    return [into / n for n in names]


def run(tool: str, *args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which(tool) or tool
    return subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def dciodvfy_errors(path: Path) -> set[str]:
    result = run("dciodvfy", path)
    return {line.strip() for line in result.stderr.splitlines() if line.startswith("Error")}


def check_file_set(root: Path, files: list[Path]) -> list[Dataset]:
    """DCMTK and dicom3tools agree the unpacked archive is a file-set; its instances."""
    instances = [f for f in files if f.name != "DICOMDIR"]
    result = run(dcmtk("dcmftest"), *instances)
    assert result.returncode == 0, result.stdout
    assert all(line.startswith("yes:") for line in result.stdout.splitlines())
    dump = run(dcmtk("dcmdump"), "+L", root / "DICOMDIR")
    assert dump.returncode == 0, dump.stderr
    assert "MediaStorageDirectoryStorage" in dump.stdout
    # dicom3tools' dcdirdmp walks the records by their offsets (PS3.3 F.3.2.2).
    walked = run("dcdirdmp", root / "DICOMDIR")
    assert walked.returncode == 0, walked.stderr
    refs = [
        line.strip().removeprefix("-> ").strip().replace("\\", "/")
        for line in (walked.stdout + walked.stderr).splitlines()  # it writes to stderr
        if line.strip().startswith("->")
    ]
    assert sorted(refs) == sorted(str(f.relative_to(root)) for f in instances)
    assert run("dciodvfy", root / "DICOMDIR").stderr.count("Error") == 0
    # Every IMAGE record names its file's SOP Instance, class and transfer syntax.
    dicomdir = dcmread(root / "DICOMDIR")
    by_file = {str(f.relative_to(root)): dcmread(f) for f in instances}
    leaves = [r for r in dicomdir.DirectoryRecordSequence if "ReferencedFileID" in r]
    assert len(leaves) == len(instances)
    for record in leaves:
        ds = by_file["/".join(record.ReferencedFileID)]
        assert record.ReferencedSOPInstanceUIDInFile == ds.SOPInstanceUID
        assert record.ReferencedSOPClassUIDInFile == ds.SOPClassUID
        assert record.ReferencedTransferSyntaxUIDInFile == ds.file_meta.TransferSyntaxUID
    studies = [r for r in dicomdir.DirectoryRecordSequence if r.DirectoryRecordType == "STUDY"]
    assert {str(r.StudyInstanceUID) for r in studies} == {
        str(d.StudyInstanceUID) for d in by_file.values()
    }
    # DCMTK builds its own STD-GEN-CD DICOMDIR from the unpacked files (it checks
    # every File ID and file) and finds the same records as ours; then it updates
    # ours with the same files and finds every record already there.
    ours_types = sorted(str(r.DirectoryRecordType) for r in dicomdir.DirectoryRecordSequence)
    theirs = run(dcmtk("dcmgpdir"), "+D", "DCMTKDIR", "-a", "+r", "DICOM", cwd=root)
    assert theirs.returncode == 0, theirs.stderr
    their_dir = dcmread(root / "DCMTKDIR")
    assert ours_types == sorted(
        str(r.DirectoryRecordType) for r in their_dir.DirectoryRecordSequence
    )
    updated = run(dcmtk("dcmgpdir"), "+U", "+D", "DICOMDIR", "-nb", "-a", "+r", "DICOM", cwd=root)
    assert updated.returncode == 0, updated.stderr
    assert ours_types == sorted(
        str(r.DirectoryRecordType) for r in dcmread(root / "DICOMDIR").DirectoryRecordSequence
    )
    (root / "DCMTKDIR").unlink()
    return list(by_file.values())


def test_study_export_is_a_file_set_dcmtk_accepts(
    client: TestClient, study: Study, tmp_path: Path
) -> None:
    r = client.get(f"/export/studies/{study.study}")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/zip"
    assert int(r.headers["content-length"]) == len(r.content)
    assert study.study not in r.headers["content-disposition"]
    files = unpack(r.content, tmp_path / "out")
    instances = check_file_set(tmp_path / "out", files)
    assert len(instances) == len(study.paths)
    # The stored data sets bit for bit (as WADO-RS sends them), no new dciodvfy error.
    originals = {dataset_bytes(p.read_bytes()): p for p in study.paths}
    for f in files[1:]:
        original = originals[dataset_bytes(f.read_bytes())]
        assert dciodvfy_errors(f) <= dciodvfy_errors(original)
    # Progress: the same caller sees the finished export.
    progress = client.get(f"/export/progress/{r.headers['x-export-id']}").json()
    assert progress["state"] == "done"
    assert progress["instances_done"] == progress["instances_total"] == len(study.paths)
    assert progress["bytes_done"] == progress["bytes_total"] == len(r.content)


def test_series_export(client: TestClient, study: Study, tmp_path: Path) -> None:
    r = client.get(f"/export/studies/{study.study}/series/{study.series[1]}")
    assert r.status_code == 200
    files = unpack(r.content, tmp_path / "out")
    instances = check_file_set(tmp_path / "out", files)
    assert len(instances) == 2
    assert {str(d.SeriesInstanceUID) for d in instances} == {study.series[1]}
    dicomdir = dcmread(tmp_path / "out" / "DICOMDIR")
    kinds = [r.DirectoryRecordType for r in dicomdir.DirectoryRecordSequence]
    assert kinds == ["PATIENT", "STUDY", "SERIES", "IMAGE", "IMAGE"]


def _walk(ds: Dataset) -> Iterator[tuple[Dataset, DataElement]]:
    for elem in ds:
        yield ds, elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def test_deidentified_export_follows_table_e1_1(
    client: TestClient, study: Study, tmp_path: Path
) -> None:
    r = client.get(f"/export/studies/{study.study}", params={"deidentify": "true"})
    assert r.status_code == 200
    files = unpack(r.content, tmp_path / "out")
    instances = check_file_set(tmp_path / "out", files)
    assert len(instances) == len(study.paths)

    # Nothing identifying is left anywhere, DICOMDIR included (bytes, nested, private).
    everything = b"".join(f.read_bytes() for f in files)
    for value in [*PHI.values(), PRIVATE_VALUE, "19700315", *study.uids]:
        assert value.encode() not in everything, value

    table = table_e1_1()
    originals = {bytes(dcmread(p).PixelData): dcmread(p) for p in study.paths}
    new_uid: dict[str, str] = {}
    for ds in instances:
        # Pixel data unchanged; the marks of PS3.15 E.1 and PS3.3 C.12.1.
        original = originals[bytes(ds.PixelData)]
        assert ds.PatientIdentityRemoved == "YES"
        (code,) = ds.DeidentificationMethodCodeSequence
        assert (code.CodeValue, code.CodingSchemeDesignator) == ("113100", "DCM")
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for _, elem in _walk(ds):
            assert not elem.tag.is_private
            action = table.action(elem.tag)
            assert action != "X", f"{elem.keyword} should have been removed"
        # U: a new UID per original, the same one everywhere in the study.
        for keyword in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "FrameOfReferenceUID",
        ):
            old, new = str(original[keyword].value), str(ds[keyword].value)
            assert new != old and new.startswith("2.25.")
            assert new_uid.setdefault(old, new) == new
    assert len({str(d.StudyInstanceUID) for d in instances}) == 1
    assert len({str(d.SeriesInstanceUID) for d in instances}) == 2
    assert len(set(new_uid.values())) == len(new_uid)  # no two originals merged
    # The nested reference follows its target (consistent within the study).
    referenced = {
        str(d.SourceImageSequence[0].ReferencedSOPInstanceUID)
        for d in instances
        if "SourceImageSequence" in d
    }
    first = next(o for o in originals.values() if "SourceImageSequence" not in o)
    assert referenced == {new_uid[str(first.SOPInstanceUID)]}
    # Patient ID is a pseudonym shared by the whole export; the DICOMDIR agrees.
    assert len({str(d.PatientID) for d in instances}) == 1
    dicomdir = dcmread(tmp_path / "out" / "DICOMDIR")
    (patient,) = [r for r in dicomdir.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT"]
    assert patient.PatientID == instances[0].PatientID
    # No dciodvfy error the original did not have.
    by_pixels = {bytes(dcmread(p).PixelData): p for p in study.paths}
    for f in files[1:]:
        assert dciodvfy_errors(f) <= dciodvfy_errors(by_pixels[bytes(dcmread(f).PixelData)])
    # Another export of the study is not linkable to this one by its UIDs.
    again = client.get(f"/export/studies/{study.study}", params={"deidentify": "true"})
    with zipfile.ZipFile(io.BytesIO(again.content)) as zf:
        other = dcmread(io.BytesIO(zf.read(zf.namelist()[1])), stop_before_pixels=True)
    assert other.StudyInstanceUID != instances[0].StudyInstanceUID


def test_unknown_study_is_404(client: TestClient, study: Study) -> None:
    assert client.get("/export/studies/1.2.3.4.5").status_code == 404
    assert client.get(f"/export/studies/{study.study}/series/1.2.3").status_code == 404
    assert client.get("/export/studies/not-a-uid").status_code == 404
    assert client.get("/export/progress/nope").status_code == 404


def test_export_needs_a_token_with_imaging_read(settings: Settings, tmp_path: Path) -> None:
    from api.app import create_app
    from api.keys import issue_token
    from pacslab.wiring import build_index

    auth = settings.auth.model_copy(update={"enabled": True})
    secure = settings.model_copy(update={"auth": auth})
    build_index(secure, migrate=True).close()
    app = create_app(secure)
    try:
        paths = write_ct_series(tmp_path / "ct", slices=2, rows=16, columns=16)
        store_files(app.state.archive, paths)
        uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        with TestClient(app) as c:
            assert c.get(f"/export/studies/{uid}").status_code == 401
            lab = issue_token(secure.auth, subject="lab.tech", scopes=["lab.read"])
            assert (
                c.get(
                    f"/export/studies/{uid}", headers={"Authorization": f"Bearer {lab}"}
                ).status_code
                == 403
            )
            reader = issue_token(secure.auth, subject="dr.an", scopes=["imaging.read"])
            r = c.get(f"/export/studies/{uid}", headers={"Authorization": f"Bearer {reader}"})
            assert r.status_code == 200
            export_id = r.headers["x-export-id"]
            # Progress is for the caller who started the export only.
            other = issue_token(secure.auth, subject="dr.binh", scopes=["imaging.read"])
            assert (
                c.get(
                    f"/export/progress/{export_id}", headers={"Authorization": f"Bearer {other}"}
                ).status_code
                == 404
            )
            assert (
                c.get(
                    f"/export/progress/{export_id}", headers={"Authorization": f"Bearer {reader}"}
                ).json()["state"]
                == "done"
            )
        # Audited: who exported which study, no patient identifier in the entry.
        app.state.audit.flush()
        from storage.audit import AuditStore

        entries = [
            e for e in AuditStore(app.state.index.engine).entries() if e.event_type == "export"
        ]
        assert len(entries) == 1
        (entry,) = entries
        assert entry.agent == "dr.an" and entry.resource == f"Study/{uid}"
        assert entry.outcome == "0" and entry.patient_key
        text = repr(entry)
        assert "SYN0001" not in text and "NGUYEN" not in text
    finally:
        app.state.audit.close()
        app.state.archive.close()
        app.state.index.close()


def test_cli_export(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pacslab.cli import main
    from pacslab.wiring import build_archive, build_index

    monkeypatch.setenv("PACSLAB_DATA_DIR", str(settings.data_dir))
    index = build_index(settings, migrate=True)
    archive = build_archive(settings, index)
    paths = write_ct_series(tmp_path / "ct", slices=3, rows=16, columns=16)
    store_files(archive, paths)
    archive.close()
    index.close()
    uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    out = tmp_path / "study.zip"
    assert main(["export", uid, "-o", str(out)]) == 0
    files = unpack(out.read_bytes(), tmp_path / "cli")
    assert len(check_file_set(tmp_path / "cli", files)) == 3
    assert main(["export", "1.2.3.999", "-o", str(tmp_path / "none.zip")]) == 1
    assert not (tmp_path / "none.zip").exists()
    assert not list(tmp_path.glob(".none.zip.part"))


@pytest.mark.network
@pytest.mark.parametrize("deidentify", [False, True])
def test_viewer_download_button_in_chromium(
    app: FastAPI, study: Study, tmp_path: Path, deidentify: bool
) -> None:
    """The viewer's button downloads the ZIP under the page's CSP (headless Chromium)."""
    from tests.support import serving

    chromium = "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian chromium is not installed (/usr/bin/chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    errors: list[str] = []
    with serving(app) as base, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu"],
        )
        try:
            page = browser.new_page(accept_downloads=True)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/viewer/studies/{study.study}")
            page.wait_for_selector("#export")
            if deidentify:
                page.check("#export-deid")
            with page.expect_download(timeout=60_000) as download:
                page.click("#export")
            saved = tmp_path / "download.zip"
            download.value.save_as(saved)
            page.wait_for_function(
                "() => document.getElementById('export-note').textContent.startsWith('Downloaded')"
            )
            assert page.eval_on_selector("#export-progress", "p => p.value") == 1
        finally:
            browser.close()
    files = unpack(saved.read_bytes(), tmp_path / "out")
    instances = check_file_set(tmp_path / "out", files)
    assert len(instances) == len(study.paths)
    assert all((d.get("PatientIdentityRemoved") == "YES") == deidentify for d in instances)
    # 404 favicon-like noise aside, no script or CSP error.
    assert not [e for e in errors if "Content Security Policy" in e or "Error" in e], errors


def test_too_large_a_study_is_refused_by_series_it_is_not(app: FastAPI, study: Study) -> None:
    from core.errors import InvalidQueryError
    from services.export import ExportRequest, ExportService

    service = ExportService(app.state.index, app.state.archive.originals, max_instances=4)
    with pytest.raises(InvalidQueryError):
        service.plan(ExportRequest(study.study))
    assert len(service.plan(ExportRequest(study.study, study.series[0])).entries) == 4
