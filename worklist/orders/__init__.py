"""Orders from the record system over HL7 v2: parsing (pure), intake, MLLP and folder shells.

:mod:`worklist.orders.hl7v2` parses ORM^O01 / OMI^O23 and builds ACKs (pure);
:mod:`worklist.orders.adt` reads ADT A01/A04/A08/A40/A47 into patient identity
commands (pure; IHE PIR, applied by :class:`core.patients.PatientIdentity`);
:class:`~worklist.orders.intake.Hl7OrderIntake` applies a message through
:class:`services.orders.OrderService` and answers it; :mod:`worklist.orders.mllp`
and :mod:`worklist.orders.watcher` are the transport shells.
"""

from worklist.orders.intake import Hl7OrderIntake, IntakeResult

__all__ = ["Hl7OrderIntake", "IntakeResult"]
