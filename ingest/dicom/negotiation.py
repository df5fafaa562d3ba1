"""Answering a plain A-ASSOCIATE-RQ without pynetdicom's PDU objects (PS3.8 9.3.2-9.3.3).

Why. pynetdicom decodes a full ``storescu`` proposal (128 presentation contexts, ~370
UIDs, each checked by regular expression into a pydicom ``UID``), negotiates it and
encodes the answer in ~18 ms of CPU (measured on this machine kind). A receiver
process keeps answers per distinct request (``AssociationPolicy.negotiation``), so each
receiver of a freshly started service pays it on its first association, which
is when a modality's four associations arrive together (issue 19).

:func:`quick_negotiation` reads the common shape of a request with ``struct`` and
answers it the way :func:`~ingest.dicom.association.negotiate` does with pynetdicom
(``negotiate_as_acceptor``'s rules: per proposed context, the first of *our* transfer
syntaxes the requestor proposed; the roles' defaults of PS3.7 D.3.3.4 without role
selection items). It takes only what is certainly plain: one application context item,
presentation context items each of one abstract syntax followed by transfer syntaxes,
with distinct odd IDs, conformant UIDs (PS3.5 9.1) and AE titles (PS3.5 Table 6.2-1 AE),
and a user information item with no sub-item but Maximum Length (PS3.8 D.1),
Implementation Class UID and Version Name (PS3.7 D.3.3.2) and the Asynchronous
Operations Window (D.3.3.3). Anything else, and every request for a SOP class this path
does not serve, returns None: the caller takes pynetdicom's path, unchanged. The tests
compare both answers byte for byte, over real DCMTK and pynetdicom requests and random
ones.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pynetdicom.presentation import SCP_SCU_ROLES, PresentationContext

__all__ = ["Negotiation", "PlainPolicy", "quick_negotiation", "served_here"]

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: PS3.8 D.1: a requestor that sends no Maximum Length Received gets the default.
DEFAULT_PEER_MAX_PDU = 16382

#: PS3.5 9.1: components of digits without leading zeros, separated by periods.
_UID = re.compile(rb"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*\Z")
#: The user information sub-items this path answers (PS3.7 D.3.3.1-D.3.3.3, PS3.8 D.1).
_MAX_LENGTH, _IMPL_UID, _ASYNC_WINDOW, _IMPL_VERSION = 0x51, 0x52, 0x53, 0x55


@dataclass(frozen=True, slots=True)
class Negotiation:
    """The outcome of negotiating one A-ASSOCIATE-RQ, reusable for identical requests."""

    fast: bool  # storage/verification only: served by FastAssociation
    calling_ae: str
    allowed: bool  # calling AE title permitted (PS3.8 A-ASSOCIATE-RJ reason 3 otherwise)
    accepted: dict[int, tuple[str, str]]  # context id -> (abstract, transfer syntax)
    ac_pdu: bytes  # the encoded A-ASSOCIATE-AC
    #: The requestor's Maximum Length Received (PS3.8 D.1; 0: unlimited): P-DATA-TF
    #: PDUs we send it are cut to this.
    peer_max_pdu: int = DEFAULT_PEER_MAX_PDU
    #: Accepted contexts we may act as SCU on (role selection): C-GET sub-operations.
    scu_contexts: frozenset[int] = frozenset()


class PlainPolicy(Protocol):
    """What :func:`quick_negotiation` reads of the receiver's policy."""

    contexts: Sequence[PresentationContext]
    storage_sop_classes: frozenset[str]
    plain_sop_classes: frozenset[str]
    pynetdicom_sop_classes: frozenset[str] | None
    allowed_calling_aes: frozenset[str]
    max_pdu: int


@dataclass(frozen=True, slots=True)
class _Request:
    called: str
    calling: str
    contexts: list[tuple[int, str, list[str]]]  # (id, abstract syntax, transfer syntaxes)
    peer_max_pdu: int


class _NotPlain(Exception):
    """The request is not of the shape read here: pynetdicom decides."""


def _uid(raw: bytes) -> str:
    if not 0 < len(raw) <= 64 or _UID.match(raw) is None:
        raise _NotPlain
    return raw.decode("ascii")


def _ae_title(raw: bytes) -> str:
    """As pynetdicom reads the field: ASCII, surrounding spaces not significant (PS3.8
    Table 9-11), no control character or backslash, not all spaces."""
    try:
        title = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise _NotPlain from None
    if not title or "\\" in title or not title.isprintable():
        raise _NotPlain
    return title


