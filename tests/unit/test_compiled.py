"""The compiled build (nudgeflow/compiled.py): the same results as the source, never stale code,
and engine/core.pxd in step with engine/core.py."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nudgeflow import compiled

ROOT = Path(__file__).resolve().parents[2]


def run_class() -> ast.ClassDef:
    tree = ast.parse((ROOT / "engine" / "core.py").read_text())
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Run")


def test_pxd_declares_exactly_the_slots_and_matching_methods() -> None:
    cls = run_class()
    slots = next(
        ast.literal_eval(n.value)
        for n in cls.body
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in n.targets)
    )
    pxd = (ROOT / "engine" / "core.pxd").read_text()
    fields = {f.strip() for line in re.findall(r"cdef public \w+ (.+)", pxd) for f in line.split(",")}
    assert fields == set(slots)  # an attribute missing here would not exist on the compiled class
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    declared = re.findall(r"cpdef (\w+)\(self(.*)\)", pxd)
    assert declared, "no methods declared"
    for name, params in declared:
        assert name in methods, f"core.pxd declares _Run.{name}, which core.py does not have"
        fn = methods[name]
        want = [
            a.arg + ("=*" if i >= len(fn.args.args) - len(fn.args.defaults) else "") for i, a in enumerate(fn.args.args)
        ]
        got = ["self"] + [p.strip() for p in params.split(",") if p.strip()]
        assert got == want, name
        # Cython cannot compile a closure inside a C method
        inner = [
            n for n in ast.walk(fn) if isinstance(n, (ast.Lambda, ast.GeneratorExp, ast.FunctionDef)) and n is not fn
        ]
        assert not inner, f"_Run.{name} holds a closure: leave it out of core.pxd"


def test_makefile_rebuilds_when_any_compiled_source_changes() -> None:
    makefile = (ROOT / "Makefile").read_text()
    hot = re.search(r"^HOT := ((?:.*\\\n)*.*)$", makefile, re.M)
    assert hot is not None
    files = set(hot.group(1).replace("\\\n", " ").split())
    want = {str(compiled.source_of(m).relative_to(compiled.PACKAGE)) for m in compiled.MODULES}
    assert files == want | {"engine/core.pxd"}


def test_stale_or_pure_imports_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "PACKAGE", tmp_path)
    monkeypatch.delenv(compiled.PURE_ENV, raising=False)
    module = "nudgeflow.engine.core"
    src, ext = compiled.source_of(module), compiled.compiled_of(module)
    src.parent.mkdir()
    src.write_text("x = 1\n")
    finder = compiled._SourceFirst()
    assert compiled.state_of(module) == "source"
    assert finder.find_spec(module, None) is None  # the usual finders take it

    ext.write_bytes(b"")
    os.utime(src, (1000, 1000))
    os.utime(ext, (2000, 2000))
    assert compiled.state_of(module) == "compiled"
    assert finder.find_spec(module, None) is None  # the extension, found the usual way

    os.utime(src, (3000, 3000))  # edited after the build
    assert compiled.state_of(module) == "stale"
    spec = finder.find_spec(module, None)
    assert spec is not None and spec.origin == str(src)

    os.utime(src, (1000, 1000))
    src.with_suffix(".pxd").write_text("")
    os.utime(src.with_suffix(".pxd"), (3000, 3000))  # a changed declaration makes it stale too
    assert compiled.state_of(module) == "stale"

    os.utime(src.with_suffix(".pxd"), (1000, 1000))
    monkeypatch.setenv(compiled.PURE_ENV, "1")
    spec = finder.find_spec(module, None)
    assert spec is not None and spec.origin == str(src)
    assert compiled.status()[module] == "source"
    assert finder.find_spec("nudgeflow.cli", None) is None  # not a compiled module: untouched


def test_compiled_where_required() -> None:
    """CI builds the modules (`.ci/run` sets REQUIRE_COMPILED=1): they must be current."""
    if not os.environ.get("REQUIRE_COMPILED"):
        pytest.skip("REQUIRE_COMPILED not set")
    assert set(compiled.status().values()) == {"compiled"}
    import nudgeflow.engine.core

    assert nudgeflow.engine.core.__file__ is not None
    assert nudgeflow.engine.core.__file__.endswith(compiled.compiled_of("nudgeflow.engine.core").name)
    with pytest.raises(TypeError):  # core.pxd took effect: `_Run` is a C class, closed to new attributes
        nudgeflow.engine.core._Run.anything = 1  # type: ignore[attr-defined]


def test_compiled_and_source_give_the_same_results(tmp_path: Path) -> None:
    """The batch core's digest (every record, write, timer operation and count) and simulate's
    output over a corpus with every seed journey: equal with and without the compiled modules."""
    if "compiled" not in {compiled.state_of(m) for m in compiled.MODULES}:
        pytest.skip("nothing compiled here (`nudgeflow compile`)")
    py, corpus = sys.executable, str(tmp_path)
    subprocess.run([py, "bench/corpus.py", "--out", corpus, "--users", "300", "--events", "6000"], cwd=ROOT, check=True)
    results = []
    for pure in ("0", "1"):
        env = {**os.environ, compiled.PURE_ENV: pure}
        run = subprocess.run(
            [py, "bench/batch_digest.py", "--corpus", corpus], cwd=ROOT, env=env, check=True, capture_output=True
        )
        digest = run.stdout.split()[1]
        out = tmp_path / f"simulate-{pure}"
        simulate = ["simulate", "--events", f"{corpus}/events.jsonl", "--profiles", f"{corpus}/profiles.jsonl"]
        subprocess.run(
            [py, "-m", "nudgeflow.cli", *simulate, "-j", "journeys/seeds", "--out", str(out)],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
        results.append((digest, {p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl"))}))
    (compiled_digest, compiled_sim), (source_digest, source_sim) = results
    assert compiled_digest == source_digest
    assert compiled_sim == source_sim
    assert any(compiled_sim.values())
