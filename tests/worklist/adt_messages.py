"""Real-shaped HL7 v2.5.1 ADT messages (IHE PIR) for the ADT tests and the merge benchmark.

No ADT capture is in ../shared/data/lab, so these are built after the examples of
HL7 v2.5.1 chapter 3 (3.5.2 A40 "merge patient - patient identifier list", with
``ADT^A40^ADT_A39``, several PID/MRG pairs; 3.5.2.7 A47 ``ADT^A47^ADT_A30``) and
IHE RAD TF-2 4.12 (``ADT^A08^ADT_A01`` with EVN, PID, PV1): MSH-18 declared,
assigning authority in CX.4, EVN before PID, PV1 where the structure has one.
"""

from __future__ import annotations

__all__ = ["a08", "a40", "a47", "adt"]


def adt(
    trigger: str,
    structure: str,
    body: list[str],
    *,
    control_id: str = "ADT0001",
    charset: str = "UNICODE UTF-8",
    encoding: str = "utf-8",
) -> bytes:
    """One ADT message, segments ended by CR (HL7 v2.5.1 2.5.1)."""
    msh = (
        "MSH|^~\\&|HIS|BVTW|PACSLAB|BVTW|20261202103000||"
        f"ADT^{trigger}^{structure}|{control_id}|P|2.5.1|||AL|NE|VNM|{charset}"
    )
    evn = f"EVN|{trigger}|20261202103000|||NV001^TRAN^VAN"
    return ("\r".join([msh, evn, *body]) + "\r").encode(encoding)


def a08(
    patient_id: str,
    *,
    name: str = "NGUYỄN^THỊ^LAN",
    birth: str = "19850312",
    sex: str = "F",
    issuer: str = "BVTW",
    control_id: str = "ADT0008",
) -> bytes:
    """A08 update patient information, as a record system sends a corrected name."""
    return adt(
        "A08",
        "ADT_A01",
        [
            f"PID|1||{patient_id}^^^{issuer}^MR||{name}||{birth}|{sex}|||"
            "12 LÝ THƯỜNG KIỆT^^HÀ NỘI^^100000^VNM",
            "PV1|1|O|CDHA^^^BVTW||||BS01^PHAM^MINH",
        ],
        control_id=control_id,
    )


def a40(
    pairs: list[tuple[str, str]],
    *,
    name: str = "",
    issuer: str = "BVTW",
    control_id: str = "ADT0040",
) -> bytes:
    """A40: each (surviving, obsolete) pair as PID-3 and MRG-1 (ADT_A39)."""
    body: list[str] = []
    for n, (surviving, obsolete) in enumerate(pairs, 1):
        body.append(f"PID|{n}||{surviving}^^^{issuer}^MR||{name}")
        body.append(f"MRG|{obsolete}^^^{issuer}^MR")
    return adt("A40", "ADT_A39", body, control_id=control_id)


def a47(old: str, new: str, *, issuer: str = "BVTW", control_id: str = "ADT0047") -> bytes:
    """A47: MRG-1 is the identifier until now, PID-3 the new one (ADT_A30)."""
    return adt(
        "A47",
        "ADT_A30",
        [f"PID|1||{new}^^^{issuer}^MR||", f"MRG|{old}^^^{issuer}^MR"],
        control_id=control_id,
    )
