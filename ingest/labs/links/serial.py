"""ASTM E1381 over RS-232 (E1381 §5: 9600 8N1 by default), through pyserial.

The port is opened, served by the same loop as TCP, and reopened after
``reconnect_s`` if it goes away (a USB adapter unplugged).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import serial

from ingest.labs.links._runner import AnalyzerLink, run_link

__all__ = ["SerialLink", "SerialTransport"]

logger = logging.getLogger(__name__)


class SerialTransport:
    """A pyserial port as a :class:`~ingest.labs.links.Transport`."""

    def __init__(self, port: Any) -> None:
        self.port = port

    def read(self, timeout: float) -> bytes:
        self.port.timeout = timeout
        try:
            first: bytes = self.port.read(1)
            if not first:
                return b""
            waiting = self.port.in_waiting
            rest: bytes = self.port.read(waiting) if waiting else b""
        except serial.SerialException as exc:
            raise ConnectionError(str(exc)) from exc
        return first + rest

    def write(self, data: bytes) -> None:
        try:
            self.port.write(data)
            self.port.flush()
        except serial.SerialException as exc:
            raise ConnectionError(str(exc)) from exc

    def close(self) -> None:
        self.port.close()


class SerialLink:
    """Serve an analyzer on a serial ``device`` (``/dev/ttyS0``, ``/dev/ttyUSB0``)."""

    def __init__(
        self, link: AnalyzerLink, device: str, *, baudrate: int = 9600, reconnect_s: float = 5.0
    ) -> None:
        self.link = link
        self.device = device
        self.baudrate = baudrate
        self.reconnect_s = reconnect_s
        self._thread = threading.Thread(target=self._run, name=f"astm-{link.name}", daemon=True)

    def start(self) -> SerialLink:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self.link.stopping.is_set():
            try:
                port = serial.Serial(self.device, self.baudrate, timeout=0.05)
            except (serial.SerialException, OSError) as exc:
                self.link.status.error(f"serial open failed: {type(exc).__name__}")
                self.link.stopping.wait(self.reconnect_s)
                continue
            logger.info("analyzer %s: serial port open", self.link.name)
            run_link(SerialTransport(port), self.link)
            self.link.stopping.wait(self.reconnect_s)

    def stop(self) -> None:
        self.link.stopping.set()
        self._thread.join(timeout=5)
