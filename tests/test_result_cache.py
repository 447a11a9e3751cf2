"""Content keys: the static import graph of chapters and modules, and the result cache built on it."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrlgen import paths, result_cache
from ctrlgen.config import load_profile
from ctrlgen.result_cache import cached, code_files, entry_path, imported_names, key_of


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    """The smoke profile with the cache root in this test's folder."""
    monkeypatch.setenv(paths.ENV_CACHE, str(tmp_path / "cache"))
    return load_profile("smoke")


def _package(tmp_path: Path) -> Path:
    """A tiny ``ctrlgen`` tree: a imports b (relatively, inside a function), b names c by string; d is not reached."""
    pkg = tmp_path / "lib" / "ctrlgen"
    (pkg / "sub" / "tables").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from .sub import b\n    return b\n",
        "sub/__init__.py": "",
        "sub/b.py": "import importlib\nMOD = importlib.import_module('ctrlgen.c')\nfrom ctrlgen.sub import missing_attr\n",
        "sub/tables/t.yaml": "x: 1\n",
        "c.py": "X = 1\n",
        "d.py": "import ctrlgen.a\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    return tmp_path


def test_imported_names_resolves_relative_and_string_imports():
    source = textwrap.dedent("""\
        import os
        import ctrlgen.x.y as alias
        from . import sibling
        from ..up import thing
        def later():
            from ctrlgen.z import w
        NAME = "ctrlgen.by_string"
        PROSE = "not ctrlgen.a module name"
        """)
    found = imported_names(source, module="ctrlgen.pkg.mod", is_package=False)
    assert found == {"ctrlgen.x.y", "ctrlgen.pkg", "ctrlgen.pkg.sibling", "ctrlgen.up", "ctrlgen.up.thing",
                     "ctrlgen.z", "ctrlgen.z.w", "ctrlgen.by_string"}
    # in a package's __init__, "from . import m" is relative to the package itself
    assert imported_names("from .m import n", module="ctrlgen.pkg", is_package=True) == {"ctrlgen.pkg.m", "ctrlgen.pkg.m.n"}


def test_code_files_follows_the_graph_and_nothing_else(tmp_path):
    root = _package(tmp_path)
    pkg = root / "lib" / "ctrlgen"
    got = {str(p.relative_to(pkg)) for p in code_files(["ctrlgen.a"], root=root)}
    # a → (parent ctrlgen/__init__) → sub/__init__ (+ its data file) → sub/b → c (named by string); never d
    assert got == {"__init__.py", "a.py", "sub/__init__.py", "sub/tables/t.yaml", "sub/b.py", "c.py"}
    chapter = root / "chapter.py"
    chapter.write_text("from ctrlgen import c\n")
    assert {str(p.relative_to(pkg)) for p in code_files(sources=[chapter], root=root)} == {"__init__.py", "c.py"}


def test_ch02_does_not_depend_on_chapter_4_code():
    """Hand-checked against chapters/ch02_background.py's imports: its graph reaches the toy DDPM and
    pretraining and the claims ledger (chapter 2 records its claim), not the chapter-4 baselines or the CLI."""
    root = Path(__file__).resolve().parents[1]
    files = {str(p.relative_to(root / "lib" / "ctrlgen")) for p in
             code_files(sources=[root / "chapters" / "ch02_background.py"], root=root)}
    assert {"experiments/ch02_background.py", "results.py", "seeding.py", "experiments/base_models/train.py",
            "data/domains.py", "metrics/distribution.py", "thesis/claims.py"} <= files
    assert not {"methods/baselines/dreambooth.py", "book.py", "cli/main.py", "experiments/ch04_didgen/__init__.py"} & files
    assert not any(f.startswith("profiles/") and f.endswith(".yaml") for f in files)  # profile values are keyed per key


def test_key_depends_on_parts_and_code(tmp_path):
    root = _package(tmp_path)
    base = key_of({"n": 3, "section": load_profile("smoke").didgen.pairs}, ["ctrlgen.a"], root=root)
    assert base == key_of({"section": load_profile("smoke").didgen.pairs.to_dict(), "n": 3}, ["ctrlgen.a"], root=root)
    assert base != key_of({"n": 4, "section": load_profile("smoke").didgen.pairs}, ["ctrlgen.a"], root=root)
    (root / "lib" / "ctrlgen" / "d.py").write_text("# not imported by a\n")
    assert base == key_of({"n": 3, "section": load_profile("smoke").didgen.pairs}, ["ctrlgen.a"], root=root)
    (root / "lib" / "ctrlgen" / "c.py").write_text("X = 2\n")  # imported (by string, through b)
    assert base != key_of({"n": 3, "section": load_profile("smoke").didgen.pairs}, ["ctrlgen.a"], root=root)


def test_key_parts_must_be_json_like():
    with pytest.raises(TypeError, match="key parts must be JSON-like.*object"):
        key_of({"model": object()})


