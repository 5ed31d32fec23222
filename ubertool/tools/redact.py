"""Secrets out of everything a guest or a client sees: each known value becomes [redacted:NAME]."""

from __future__ import annotations

import threading


class Redactor:
    """The run's secret values, and their removal from text and bytes. Thread-safe."""

    _MIN_LEN = 4  # shorter values would redact ordinary text

    def __init__(self) -> None:
        self._secrets: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, name: str, secret: str) -> None:
        if len(secret) >= self._MIN_LEN:
            with self._lock:
                self._secrets[secret] = name

    def forget(self, secret: str) -> None:
        with self._lock:
            self._secrets.pop(secret, None)

    def _pairs(self) -> list[tuple[str, str]]:
        with self._lock:  # longest first, so a secret containing another is replaced whole
            return sorted(self._secrets.items(), key=lambda item: -len(item[0]))

    def text(self, value: str) -> str:
        for secret, name in self._pairs():
            if secret in value:
                value = value.replace(secret, f"[redacted:{name}]")
        return value

    def data(self, value: bytes) -> bytes:
        for secret, name in self._pairs():
            raw = secret.encode()
            if raw in value:
                value = value.replace(raw, f"[redacted:{name}]".encode())
        return value
