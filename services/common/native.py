"""Optional compiled builds of the pure cores (mypyc), used only when they match the source.

The rules evaluator is plain, strictly typed Python; mypyc compiles it to C extensions
that run the same code 1.4-1.8x faster (measured in bench/README.md; the ledger's
accounting was tried too and gained nothing, so it stays interpreted). The Python files
stay the only source of truth: `deploy/native.py` builds the extensions into
`.build/native/` with a manifest of the sources' SHA-256, and a package uses its compiled
modules only when every listed source still hashes the same and the build is for this
interpreter. An edited file, a missing compiler, another Python, or `LOYALTY_NATIVE=0`
all mean: the Python modules, with the same behaviour.

This module is imported from package `__init__` files, so it uses the standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import MutableSequence
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[2]
BUILD_DIR: Final = ROOT / ".build" / "native"
MANIFEST: Final = "manifest.json"

# Package -> the modules compiled for it (paths relative to the repository root).
COMPILED: Final[dict[str, tuple[str, ...]]] = {
    "services.rules": (
        "services/rules/emit.py",
        "services/rules/engagement_rules.py",
        "services/rules/engine.py",
        "services/rules/pruning.py",
        "services/rules/purchase_rules.py",
        "services/rules/simulate.py",
        "services/rules/tiers.py",
    ),
}


def interpreter_tag() -> str:
    """Extensions are built for one interpreter: its cache tag and platform must match."""
    return f"{sys.implementation.cache_tag}-{sys.platform}-{os.uname().machine}"


def source_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_for(root: Path = ROOT) -> dict[str, Any]:
    """What a build records, and what a fresh build must still match."""
    sources = sorted(p for paths in COMPILED.values() for p in paths)
    return {
        "interpreter": interpreter_tag(),
        "sources": {p: source_digest(root / p) for p in sources},
    }


def stale_reason(build_dir: Path = BUILD_DIR, root: Path = ROOT) -> str | None:
    """Why the build cannot be used (None: it can), for the log and `make native`."""
    try:
        recorded = json.loads((build_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no native build (run `make native`)"
    if not isinstance(recorded, dict) or recorded.get("interpreter") != interpreter_tag():
        return "native build is for another interpreter"
    try:
        current = manifest_for(root)
    except OSError as exc:
        return f"source missing: {exc}"
    if recorded.get("sources") != current["sources"]:
        return "sources changed since the native build (run `make native`)"
    return None


def enabled() -> bool:
    return os.environ.get("LOYALTY_NATIVE", "1").strip().lower() not in {"0", "false", "no", "off"}


def accelerate(package: str, path: MutableSequence[str]) -> bool:
    """Put the package's compiled modules ahead of its Python files when they are current.

    Called from the package's `__init__` with its `__path__`; submodules imported after
    that resolve to the extensions. Returns whether the compiled modules are in use.
    """
    if package not in COMPILED or not enabled() or stale_reason() is not None:
        return False
    compiled = BUILD_DIR.joinpath(*package.split("."))
    if not compiled.is_dir():
        return False
    path.insert(0, str(compiled))
    # mypyc puts the code shared by the compiled modules in one top-level extension.
    if str(BUILD_DIR) not in sys.path:
        sys.path.append(str(BUILD_DIR))
    return True
