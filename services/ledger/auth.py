"""Bearer keys with roles: reader < redeemer < ops. Keys come from LEDGER_API_KEYS."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Literal

Role = Literal["reader", "redeemer", "ops"]
_RANK: dict[str, int] = {"reader": 1, "redeemer": 2, "ops": 3}


class AuthError(Exception):
    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


@dataclass(frozen=True)
class KeyRing:
    keys: tuple[tuple[str, Role], ...]

    @classmethod
    def parse(cls, spec: str) -> KeyRing:
        """`key1:ops,key2:reader`; a malformed entry is a start-up error, not a silent skip."""
        pairs: list[tuple[str, Role]] = []
        for n, item in enumerate(filter(None, (p.strip() for p in spec.split(","))), 1):
            key, sep, role = item.rpartition(":")
            if not sep or not key or role not in _RANK:
                # Named by position and role, never by its text: the key is a secret, and
                # this message goes to the log.
                raise ValueError(f"LEDGER_API_KEYS entry {n} is not KEY:reader|redeemer|ops")
            pairs.append((key, role))  # type: ignore[arg-type]
        return cls(tuple(pairs))

    def role_of(self, authorization: str | None) -> Role:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise AuthError(401, "Unauthorized", "send Authorization: Bearer <key>")
        presented = authorization[7:].strip()
        for key, role in self.keys:
            # Constant-time comparison: keys are secrets.
            if hmac.compare_digest(key.encode(), presented.encode()):
                return role
        raise AuthError(401, "Unauthorized", "unknown API key")

    def require(self, authorization: str | None, needed: Role) -> Role:
        role = self.role_of(authorization)
        if _RANK[role] < _RANK[needed]:
            raise AuthError(403, "Forbidden", f"this call needs the {needed} role; key has {role}")
        return role