def _items(data: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    """The items (or sub-items) between ``start`` and ``end``: type, 1 reserved byte,
    2-byte length, value (PS3.8 9.3.2.1-9.3.2.3)."""
    items = []
    while start < end:
        if end - start < 4:
            raise _NotPlain
        kind, length = data[start], int.from_bytes(data[start + 2 : start + 4], "big")
        start += 4
        if start + length > end:
            raise _NotPlain
        items.append((kind, data[start : start + length]))
        start += length
    return items


def _parse(rq: bytes) -> _Request:
    """PS3.8 Table 9-11 and its items, only in the shape the module docstring names."""
    if len(rq) < 74 or rq[0] != 0x01 or int.from_bytes(rq[2:6], "big") != len(rq) - 6:
        raise _NotPlain
    called, calling = _ae_title(rq[10:26]), _ae_title(rq[26:42])
    application = user = 0
    contexts: list[tuple[int, str, list[str]]] = []
    ids: set[int] = set()
    peer_max_pdu = DEFAULT_PEER_MAX_PDU
    for kind, value in _items(rq, 74, len(rq)):
        if kind == 0x10:  # application context (9.3.2.1)
            application += 1
            _uid(value)
        elif kind == 0x20:  # presentation context (9.3.2.2)
            if len(value) < 4:
                raise _NotPlain
            context_id = value[0]
            if context_id % 2 == 0 or context_id in ids:
                raise _NotPlain
            ids.add(context_id)
            subs = _items(value, 4, len(value))
            if len(subs) < 2 or subs[0][0] != 0x30 or any(k != 0x40 for k, _ in subs[1:]):
                raise _NotPlain
            contexts.append((context_id, _uid(subs[0][1]), [_uid(v) for _, v in subs[1:]]))
        elif kind == 0x50:  # user information (9.3.2.3)
            user += 1
            seen: set[int] = set()
            for sub, sub_value in _items(value, 0, len(value)):
                if sub in seen:
                    raise _NotPlain
                seen.add(sub)
                if sub in (_MAX_LENGTH, _ASYNC_WINDOW):
                    if len(sub_value) != 4:
                        raise _NotPlain
                    if sub == _MAX_LENGTH:
                        peer_max_pdu = int.from_bytes(sub_value, "big")
                elif sub == _IMPL_UID:
                    _uid(sub_value)
                elif sub == _IMPL_VERSION:
                    if not 0 < len(sub_value) <= 16:
                        raise _NotPlain
                    _ae_title(sub_value)
                else:  # role selection, extended negotiation, user identity...
                    raise _NotPlain
        else:
            raise _NotPlain
    if application != 1 or user != 1 or not contexts:
        raise _NotPlain
    return _Request(called, calling, contexts, peer_max_pdu)


def served_here(uid: str, served: frozenset[str], elsewhere: frozenset[str] | None) -> bool:
    """Whether an association proposing SOP class ``uid`` may stay on the fast path:
    with ``elsewhere`` (the classes only pynetdicom serves), any class not among them
    (those unknown anywhere are rejected here, PS3.8 9.3.3.2 result 3); without it,
    Verification and ``served`` only."""
    if elsewhere is not None:
        return uid not in elsewhere
    return uid == VERIFICATION or uid in served


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _encode_ac(
    rq: _Request, results: list[tuple[int, int, str]], max_pdu: int, impl_uid: str, version: str
) -> bytes:
    """PS3.8 Table 9-17: the AE title fields repeat the request's titles."""
    body = [
        struct.pack(">HH16s16s32x", 1, 0, rq.called.encode().ljust(16),
                    rq.calling.encode().ljust(16)),
        _item(0x10, APPLICATION_CONTEXT.encode()),
        *(_item(0x21, struct.pack(">BBBB", cid, 0, result, 0) + _item(0x40, ts.encode()))
          for cid, result, ts in results),
        _item(0x50, _item(_MAX_LENGTH, struct.pack(">I", max_pdu))
              + _item(_IMPL_UID, impl_uid.encode()) + _item(_IMPL_VERSION, version.encode())),
    ]
    data = b"".join(body)
    return struct.pack(">BBI", 0x02, 0, len(data)) + data


def quick_negotiation(
    rq_bytes: bytes, policy: PlainPolicy, impl_uid: str, version: str
) -> Negotiation | None:
    """Our answer to a plain request for the fast path; None: ask pynetdicom."""
    try:
        rq = _parse(rq_bytes)
    except _NotPlain:
        return None
    served = policy.storage_sop_classes | policy.plain_sop_classes
    elsewhere = policy.pynetdicom_sop_classes
    if not all(served_here(abstract, served, elsewhere) for _, abstract, _ in rq.contexts):
        return None
    ours = {str(cx.abstract_syntax): cx for cx in policy.contexts}
    results: list[tuple[int, int, str]] = []
    accepted: dict[int, tuple[str, str]] = {}
    scu: set[int] = set()
    for cid, abstract, proposed in sorted(rq.contexts):
        cx = ours.get(abstract)
        if cx is None:
            results.append((cid, 0x03, proposed[0]))  # abstract syntax not supported
            continue
        ts = next((str(t) for t in cx.transfer_syntax if str(t) in proposed), None)
        if ts is None:
            results.append((cid, 0x04, proposed[0]))  # no transfer syntax supported
            continue
        roles = (cx.scu_role, cx.scp_role)
        # PS3.7 D.3.3.4 defaults when the requestor proposes no role: as pynetdicom
        as_scu, as_scp = (False, True) if None in roles else SCP_SCU_ROLES[(None, None)][roles][2:]
        if not as_scu and not as_scp:
            results.append((cid, 0x01, ts))  # user rejection
            continue
        results.append((cid, 0x00, ts))
        accepted[cid] = (abstract, ts)
        if as_scu:
            scu.add(cid)
    allowed = not policy.allowed_calling_aes or rq.calling in policy.allowed_calling_aes
    return Negotiation(
        True, rq.calling, allowed, accepted,
        _encode_ac(rq, results, policy.max_pdu, impl_uid, version),
        rq.peer_max_pdu, frozenset(scu),
    )
