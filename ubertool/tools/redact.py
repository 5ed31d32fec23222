"""Secrets out of everything a guest, a client or a stored record sees: each known value, and
its common encodings, becomes [redacted:NAME].

The encodings: base64 (standard and URL-safe, padded or not, and at each of the three byte
alignments a secret can have inside a longer encoded text, e.g. `Basic base64(user:secret)`),
URL-encoding (`%XX` and `+` for spaces, either hex case), JSON string escapes (ASCII-only or
not) and hex (either case). Redaction recognizes; it cannot undo a transformation it does not
know (a secret reversed, split or re-encoded twice passes): the defence against a guest is not
letting it read a secret at all.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from typing import Any
from urllib.parse import quote, quote_plus

_MIN_ENCODED = 8  # an encoded fragment shorter than this would redact ordinary text


def _base64_fragments(raw: bytes) -> set[str]:
    """The parts of base64 text that depend on `raw` alone, wherever `raw` starts in the
    encoded data: at offset k (mod 3), drop the characters that mix in neighbouring bytes."""
    fragments = set()
    for k in range(3):
        bits = 8 * (k + len(raw))
        first, last = -(-8 * k // 6), bits // 6  # whole characters inside the secret's bits
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            core = encode(b"\0" * k + raw).decode()[first:last]
            if len(core) >= _MIN_ENCODED:
                fragments.add(core)
        if k == 0:
            fragments.update({base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()})
    return fragments


def encodings(secret: str) -> set[str]:
    """`secret` and the common encodings of it that are long enough to redact safely."""
    raw = secret.encode()
    forms = {secret, quote(secret, safe=""), quote_plus(secret, safe=""), quote(secret, safe="/:"),
             json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    forms |= {form.replace("%", "%25") for form in list(forms) if "%" in form}  # encoded twice in a URL
    forms |= {form.lower() for form in forms if "%" in form}  # %2f as well as %2F
    hexed = binascii.hexlify(raw).decode()
    forms |= {hexed, hexed.upper()} | _base64_fragments(raw)
    return {form for form in forms if form == secret or len(form) >= _MIN_ENCODED}


class Redactor:
    """The run's secret values, and their removal from text, bytes and JSON values. Thread-safe."""

    _MIN_LEN = 4  # shorter values would redact ordinary text

    def __init__(self) -> None:
        self._secrets: dict[str, str] = {}  # secret -> name
        self._forms: dict[str, str] = {}  # every encoding of every secret -> name
        self._pairs: tuple[tuple[str, str], ...] = ()  # the forms, longest first
        self._lock = threading.Lock()

    def add(self, name: str, secret: str) -> None:
        if len(secret) >= self._MIN_LEN:
            with self._lock:
                self._secrets[secret] = name
                self._rebuild()

    def forget(self, secret: str) -> None:
        with self._lock:
            self._secrets.pop(secret, None)
            self._rebuild()

    def _rebuild(self) -> None:
        self._forms = {form: name for secret, name in self._secrets.items() for form in encodings(secret)}
        # Longest first, so a form containing another is replaced whole; one tuple replaced by
        # another, so a reader needs no lock.
        self._pairs = tuple(sorted(self._forms.items(), key=lambda item: -len(item[0])))

    @property
    def active(self) -> bool:
        """Whether there is any secret to redact (none: `text` and `data` change nothing)."""
        return bool(self._forms)

    def text(self, value: str) -> str:
        for form, name in self._pairs:
            if form in value:
                value = value.replace(form, f"[redacted:{name}]")
        return value

    def data(self, value: bytes) -> bytes:
        for form, name in self._pairs:
            raw = form.encode()
            if raw in value:
                value = value.replace(raw, f"[redacted:{name}]".encode())
        return value

    def json(self, value: Any) -> Any:
        """`value` (JSON-like: dicts, lists, tuples, strings, bytes, numbers) with every string,
        bytes value and dict key redacted."""
        if not self._secrets:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, bytes | bytearray):
            return self.data(bytes(value))
        if isinstance(value, dict):
            return {self.json(k) if isinstance(k, str) else k: self.json(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.json(v) for v in value)
        return value
