"""Signed results: detached JWS over RFC 8785 bytes, verified offline and by jwcrypto (issue 7)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.signing import verify_detached
from core.errors import InvalidSignatureError
from core.settings import Settings
from tests.security._support import bearer

REPORT: dict[str, Any] = {
    "resourceType": "DiagnosticReport",
    "id": "cbc-0001",
    "status": "final",
    "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                              "code": "HM"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "58410-2"}],
             "text": "Công thức máu"},
    "subject": {"identifier": {"system": "urn:oid:1.2.3", "value": "BN-0042"}},
    "effectiveDateTime": "2026-11-20T08:30:00+07:00",
    "conclusion": "Hb 13.50 g/dL",
}


def _sign(client: TestClient, token: Callable[..., str], report: dict[str, Any],
          path: str = "/fhir/DiagnosticReport/$sign") -> tuple[bytes, str]:
    r = client.post(path, json=report, headers=bearer(token("results.sign", subject="dr.lan")))
    assert r.status_code == 201, r.text
    prov = r.json()
    assert prov["resourceType"] == "Provenance"
    jws = base64.b64decode(prov["signature"][0]["data"]).decode()
    assert prov["signature"][0]["sigFormat"] == "application/jose"
    signed = client.get(r.headers["Location"], headers=bearer(token("lab.read")))
    assert signed.status_code == 200
    assert signed.headers["X-Signature"] == jws
    return signed.content, jws


def _cert(app: FastAPI) -> Any:
    return app.state.signing_cert


def test_sign_verify_and_one_changed_byte_fails(client: TestClient, app: FastAPI,
                                                token: Callable[..., str]) -> None:
    payload, jws = _sign(client, token, REPORT)
    header = verify_detached(payload, jws, _cert(app))
    assert header["alg"] == "ES256" and header["x5c"]
    for i in range(0, len(payload), max(1, len(payload) // 40)):
        tampered = bytearray(payload)
        tampered[i] ^= 0x01
        with pytest.raises(InvalidSignatureError):
            verify_detached(bytes(tampered), jws, _cert(app))


def test_jwcrypto_verifies_independently(client: TestClient, app: FastAPI,
                                         token: Callable[..., str]) -> None:
    jwcrypto = pytest.importorskip("jwcrypto")
    from cryptography.hazmat.primitives import serialization
    from jwcrypto import jwk as jc_jwk
    from jwcrypto import jws as jc_jws

    payload, signature = _sign(client, token, REPORT)
    pem = _cert(app).public_bytes(serialization.Encoding.PEM)
    key = jc_jwk.JWK.from_pem(pem)  # the public key of the certificate alone
    token_obj = jc_jws.JWS()
    token_obj.deserialize(signature)
    token_obj.verify(key, detached_payload=payload)
    token_obj = jc_jws.JWS()
    token_obj.deserialize(signature)
    with pytest.raises(jc_jws.InvalidJWSSignature):
        token_obj.verify(key, detached_payload=payload.replace(b"13.5", b"15.5"))
    assert jwcrypto.__name__ == "jwcrypto"


def test_payload_is_rfc8785_canonical(client: TestClient, token: Callable[..., str]) -> None:
    from core.canonical import canonical_json

    payload, _ = _sign(client, token, REPORT)
    assert canonical_json(payload) == payload
    assert "Công thức máu".encode() in payload  # UTF-8, not \\u escapes
    assert json.loads(payload)["meta"]["versionId"] == "1"


def test_signed_report_cannot_be_resigned_only_amended(client: TestClient, app: FastAPI,
                                                       token: Callable[..., str]) -> None:
    first, jws1 = _sign(client, token, REPORT)
    again = client.post("/fhir/DiagnosticReport/$sign", json=REPORT,
                        headers=bearer(token("results.sign")))
    assert again.status_code == 409
    assert again.json()["issue"][0]["code"] == "business-rule"
    amended = {**REPORT, "status": "amended", "conclusion": "Hb 12.90 g/dL (re-run)"}
    r = client.post("/fhir/DiagnosticReport/cbc-0001/$amend", json=amended,
                    headers=bearer(token("results.sign", subject="dr.lan")))
    assert r.status_code == 201, r.text
    prov = r.json()
    assert prov["entity"] == [{"role": "revision",
                               "what": {"reference": "DiagnosticReport/cbc-0001/_history/1"}}]
    # the original is kept, unchanged, and still verifies
    old = client.get("/fhir/DiagnosticReport/cbc-0001/_history/1",
                     headers=bearer(token("lab.read")))
    assert old.content == first
    verify_detached(old.content, jws1, _cert(app))
    bundle = client.get("/fhir/Provenance", params={"target": "DiagnosticReport/cbc-0001"},
                        headers=bearer(token("lab.read"))).json()
    assert len(bundle["entry"]) == 2
    # the store refuses an edit in place
    from core.errors import SignedResultError

    with pytest.raises(SignedResultError):
        app.state.signed_results.ensure_editable("DiagnosticReport", "cbc-0001")


def test_signing_needs_results_sign(client: TestClient, token: Callable[..., str]) -> None:
    r = client.post("/fhir/DiagnosticReport/$sign", json=REPORT,
                    headers=bearer(token("lab.read", "lab.write", "admin")))
    assert r.status_code == 403


def test_cli_verify_signature_offline(client: TestClient, app: FastAPI,
                                      token: Callable[..., str], tmp_path: Path,
                                      secure_settings: Settings) -> None:
    payload, jws = _sign(client, token, REPORT)
    (tmp_path / "report.json").write_bytes(payload)
    (tmp_path / "signature.jws").write_text(jws)
    cert = secure_settings.signing.cert
    assert cert is not None
    # only the certificate is needed: a fresh directory without the service's data
    env = {"PACSLAB_DATA_DIR": str(tmp_path / "elsewhere"), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "pacslab", "verify-signature", str(tmp_path / "report.json"),
           str(tmp_path / "signature.jws"), "--cert", str(cert)]
    ok = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        cwd=Path(__file__).parents[2])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("valid")
    (tmp_path / "report.json").write_bytes(payload.replace(b"13.5", b"13.6"))
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parents[2])
    assert bad.returncode == 1 and bad.stdout.startswith("INVALID")
    # a pretty-printed copy verifies after canonicalization only
    (tmp_path / "report.json").write_text(json.dumps(json.loads(payload), indent=2))
    assert subprocess.run(cmd, env=env, cwd=Path(__file__).parents[2],
                          capture_output=True).returncode == 1
    assert subprocess.run([*cmd, "--canonicalize"], env=env, cwd=Path(__file__).parents[2],
                          capture_output=True).returncode == 0


def test_signature_with_another_certificate_is_refused(client: TestClient,
                                                       token: Callable[..., str],
                                                       tmp_path: Path) -> None:
    from api.keys import ensure_hospital_cert
    from core.settings import SigningSettings

    payload, jws = _sign(client, token, REPORT)
    other, _ = ensure_hospital_cert(SigningSettings(cert=tmp_path / "c.pem",
                                                    key=tmp_path / "k.pem"))
    with pytest.raises(InvalidSignatureError):
        verify_detached(payload, jws, other)


def test_signed_result_gets_a_retention_class(client: TestClient, app: FastAPI,
                                              token: Callable[..., str]) -> None:
    _sign(client, token, REPORT)
    row = app.state.retention.get("result", "DiagnosticReport/cbc-0001")
    assert row is not None and row.years == 10 and row.expires_on == "2036-11-20"
