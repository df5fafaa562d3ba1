"""Map units as analyzers send them to UCUM (the Unified Code for Units of Measure).

HL7 v2.5.1 §7.4.2.6 recommends UCUM for OBX-6; ASTM E1394 §9.4.5 leaves R.5 free
text, so real senders write ``mg/dl``, ``10^9/L`` or ``µmol/L``. The table is small
on purpose: a unit we do not know maps to ``None`` rather than to a guess. Keys are
matched after trimming, mapping ``µ``/``μ`` to ``u`` and folding case, except for the
few units where case carries meaning (``G/L`` is giga per litre in French labs,
``g/L`` grams).
"""

from __future__ import annotations

from typing import Final

__all__ = ["normalise_unit"]

# Case-sensitive first: these differ only by case from something else.
_EXACT: Final[dict[str, str]] = {
    "G/L": "10*9/L",
    "T/L": "10*12/L",
    "g/L": "g/L",
    "g/l": "g/L",
}

_FOLDED: Final[dict[str, str]] = {
    # substance concentration
    "mmol/l": "mmol/L",
    "umol/l": "umol/L",
    "nmol/l": "nmol/L",
    "pmol/l": "pmol/L",
    "mol/l": "mol/L",
    "meq/l": "meq/L",
    # mass concentration
    "mg/dl": "mg/dL",
    "g/dl": "g/dL",
    "mg/l": "mg/L",
    "ug/l": "ug/L",
    "ug/dl": "ug/dL",
    "ng/ml": "ng/mL",
    "ng/l": "ng/L",
    "pg/ml": "pg/mL",
    "ug/ml": "ug/mL",
    "mg/ml": "mg/mL",
    # catalytic and arbitrary activity
    "u/l": "U/L",
    "iu/l": "[IU]/L",
    "miu/ml": "m[IU]/mL",
    "miu/l": "m[IU]/L",
    "uiu/ml": "u[IU]/mL",
    "iu/ml": "[IU]/mL",
    "ku/l": "kU/L",
    "u/ml": "U/mL",
    # cell counts
    "10^9/l": "10*9/L",
    "10e9/l": "10*9/L",
    "x10^9/l": "10*9/L",
    "x10e9/l": "10*9/L",
    "10*9/l": "10*9/L",
    "x10*9/l": "10*9/L",
    "10^12/l": "10*12/L",
    "10e12/l": "10*12/L",
    "x10^12/l": "10*12/L",
    "x10e12/l": "10*12/L",
    "10*12/l": "10*12/L",
    "10^3/ul": "10*3/uL",
    "x10^3/ul": "10*3/uL",
    "10*3/ul": "10*3/uL",
    "10^6/ul": "10*6/uL",
    "x10^6/ul": "10*6/uL",
    "10*6/ul": "10*6/uL",
    "mill/mm3": "10*6/uL",
    "/mm3": "/uL",
    "/ul": "/uL",
    # red cell indices and the rest
    "%": "%",
    "fl": "fL",
    "pg": "pg",
    "g": "g",
    "kg": "kg",
    "mg": "mg",
    "ml": "mL",
    "l": "L",
    "s": "s",
    "sec": "s",
    "min": "min",
    "h": "h",
    "wk": "wk",
    "mm/h": "mm/h",
    "mm[hg]": "mm[Hg]",
    "mmhg": "mm[Hg]",
    "ml/min": "mL/min",
    "ml/min/1.73m2": "mL/min/{1.73_m2}",
    "mosm/kg": "mosm/kg",
    "ratio": "{ratio}",
    "inr": "{INR}",
}


def normalise_unit(unit: str) -> str | None:
    """Return the UCUM code for a unit as sent, or ``None`` when it is not known.

    Parameters
    ----------
    unit : str
        The unit text, e.g. ``"mg/dl"``, ``"x10^9/L"``, ``"µmol/L"``.

    Returns
    -------
    str or None
        The UCUM case-sensitive code (``"mg/dL"``, ``"10*9/L"``, ``"umol/L"``).

    Examples
    --------
    >>> normalise_unit("10e9/L")
    '10*9/L'
    >>> normalise_unit("S/CO") is None
    True
    """
    text = unit.strip()
    if not text:
        return None
    exact = _EXACT.get(text)
    if exact is not None:
        return exact
    key = text.replace("µ", "u").replace("μ", "u").replace(" ", "").casefold()
    return _FOLDED.get(key)