@pytest.mark.parametrize("kind, value", [
    ("torch", {"images": torch.arange(6.0).reshape(2, 3), "masks": [torch.ones(2, dtype=torch.bool)], "n": 2}),
    ("numpy", {"features": np.linspace(0, 1, 5), "labels": np.array([1, 0, 1])}),
    ("numpy", np.eye(3)),
    ("json", {"fid": 12.5, "rows": [1, 2, 3]}),
])
def test_cached_computes_once_and_round_trips(tmp_path, cfg, kind, value):
    calls = []

    def compute():
        calls.append(1)
        return value

    first = cached({"what": "test", "seed": 0}, compute, kind=kind, cfg=cfg)
    second = cached({"what": "test", "seed": 0}, compute, kind=kind, cfg=cfg)
    assert len(calls) == 1
    _assert_same(first, value)
    _assert_same(second, value)
    cached({"what": "test", "seed": 1}, compute, kind=kind, cfg=cfg)
    assert len(calls) == 2  # another seed is another entry
    path = entry_path(key_of({"what": "test", "seed": 0}), kind, cfg)
    assert path.is_file() and path.parent == tmp_path / "cache" / "results" / kind
    described = json.loads(path.with_suffix(".key.json").read_text())
    assert described["parts"] == {"what": "test", "seed": 0} and described["kind"] == kind
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def _assert_same(got, want):
    if isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            _assert_same(got[k], want[k])
    elif isinstance(want, list):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want) and got.dtype == want.dtype
    elif isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want)
    else:
        assert got == want


def test_disable_env_recomputes(cfg, monkeypatch):
    values = iter([1, 2])
    assert cached({"k": 1}, lambda: next(values), kind="json", cfg=cfg) == 1
    monkeypatch.setenv(result_cache.DISABLE_ENV, "1")
    assert cached({"k": 1}, lambda: next(values), kind="json", cfg=cfg) == 2
    monkeypatch.delenv(result_cache.DISABLE_ENV)
    assert cached({"k": 1}, lambda: 99, kind="json", cfg=cfg) == 2  # the refreshed copy


def test_unknown_kind_is_refused(cfg):
    with pytest.raises(ValueError, match="kind must be one of torch, numpy, json, got 'pickle'"):
        cached({"k": 1}, lambda: 1, kind="pickle", cfg=cfg)


def test_torch_entries_hold_no_code(cfg):
    """weights_only loading: a stored object that is not tensors/containers is refused, not executed."""
    with pytest.raises(TypeError, match="cannot store a Linear.*a module's state_dict"):
        cached({"k": "module"}, lambda: torch.nn.Linear(2, 2), kind="torch", cfg=cfg)
    assert not entry_path(key_of({"k": "module"}), "torch", cfg).exists()  # nothing poisoned for the next call
    state = cached({"k": "state"}, lambda: torch.nn.Linear(2, 2).state_dict(), kind="torch", cfg=cfg)
    assert set(state) == {"weight", "bias"}


def _age(root: Path, seconds: float = 60.0) -> None:
    """Set every file's modification time ``seconds`` in the past (older than the memo's racy window)."""
    import os
    import time

    past = time.time_ns() - int(seconds * 1e9)
    for f in (root / "lib").rglob("*"):
        if f.is_file():
            os.utime(f, ns=(past, past))


def test_code_digest_reads_each_file_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """The import graph is parsed once per file and process (a run calls ``cached`` thousands of times): a second digest
    parses nothing; an edit (new stat) is read again and changes the digest; a file modified within the racy window
    is never memoised, so a same-size rewrite that keeps its modification time is still seen."""
    import os

    root = _package(tmp_path)
    _age(root)
    parsed = []
    real = result_cache.imported_names
    monkeypatch.setattr(result_cache, "imported_names", lambda *a, **k: parsed.append(a[1:]) or real(*a, **k))
    first = result_cache.code_digest(["ctrlgen.a"], root=root)
    n = len(parsed)
    assert n == 5  # ctrlgen, a, sub, sub.b, c
    assert result_cache.code_digest(["ctrlgen.a"], root=root) == first and len(parsed) == n
    c = root / "lib" / "ctrlgen" / "c.py"
    c.write_text("X = 2\n")  # same size, new modification time
    second = result_cache.code_digest(["ctrlgen.a"], root=root)
    assert second != first and len(parsed) == n + 1  # only c.py parsed again
    stamp = c.stat().st_mtime_ns  # recent: inside the racy window
    c.write_text("X = 3\n")
    os.utime(c, ns=(stamp, stamp))  # same size, same inode, same modification time
    assert result_cache.code_digest(["ctrlgen.a"], root=root) not in (first, second)


def test_code_digest_counts_what_the_code_does_not_its_comments(tmp_path):
    """A comment or docstring reworded in an imported module keeps the digest (and every cached result); a
    changed statement does not."""
    root = _package(tmp_path)
    c = root / "lib" / "ctrlgen" / "c.py"
    first = result_cache.code_digest(["ctrlgen.a"], root=root)
    c.write_text('"""Now with a docstring."""\n# and a comment\nX = 1  # why one\n')
    assert result_cache.code_digest(["ctrlgen.a"], root=root) == first
    c.write_text("X = 1 + 0\n")
    assert result_cache.code_digest(["ctrlgen.a"], root=root) != first
