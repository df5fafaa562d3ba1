"""Answering a plain A-ASSOCIATE-RQ without pynetdicom's PDU objects
(ingest/dicom/negotiation.py; issue 19): for every request it takes, the answer is the
one pynetdicom's path gives (:func:`ingest.dicom.association.negotiate`), byte for byte;
every other request is left to that path. Requests come from real DCMTK tools, from
pynetdicom as requestor, generated at random and mutated at random."""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelGet,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from core.synthetic import write_ct_series
from ingest.dicom.association import AssociationPolicy, negotiate
from ingest.dicom.negotiation import Negotiation, quick_negotiation
from ingest.dicom.scp import TRANSFER_SYNTAXES, storage_contexts
from storage.staging import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION
from tests.support import dcmtk

STORAGE = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
QR = [str(StudyRootQueryRetrieveInformationModelFind),
      str(StudyRootQueryRetrieveInformationModelMove),
      str(PatientRootQueryRetrieveInformationModelGet)]
ELSEWHERE = [str(ModalityWorklistInformationFind), str(ModalityPerformedProcedureStep),
             str(StorageCommitmentPushModel)]
SYNTAXES = [str(ts) for ts in TRANSFER_SYNTAXES]
UNKNOWN_SYNTAXES = ["1.2.3.4.5", "1.2.826.0.1.3680043.9.999.1"]
assert not set(UNKNOWN_SYNTAXES) & set(SYNTAXES)


def _policy(kind: str) -> AssociationPolicy:
    """``storage``: a receiver serving storage and verification only; ``serve``: as
    ``pacslab serve`` builds it (scp.py): Q/R on the plain path with role selection for
    C-GET, worklist, MPPS and commitment left to pynetdicom, calling AEs restricted."""
    storage = storage_contexts()
    verification = build_context(Verification, TRANSFER_SYNTAXES[:2])
    if kind == "storage":
        return AssociationPolicy(
            contexts=[*storage, verification],
            storage_sop_classes=frozenset(str(cx.abstract_syntax) for cx in storage),
        )
    for cx in storage:
        cx.scu_role = True
        cx.scp_role = True
    plain = [build_context(uid, TRANSFER_SYNTAXES[:2]) for uid in QR]
    return AssociationPolicy(
        contexts=[*storage, verification, *plain],
        storage_sop_classes=frozenset(str(cx.abstract_syntax) for cx in storage),
        plain_sop_classes=frozenset(QR),
        plain_roles=True,
        pynetdicom_sop_classes=frozenset(ELSEWHERE),
        allowed_calling_aes=frozenset({"STORESCU", "MODALITY1"}),
        max_pdu=1 << 20,
    )


POLICIES = {kind: _policy(kind) for kind in ("storage", "serve")}


def _quick(rq: bytes, policy: AssociationPolicy) -> Negotiation | None:
    return quick_negotiation(rq, policy, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION)


def _slow(rq: bytes, policy: AssociationPolicy) -> Negotiation | None:
    """pynetdicom's answer; None where pynetdicom refuses to decode the request."""
    try:
        return negotiate(rq, policy)
    except Exception:
        return None


def _same_as_pynetdicom(rq: bytes, policy: AssociationPolicy) -> Negotiation | None:
    quick = _quick(rq, policy)
    if quick is not None:
        slow = _slow(rq, policy)
        assert slow is not None, "taken here, refused by pynetdicom"
        assert slow.fast
        assert quick == slow  # every field, the encoded A-ASSOCIATE-AC included
    return quick


