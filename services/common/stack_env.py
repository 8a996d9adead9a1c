"""The `.run/stack.env` file `make up` writes: KEY=VALUE lines a shell can source.

Standard library only: `ledgerctl` reads it before its own imports (services/ctl), and
`deploy.stack` writes and reads it.
"""

from __future__ import annotations

import shlex


def parse(text: str) -> dict[str, str]:
    """KEY=VALUE lines (blank lines and # comments ignored), values unquoted."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        env[key.strip()] = unquoted(value.strip())
    return env


def line(key: str, value: str) -> str:
    """Quoted for the shell that sources the file: a secret or URL with `&`, `$`, `;` or a
    space would otherwise be cut short there, or run."""
    return f"{key}={shlex.quote(value)}"


def unquoted(value: str) -> str:
    """A value as `line` wrote it. `shlex.quote` leaves a safe value bare, so a value not
    in quotes (also one an older `make up` wrote bare) is taken as it stands."""
    if not value.startswith("'"):
        return value
    try:
        words = shlex.split(value)
    except ValueError:  # an unbalanced quote: written by hand, taken as it stands
        return value
    return words[0] if len(words) == 1 else value
