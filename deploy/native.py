"""`make native`: compile the pure cores with mypyc into .build/native (services/common/native.py).

Optional by design: without a C compiler or Python headers the build is skipped with a
message and everything runs as Python. A build is cheap to redo (~15 s) and happens only
when a listed source changed; the manifest is written last, so an interrupted build is
never used.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from services.common.native import BUILD_DIR, COMPILED, MANIFEST, ROOT, manifest_for, stale_reason


def _can_compile() -> str | None:
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not include.exists():
        return f"no Python headers ({include})"
    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        return "no C compiler (cc/gcc)"
    return None


def build(force: bool = False) -> bool:
    reason = stale_reason()
    if reason is None and not force:
        print("native: up to date")
        return True
    why_not = _can_compile()
    if why_not is not None:
        print(f"native: skipped, {why_not}; the cores run as Python")
        return False
    import json

    from mypyc.build import mypycify
    from setuptools import setup

    sources = sorted(p for paths in COMPILED.values() for p in paths)
    print(f"native: compiling {len(sources)} modules with mypyc ({reason or 'forced'})...")
    started = time.perf_counter()
    shutil.rmtree(BUILD_DIR, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="mypyc-") as temp:
        cwd = Path.cwd()
        os.chdir(ROOT)
        try:
            setup(
                name="loyalty-native",
                ext_modules=mypycify(sources, opt_level="3"),
                script_args=["-q", "build_ext", "--build-lib", str(BUILD_DIR),
                             "--build-temp", temp],
            )  # fmt: skip
        finally:
            os.chdir(cwd)
            # mypycify writes its generated C under ./build: not ours to keep.
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    (BUILD_DIR / MANIFEST).write_text(json.dumps(manifest_for(), indent=2), encoding="utf-8")
    print(f"native: built in {time.perf_counter() - started:.1f} s into {BUILD_DIR}")
    return True


def main() -> None:
    force = "--force" in sys.argv[1:]
    build(force)


if __name__ == "__main__":
    main()
