"""API keys: loaded from settings, held only as SHA-256 hashes, checked in constant time.

Key file format, one key per line (blank lines and `#` comments ignored):
    <raw key>                      [name=<label>] [rpm=<n>] [tpm=<n>]
    sha256:<64 hex digits>         [name=<label>] [rpm=<n>] [tpm=<n>]
rpm/tpm override the global per-key rate limits for that key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass


class ApiKeyError(ValueError):
    """The key file or key list is malformed."""


@dataclass(frozen=True)
class ApiKey:
    digest: str  # sha256 hex of the raw key
    name: str
    rpm: int | None = None
    tpm: int | None = None


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def parse_key_line(line: str, where: str) -> ApiKey | None:
    """One line of a key file -> ApiKey, None for blanks and comments."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    secret, *options = line.split()
    if secret.startswith("sha256:"):
        digest = secret[len("sha256:") :].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ApiKeyError(f"{where}: sha256: must be followed by 64 hex digits")
    else:
        digest = hash_key(secret)
    fields: dict[str, str] = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or name not in ("name", "rpm", "tpm"):
            raise ApiKeyError(f"{where}: unknown option {option!r} (name=, rpm=, tpm=)")
        fields[name] = value
    try:
        rpm = int(fields["rpm"]) if "rpm" in fields else None
        tpm = int(fields["tpm"]) if "tpm" in fields else None
    except ValueError:
        raise ApiKeyError(f"{where}: rpm and tpm must be integers") from None
    return ApiKey(digest=digest, name=fields.get("name", f"key-{digest[:8]}"), rpm=rpm, tpm=tpm)


class KeyRing:
    """The keys a gateway accepts; empty means authentication is off."""

    def __init__(self, keys: list[ApiKey]):
        self._by_digest = {k.digest: k for k in keys}

    @classmethod
    def from_settings(cls, settings) -> "KeyRing":
        keys = [parse_key_line(raw, "ROSE_API_KEYS") for raw in settings.api_keys.split(",")]
        if settings.api_keys_file:
            try:
                with open(settings.api_keys_file, encoding="utf-8") as f:
                    lines = f.readlines()
            except OSError as exc:
                raise ApiKeyError(f"ROSE_API_KEYS_FILE: {exc}") from None
            keys += [parse_key_line(line, f"{settings.api_keys_file}:{i}") for i, line in enumerate(lines, 1)]
        return cls([k for k in keys if k is not None])

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def check(self, raw: str | None) -> ApiKey | None:
        """The key that matches raw, or None. Compares digests in constant time."""
        if not raw:
            return None
        digest = hash_key(raw)
        found = None
        for known, key in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                found = key
        return found