def _request(
    contexts: list[tuple[int, str, list[str]]],
    *,
    calling: str = "STORESCU",
    called: str = "PACSLAB",
    max_length: int | None = 16384,
    extra: list[object] = (),  # type: ignore[assignment]
    version: str | None = "SOMESCU_1",
) -> bytes:
    """An A-ASSOCIATE-RQ as pynetdicom encodes it when it is the requestor."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    items: list[object] = []
    if max_length is not None:
        item = MaximumLengthNotification()
        item.maximum_length_received = max_length
        items.append(item)
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.2"
    items.append(impl)
    if version is not None:
        name = ImplementationVersionNameNotification()
        name.implementation_version_name = version
        items.append(name)
    primitive.user_information = [*items, *extra]  # type: ignore[list-item]
    definitions = []
    for cid, abstract, syntaxes in contexts:
        cx = PresentationContext()
        cx.context_id = cid
        cx.abstract_syntax = abstract
        cx.transfer_syntax = list(syntaxes)
        definitions.append(cx)
    primitive.presentation_context_definition_list = definitions
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _random_request(rng: random.Random) -> bytes:
    pool = STORAGE + QR + [str(Verification)] + ["1.2.3.4.5.6", "1.3.6.1.4.1.9590.100.1.2.1"]
    ids = rng.sample(range(1, 256, 2), rng.randint(1, 60))
    contexts = []
    for cid in ids:
        syntaxes = rng.sample(SYNTAXES + UNKNOWN_SYNTAXES, rng.randint(1, 5))
        contexts.append((cid, rng.choice(pool), syntaxes))
    extra: list[object] = []
    if rng.random() < 0.3:
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = rng.randint(0, 5)
        window.maximum_number_operations_performed = rng.randint(0, 5)
        extra.append(window)
    calling = rng.choice(["STORESCU", "MODALITY1", "CT-1", "a b", "OTHER"])
    return _request(
        contexts,
        calling=calling,
        called=rng.choice(["PACSLAB", "ANY-SCP"]),
        max_length=rng.choice([None, 0, 16384, 4 << 20, 0xFFFFFFFF]),
        extra=extra,
        version=rng.choice([None, "X", "SOMESCU_1", "0123456789ABCDEF"]),
    )


def _capture(args: list[str], files: tuple[Path, ...] = ()) -> bytes:
    """The A-ASSOCIATE-RQ a DCMTK tool sends (the association then fails: no answer)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(30)
        port = server.getsockname()[1]
        proc = subprocess.Popen([dcmtk(args[0]), "-to", "5", *args[1:], "127.0.0.1",
                                 str(port), *map(str, files)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(30)
                data = b""
                while len(data) < 6 or len(data) < 6 + struct.unpack(">I", data[2:6])[0]:
                    chunk = conn.recv(65536)
                    assert chunk, "the tool closed before its whole request"
                    data += chunk
        finally:
            proc.kill()
            proc.wait()
    return data


@pytest.fixture(scope="module")
def ct_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ct")
    write_ct_series(folder, slices=1, rows=8, columns=8)
    return folder


@pytest.mark.network
@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_dcmtk_storescu_requests_are_answered_as_pynetdicom_does(
    ct_dir: Path, kind: str
) -> None:
    """storescu scanning a folder (~120 contexts), with one file, proposing lossless
    JPEG first: each taken here, each answer the same as pynetdicom's."""
    policy = POLICIES[kind]
    one = (ct_dir / "CT_000001.dcm",)
    for args, files in ((["storescu", "-aec", "PACSLAB", "+sd"], (ct_dir,)),
                        (["storescu", "-aet", "MODALITY1", "-aec", "PACSLAB"], one),
                        (["storescu", "-xs", "-aec", "PACSLAB"], one),
                        (["echoscu", "-aet", "MODALITY1", "-aec", "PACSLAB"], ())):
        rq = _capture(args, files)
        quick = _same_as_pynetdicom(rq, policy)
        assert quick is not None, args
        assert quick.accepted
    # A calling AE title outside the allowed list is answered "not allowed" the same way.
    refused = _same_as_pynetdicom(_capture(["echoscu", "-aet", "NOBODY"]), POLICIES["serve"])
    assert refused is not None and not refused.allowed


@pytest.mark.network
def test_dcmtk_getscu_role_selection_is_left_to_pynetdicom() -> None:
    """getscu proposes SCP/SCU Role Selection (PS3.7 D.3.3.4): pynetdicom's path."""
    rq = _capture(["getscu", "-aec", "PACSLAB", "-k", "QueryRetrieveLevel=STUDY"])
    assert _quick(rq, POLICIES["serve"]) is None
    slow = _slow(rq, POLICIES["serve"])
    assert slow is not None and slow.scu_contexts  # it took the SCU role somewhere


@pytest.mark.parametrize("seed", range(4))
def test_random_plain_requests_are_answered_as_pynetdicom_does(seed: int) -> None:
    rng = random.Random(seed)
    taken = 0
    for _ in range(60):
        rq = _random_request(rng)
        for policy in POLICIES.values():
            quick = _same_as_pynetdicom(rq, policy)
            slow = _slow(rq, policy)
            assert slow is not None
            # Every plain request pynetdicom would serve on the fast path is taken here.
            assert (quick is not None) == slow.fast
            taken += quick is not None
    assert taken > 60  # both outcomes seen, most of them taken


def test_results_follow_our_transfer_syntax_order_and_reject_with_reasons() -> None:
    """PS3.8 9.3.3.2: accepted with one of the proposed syntaxes (ours in our order),
    3 for an abstract syntax nobody here serves, 4 when no syntax is shared."""
    policy = POLICIES["serve"]
    ct = str(CTImageStorage)
    rq = _request([(1, ct, [SYNTAXES[2], SYNTAXES[0]]), (3, ct, UNKNOWN_SYNTAXES[:1]),
                   (5, "1.2.3.4.5.6", [SYNTAXES[0]])])
    quick = _same_as_pynetdicom(rq, policy)
    assert quick is not None
    assert quick.accepted == {1: (ct, SYNTAXES[0])}
    assert quick.peer_max_pdu == 16384
    results = [(quick.ac_pdu[i + 4], quick.ac_pdu[i + 6])
               for i in range(74, len(quick.ac_pdu)) if quick.ac_pdu[i] == 0x21]
    assert results == [(1, 0x00), (3, 0x04), (5, 0x03)]
    assert _same_as_pynetdicom(_request([(1, ct, SYNTAXES)], max_length=None), policy) \
        .peer_max_pdu == 16382  # type: ignore[union-attr]  # PS3.8 D.1 default


def test_serve_policy_roles_default_without_role_selection() -> None:
    """Storage contexts that allow both roles: without a role item the requestor is SCU
    and we are SCP (PS3.7 D.3.3.4), so no context is ours to act as SCU on."""
    rq = _request([(1, str(CTImageStorage), SYNTAXES), (3, QR[0], SYNTAXES)])
    quick = _same_as_pynetdicom(rq, POLICIES["serve"])
    assert quick is not None and len(quick.accepted) == 2 and not quick.scu_contexts


@pytest.mark.parametrize("case", [
    "role selection", "user identity", "worklist", "even id", "duplicate id", "no contexts",
    "trailing bytes", "non-ascii title", "blank title", "backslash title", "control title",
    "leading zero uid", "padded uid", "two user items", "unknown item",
])
def test_requests_not_plain_are_left_to_pynetdicom(case: str) -> None:
    ct = str(CTImageStorage)
    contexts = [(1, ct, SYNTAXES)]
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = ct
    role.scu_role = True
    role.scp_role = True
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 1
    identity.primary_field = b"user"
    rq = {
        "role selection": lambda: _request(contexts, extra=[role]),
        "user identity": lambda: _request(contexts, extra=[identity]),
        "worklist": lambda: _request([*contexts, (3, ELSEWHERE[0], SYNTAXES)]),
        "duplicate id": lambda: _request([(1, ct, SYNTAXES), (1, ct, SYNTAXES[:1])]),
        "no contexts": lambda: _request([]),
    }.get(case, lambda: _request(contexts))()
    if case == "even id":  # (pynetdicom will not encode one)
        at = rq.index(b"\x20\x00", 74) + 4
        rq = rq[:at] + b"\x02" + rq[at + 1:]
    elif case == "trailing bytes":
        rq = rq[:2] + struct.pack(">I", len(rq) - 6 + 3) + rq[6:] + b"\x10\x00\x00"
    elif case == "non-ascii title":
        rq = rq[:26] + "STÖRESCU".encode("latin-1").ljust(16) + rq[42:]
    elif case in ("blank title", "backslash title", "control title"):
        title = {"blank title": b"", "backslash title": b"ST\\ORE", "control title": b"ST\x01ORE"}
        rq = rq[:26] + title[case].ljust(16) + rq[42:]
    elif case in ("leading zero uid", "padded uid"):
        old = ct.encode()
        new = old.replace(b".1.", b".01.", 1) if case == "leading zero uid" else old[:-1] + b"\x00"
        assert len(new) == len(old) + (case == "leading zero uid")
        rq = rq.replace(struct.pack(">BBH", 0x30, 0, len(old)) + old,
                        struct.pack(">BBH", 0x30, 0, len(new)) + new)
        rq = rq[:2] + struct.pack(">I", len(rq) - 6) + rq[6:]
        body = rq.index(b"\x20\x00", 74)  # the context item's length grew with its UID
        rq = rq[:body + 2] + struct.pack(">H", struct.unpack(">H", rq[body + 2:body + 4])[0]
                                         + len(new) - len(old)) + rq[body + 4:]
    elif case == "two user items":
        user = rq[rq.rindex(b"\x50\x00"):]
        rq = rq + user
        rq = rq[:2] + struct.pack(">I", len(rq) - 6) + rq[6:]
    elif case == "unknown item":
        rq = rq + b"\x60\x00\x00\x00"
        rq = rq[:2] + struct.pack(">I", len(rq) - 6) + rq[6:]
    for policy in POLICIES.values():
        assert _quick(rq, policy) is None
        if "title" in case or "trailing" in case:
            assert _slow(rq, policy) is None  # which pynetdicom refuses as well


def test_mutated_requests_are_refused_or_answered_as_pynetdicom_does() -> None:
    """Random bytes changed in real requests: never taken here where pynetdicom
    refuses, never answered differently."""
    rng = random.Random(19)
    seeds = [_request([(1, str(CTImageStorage), SYNTAXES), (3, QR[1], SYNTAXES[:2])]),
             _random_request(rng)]
    taken = 0
    for _ in range(400):
        rq = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(rq))
            rq[at] = rng.choice([rng.randrange(256), rq[at] ^ 1, 0x20, 0x2E, 0x30])
        for policy in POLICIES.values():
            taken += _same_as_pynetdicom(bytes(rq), policy) is not None
    assert taken  # some mutations (an AE title's letter, a digit of a UID) stay plain


def test_a_policy_answers_plain_requests_quickly_and_the_rest_through_pynetdicom() -> None:
    """AssociationPolicy.negotiation: the plan for a plain request is the quick one,
    a role selection request still gets pynetdicom's."""
    policy = _policy("serve")
    plain = _request([(1, str(CTImageStorage), SYNTAXES)])
    assert policy.negotiation(plain) == _quick(plain, policy)
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = str(CTImageStorage)
    role.scu_role = False
    role.scp_role = True
    with_role = _request([(1, str(CTImageStorage), SYNTAXES)], extra=[role])
    plan = policy.negotiation(with_role)
    assert plan == negotiate(with_role, policy) and plan.fast
    # Four associations at once share one plan.
    plans: list[Negotiation] = []
    threads = [threading.Thread(target=lambda: plans.append(policy.negotiation(plain)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(p) for p in plans}) == 1
