"""The compiled cores are used only while they match the Python source, byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from services.common import native


def _fake_repo(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "repo"
    for rel in (p for paths in native.COMPILED.values() for p in paths):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(native.ROOT / rel, root / rel)
    build = tmp_path / "build"
    build.mkdir()
    (build / native.MANIFEST).write_text(json.dumps(native.manifest_for(root)))
    return root, build


def test_a_build_matching_the_sources_is_used(tmp_path: Path) -> None:
    root, build = _fake_repo(tmp_path)
    assert native.stale_reason(build, root) is None


def test_an_edited_source_retires_the_build(tmp_path: Path) -> None:
    root, build = _fake_repo(tmp_path)
    engine = root / "services/rules/engine.py"
    engine.write_text(engine.read_text() + "\n# edited\n")
    assert "sources changed" in (native.stale_reason(build, root) or "")


def test_a_build_for_another_interpreter_or_none_is_not_used(tmp_path: Path) -> None:
    root, build = _fake_repo(tmp_path)
    manifest = json.loads((build / native.MANIFEST).read_text())
    (build / native.MANIFEST).write_text(json.dumps({**manifest, "interpreter": "cpython-27"}))
    assert "another interpreter" in (native.stale_reason(build, root) or "")
    (build / native.MANIFEST).unlink()
    assert "no native build" in (native.stale_reason(build, root) or "")


def test_switched_off_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOYALTY_NATIVE", "0")
    path: list[str] = []
    assert native.accelerate("services.rules", path) is False
    assert path == []


def test_the_running_rules_package_agrees_with_the_build_state() -> None:
    """Whichever way this suite runs (make test runs it both ways), the package's flag says
    where its modules come from."""
    import services.rules
    import services.rules.engine as engine

    compiled = not engine.__file__.endswith(".py") if engine.__file__ else False
    assert compiled == services.rules.NATIVE
