"""One hierarchy of expected failures, each carrying its mapping to every boundary.

The single table (STYLE.md §3), like Orthanc's ``ConvertErrorCodeToHttpStatus``:
DIMSE status (PS3.7 Annex C / PS3.4 B.2.3 for Storage), HTTP status (problem+json,
RFC 9457) and FHIR ``OperationOutcome.issue.code`` (FHIR R4 ValueSet issue-type).
Each class also subclasses the matching builtin, as zarr's
``NodeNotFoundError(BaseZarrError, FileNotFoundError)`` does, so callers that only
know the builtins still catch them.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConfiguredElsewhereError",
    "DuplicateError",
    "ForbiddenError",
    "InvalidAttributeValueError",
    "InvalidDatasetError",
    "InvalidQueryError",
    "InvalidSignatureError",
    "LabMessageError",
    "MissingAttributeError",
    "NotFoundError",
    "OrderMessageError",
    "OutOfResourcesError",
    "PeerUnavailableError",
    "PreconditionFailedError",
    "ProcedureStepStateError",
    "RejectedInstanceError",
    "RetentionError",
    "SOPClassMismatchError",
    "ServiceError",
    "SignedResultError",
    "TooManyRequestsError",
    "UnauthorizedError",
    "UnsupportedRequestError",
]


class ServiceError(Exception):
    """An expected failure that we can explain to a peer.

    ``str(exc)`` must never contain patient data: it ends up in DIMSE
    ErrorComment, problem+json ``detail`` and logs.
    """

    title: ClassVar[str] = "Processing failure"
    http_status: ClassVar[int] = 500
    dimse_status: ClassVar[int] = 0x0110
    fhir_code: ClassVar[str] = "processing"


class InvalidDatasetError(ServiceError, ValueError):
    """Unparseable DICOM, or a required attribute is missing (PS3.4 B.2.3 0xC000)."""

    title = "Invalid dataset"
    http_status = 400
    dimse_status = 0xC000
    fhir_code = "invalid"


class InvalidAttributeValueError(InvalidDatasetError):
    """An attribute value the SCP may not accept (PS3.7 Annex C 0x0106 Invalid Attribute Value).

    E.g. an MPPS N-CREATE whose Performed Procedure Step Status is not IN PROGRESS
    (PS3.4 F.7.2.1.3), or an N-SET that changes an attribute Table F.7.2-1 marks
    "Not allowed".
    """

    dimse_status = 0x0106


class MissingAttributeError(InvalidDatasetError):
    """A required attribute is absent (PS3.7 Annex C 0x0120 Missing Attribute).

    E.g. an MPPS N-SET to COMPLETED without the Final State attributes of PS3.4
    Table F.7.2-1.
    """

    dimse_status = 0x0120


class SOPClassMismatchError(ServiceError, ValueError):
    """Dataset disagrees with the request's SOP Class/Instance (PS3.4 B.2.3 0xA900)."""

    title = "Data set does not match SOP Class"
    http_status = 400
    dimse_status = 0xA900
    fhir_code = "invalid"


class InvalidQueryError(ServiceError, ValueError):
    """Bad C-FIND identifier or QIDO parameters (PS3.4 C.4.1.1.4 0xA900)."""

    title = "Invalid query"
    http_status = 400
    dimse_status = 0xA900
    fhir_code = "invalid"


class UnsupportedRequestError(ServiceError, NotImplementedError):
    """A valid request for a feature we do not implement (HTTP 501).

    E.g. an IIIF rotation that is not a multiple of 90° or the ``bitonal`` quality
    (IIIF Image API 3.0 §7: 501 Not Implemented). No DIMSE request maps here; the
    DIMSE status is that of an unsupported operation (PS3.7 C.4.2 0x0211
    Unrecognized Operation).
    """

    title = "Not implemented"
    http_status = 501
    dimse_status = 0x0211
    fhir_code = "not-supported"


class NotFoundError(ServiceError, LookupError):
    """Unknown study, tile, result or MPPS (PS3.7 C.5.7 0x0112 No such SOP Instance)."""

    title = "Not found"
    http_status = 404
    dimse_status = 0x0112
    fhir_code = "not-found"


class DuplicateError(ServiceError, ValueError):
    """N-CREATE for an existing SOP Instance (PS3.7 C.5.9 0x0111), or a key already in
    use, such as a patient identifier change (HL7 A47, FHIR ``PUT Patient``) onto an
    identifier another patient holds (HL7 Table 0357 205 "duplicate key identifier")."""

    title = "Duplicate"
    http_status = 409
    dimse_status = 0x0111
    fhir_code = "duplicate"


class ProcedureStepStateError(ServiceError, ValueError):
    """N-SET after COMPLETED or DISCONTINUED (PS3.4 F.7.2.2 0x0110)."""

    title = "Invalid procedure step state"
    http_status = 409
    dimse_status = 0x0110
    fhir_code = "business-rule"


class PreconditionFailedError(ServiceError, ValueError):
    """A version-aware update named a version that is not the current one (FHIR R4
    http.html#concurrency: ``If-Match: W/"n"`` → 412 Precondition Failed, RFC 9110
    13.1.1). No DIMSE request carries a version; its status is a processing failure."""

    title = "Precondition failed"
    http_status = 412
    dimse_status = 0x0110
    fhir_code = "conflict"


class OutOfResourcesError(ServiceError, OSError):
    """Storage full or index unavailable (PS3.4 B.2.3 0xA700 Out of Resources)."""

    title = "Out of resources"
    http_status = 507
    dimse_status = 0xA700
    fhir_code = "no-store"


class PeerUnavailableError(ServiceError, ConnectionError):
    """A remote archive refused, failed or did not answer (forwarding, issue 16 §4).

    ``retry_in_s`` asks the job worker to try again after that long, however many
    tries it took so far (the forwarding service decides when to give up). A C-MOVE
    destination that cannot be reached is PS3.4 C.4.2.1.5 0xA801.
    """

    title = "Peer unavailable"
    http_status = 502
    dimse_status = 0xA801
    fhir_code = "transient"

    def __init__(self, message: str = "", *, retry_in_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_in_s = retry_in_s


class LabMessageError(ServiceError, ValueError):
    """An analyzer file that cannot be parsed; the file moves to ``rejected/``.

    ``where`` names the line/record so the reason file can point at it.
    """

    title = "Unparseable lab message"
    http_status = 422
    dimse_status = 0xC000
    fhir_code = "invalid"

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(message if where is None else f"{message} (at {where})")
        self.reason = message
        self.where = where


class OrderMessageError(ServiceError, ValueError):
    """An order message we refuse (HL7 v2.5.1 2.9.2, 2.14.1 ERR; FHIR R4 ``invalid``).

    ``ack_code`` is the MSA-1 to answer with: ``AR`` (application reject: message
    type, event, version or processing id we do not take, or an unparseable MSH) or
    ``AE`` (application error: the content is wrong). ``hl7_code`` is the HL7 Table
    0357 condition for ERR-3; ``where`` names the segment/field (ERR-2, and the
    ``.error.json`` beside a rejected file). The message carries no patient data.
    """

    title = "Order message refused"
    http_status = 422
    dimse_status = 0xC000
    fhir_code = "invalid"

    def __init__(
        self,
        message: str,
        *,
        where: str | None = None,
        hl7_code: int = 207,
        ack_code: str = "AE",
    ) -> None:
        super().__init__(message if where is None else f"{message} (at {where})")
        self.reason = message
        self.where = where
        self.hl7_code = hl7_code
        self.ack_code = ack_code


class UnauthorizedError(ServiceError, PermissionError):
    """No credentials, or credentials we cannot accept (RFC 6750 3.1 ``invalid_token``).

    HTTP 401 with ``WWW-Authenticate: Bearer``; on DICOM an association is rejected
    instead (PS3.8 A-ASSOCIATE-RJ), and a DIMSE request answers 0x0124 Refused: Not
    authorized (PS3.7 Annex C). ``str(exc)`` says why (expired, audience, signature),
    never what the token contained.
    """

    title = "Unauthorized"
    http_status = 401
    dimse_status = 0x0124
    fhir_code = "login"

    def __init__(self, message: str = "authentication required", *,
                 error: str = "invalid_token") -> None:
        super().__init__(message)
        #: RFC 6750 3.1 error code for ``WWW-Authenticate``.
        self.error = error


class ForbiddenError(ServiceError, PermissionError):
    """Valid credentials without the scope the request needs.

    HTTP 403 with ``WWW-Authenticate: Bearer error="insufficient_scope"`` (RFC 6750 3.1).
    """

    title = "Forbidden"
    http_status = 403
    dimse_status = 0x0124
    fhir_code = "forbidden"

    def __init__(self, message: str = "insufficient scope", *, scope: str = "") -> None:
        super().__init__(message)
        #: The scope that would have been enough (``WWW-Authenticate: ... scope=``).
        self.scope = scope


class ConfiguredElsewhereError(ServiceError, ValueError):
    """A change through the API to something the settings define (issue 16: a C-MOVE
    destination of ``qr.destinations``); HTTP 409, change the settings instead."""

    title = "Defined in the settings"
    http_status = 409
    dimse_status = 0x0110
    fhir_code = "business-rule"


class RetentionError(ServiceError, ValueError):
    """Deleting a record before its retention period ends (Circular 13/2025/TT-BYT)."""

    title = "Retention period not over"
    http_status = 409
    dimse_status = 0x0110
    fhir_code = "business-rule"


class RejectedInstanceError(ServiceError, PermissionError):
    """A SOP Instance rejected by an IOCM rejection note is sent again (IHE RAD TF-2
    4.66.4.1.3: the Image Manager does not accept it again).

    PS3.4 B.2.3 leaves the refusal's code to the implementation; 0xA771 is what
    dcm4chee-arc answers ("Subsequent occurrence of rejected object"), so peers that
    handle IOCM already know it. HTTP 409 (STOW-RS FailureReason carries 0xA771).
    """

    title = "Subsequent occurrence of rejected object"
    http_status = 409
    dimse_status = 0xA771
    fhir_code = "business-rule"


class SignedResultError(ServiceError, ValueError):
    """Changing a signed result in place; only a new signed amendment may replace it."""

    title = "Signed result is immutable"
    http_status = 409
    dimse_status = 0x0110
    fhir_code = "business-rule"


class InvalidSignatureError(ServiceError, ValueError):
    """A JWS (RFC 7515) that does not verify against the given certificate."""

    title = "Invalid signature"
    http_status = 400
    dimse_status = 0xC000
    fhir_code = "invalid"


class TooManyRequestsError(ServiceError, PermissionError):
    """Too many failed authentications from one client (RFC 6585 4: 429, ``Retry-After``).

    Raised before any credential is checked, so a flood of bad API keys costs no
    scrypt (RFC 7914) work; on DICOM it would be 0xA700-like back-pressure, but only
    HTTP raises it.
    """

    title = "Too many requests"
    http_status = 429
    dimse_status = 0xA700
    fhir_code = "throttled"

    def __init__(self, message: str = "too many failed authentications", *,
                 retry_after_s: int = 1) -> None:
        super().__init__(message)
        #: Whole seconds for the ``Retry-After`` header (RFC 9110 10.2.3).
        self.retry_after_s = retry_after_s
