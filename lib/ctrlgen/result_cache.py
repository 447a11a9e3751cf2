"""Content-keyed caching: what a result depends on, hashed; the result stored once under that hash.

Two users share the keys built here:

- ``ctrlgen book`` keys an executed chapter on its own inputs (DESIGN.md §2: "an edit re-executes
  only the chapters whose inputs changed"): its source, the library files it imports *transitively*
  (:func:`code_files`, read statically from the import statements), the profile values it read and
  the data fingerprint.
- Chapters and experiment modules cache expensive intermediate results (generated sample sets,
  lesion–mask pair sets, trained evaluators) with :func:`cached`::

      from ctrlgen import result_cache

      pairs = result_cache.cached(
          {"what": "ch04 pairs", "config": cfg.didgen.pairs, "seed": cfg.seed,
           "data": result_cache.data_fingerprint(cfg), "model": model_key},
          lambda: generate_pairs(...),           # runs only on a miss
          kind="torch", cfg=cfg,
          code=["ctrlgen.methods.didgen.pair_generation"])

  The key is the SHA-256 of the JSON of ``key_parts`` (``Config`` sections become plain dicts and,
  being read, count as read by the chapter) plus the contents of the ``code`` modules and every
  ``ctrlgen`` module they import. Change a value, the seed, the data or that code and the result is
  recomputed; change anything else and it is loaded. Values are stored atomically under
  ``<cache root>/results/<kind>/<key>.<ext>`` with a ``.json`` beside it describing the key parts.

Kinds: ``"torch"`` (tensors and nested dicts/lists/tuples of tensors and plain numbers, e.g. a
``state_dict`` of a trained evaluator: rebuild the module and ``load_state_dict`` it),
``"numpy"`` (one array or a dict of arrays) and ``"json"`` (plain JSON values).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import os
import re
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ctrlgen import paths
from ctrlgen.results import _jsonable, atomic_write_bytes, atomic_write_json

PACKAGE = "ctrlgen"
# Profile YAML files are not code: a run's profile values are keyed one by one (config_reads).
_NOT_CODE_PACKAGES = ("ctrlgen.profiles",)
_MODULE_STRING = re.compile(r"ctrlgen(\.[A-Za-z_]\w*)*")
KINDS = {"torch": ".pt", "numpy": ".npz", "json": ".json"}
DISABLE_ENV = "CTRLGEN_NO_RESULT_CACHE"  # "1": always recompute (and overwrite), e.g. to time a chapter

T = TypeVar("T")


# ---------------------------------------------------------------- the import graph, read statically
def library_root(root: Path | None = None) -> Path:
    """The folder holding the ``ctrlgen`` package (``<project>/lib``)."""
    return (root or paths.project_root()) / "lib"


def module_file(name: str, lib: Path) -> Path | None:
    """``ctrlgen.a.b`` → ``lib/ctrlgen/a/b.py`` or ``lib/ctrlgen/a/b/__init__.py``; None if neither exists."""
    base = lib.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _relative_base(module: str, is_package: bool, level: int) -> str:
    parts = module.split(".") if is_package else module.split(".")[:-1]
    return ".".join(parts[: len(parts) - (level - 1)] if level > 1 else parts)


def imported_names(source: str, module: str = "", is_package: bool = False) -> set[str]:
    """Every ``ctrlgen`` module name ``source`` may import: import statements anywhere in the file
    (function-local ones too), relative imports resolved against ``module``, and string constants that
    name a module (``importlib.import_module("ctrlgen.cli.data")``). ``from a import b`` yields both
    ``a`` and ``a.b``, since ``b`` may be a submodule; names that are not files are dropped later."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = _relative_base(module, is_package, node.level)
                base = f"{prefix}.{base}" if base else prefix
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.fullmatch(node.value):
            names.add(node.value)
    return {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}


def _with_parents(name: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _data_files(package_dir: Path) -> list[Path]:
    """Non-Python files a package reads (thesis tables, model configs): below it, outside sub-packages."""
    found = []
    for path in package_dir.rglob("*"):
        if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
            continue
        between = path.parent.relative_to(package_dir).parts
        if any((package_dir.joinpath(*between[: i + 1]) / "__init__.py").is_file() for i in range(len(between))):
            continue  # belongs to a sub-package, which is keyed only if imported
        found.append(path)
    return found


def code_files(modules: Iterable[str] = (), sources: Iterable[Path] = (), root: Path | None = None) -> list[Path]:
    """The library files that ``modules`` and the Python files ``sources`` import, transitively.

    A static walk of the import graph from ``ast`` (nothing is imported or executed): each reached
    module's file, its parent packages' ``__init__.py`` and the data files of reached packages.
    Third-party imports are not followed; the environment's versions are pinned by the project.
    """
    lib = library_root(root)
    todo = set(modules)
    for source in sources:
        todo |= _file_imports(Path(source), "", False)
    seen: set[str] = set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name, lib)
        if path is None:
            continue  # an attribute imported with "from a import b", or a module that does not exist
        files.add(path)
        package = path.name == "__init__.py"
        if package and name not in _NOT_CODE_PACKAGES:
            files.update(_data_files(path.parent))
        todo |= set(_with_parents(name)) | _file_imports(path, name, package)
    return sorted(files)


# Per-process memo of the two costly reads (parsing a file's imports, hashing its bytes), keyed on the file's stat
# (path, inode, size, modification time in ns): ``cached`` is called thousands of times per run on the same files,
# and an edit, a replacement or a checkout changes the stat, so the file is read again. As in git's "racily clean"
# rule, a file modified less than RACY_NS ago is not memoised: a same-size rewrite within one tick of the file
# system's clock would keep its stat.
RACY_NS = 2_000_000_000
_MEMO: dict[tuple, Any] = {}


def _memoised(path: Path, what: str, compute: Callable[[Path], T], *extra: Any) -> T:
    info = os.stat(path)
    key = (what, str(Path(path).resolve()), info.st_ino, info.st_size, info.st_mtime_ns, *extra)
    if key in _MEMO:
        return _MEMO[key]
    value = compute(Path(path))
    if time.time_ns() - info.st_mtime_ns > RACY_NS:
        _MEMO[key] = value
    return value


def _file_imports(path: Path, module: str, is_package: bool) -> frozenset[str]:
    return _memoised(path, "imports", lambda p: frozenset(imported_names(p.read_text(encoding="utf-8"), module,
                                                                         is_package)), module, is_package)


def _file_sha256(path: Path) -> str:
    """SHA-256 of what the file does: a Python file's ``code_text`` (a reworded comment or docstring in a module
    every chapter imports must not recompute every chapter's cached results), any other file's bytes."""
    def digest(p: Path) -> str:
        data = code_text(p.read_text(encoding="utf-8")).encode() if p.suffix == ".py" else p.read_bytes()
        return hashlib.sha256(data).hexdigest()

    return _memoised(path, "code sha256", digest)


def file_digests(files: Iterable[Path], root: Path | None = None) -> dict[str, str]:
    """``{path relative to the project: sha256 of its code}`` (``_file_sha256``; each file read once per process
    while its stat holds)."""
    base = (root or paths.project_root()).resolve()
    return {str(Path(f).resolve().relative_to(base)): _file_sha256(Path(f)) for f in files}


def code_text(source: str) -> str:
    """``source`` regenerated from its syntax tree, docstrings removed (comments and layout never reach the tree)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree)  # source text of the tree: steadier across Python versions than ast.dump


def source_digest(files: Iterable[str], extra_sources: Iterable[str] = (), root: Path | None = None) -> str:
    """Hash of library ``files`` (paths relative to ``lib/ctrlgen``) and of ``extra_sources`` (function sources),
    Python counted by ``code_text``: what the code does, not how its comments read."""
    lib = library_root(root) / "ctrlgen"
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode())
        h.update(code_text((lib / rel).read_text()).encode())
    for source in extra_sources:
        h.update(code_text(textwrap.dedent(source)).encode())
    return h.hexdigest()


def code_digest(modules: Iterable[str], root: Path | None = None) -> str:
    """One hash of the files of ``modules`` and everything they import from ``ctrlgen``."""
    digests = file_digests(code_files(modules, root=root), root)
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- the data
def data_fingerprint(cfg: Mapping[str, Any] | None = None) -> str:
    """A hash of the data root's listing: every file's path, size and modification time.

    The data root is read-only for the product, so a changed listing means a user added, removed or
    replaced a dataset. Procedural data is not here: it is generated from code and profile values,
    which are keyed on their own. Stat only (no file is read), once per root and process.
    """
    return _listing_digest(str(paths.data_root(cfg)))


@functools.lru_cache(maxsize=8)
def _listing_digest(root: str) -> str:
    digest = hashlib.sha256(root.encode())
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            try:
                info = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            rel = os.path.relpath(os.path.join(folder, name), root)
            digest.update(f"{rel}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- keys and values
def _plain(value: Any) -> Any:
    """JSON-able form of a key part: mappings (``Config`` sections too), sequences, paths, scalars.
    NaN/inf stay as they are (unlike result records), so keys already written stay byte-identical."""
    return _jsonable(value, nonfinite_to_none=False,
                     error="result_cache key parts must be JSON-like (mappings, lists, numbers, strings, paths); "
                           "got {kind}: {value!r}")


def key_of(key_parts: Mapping[str, Any], code: Iterable[str] = (), root: Path | None = None) -> str:
    """SHA-256 (hex) of ``key_parts`` and of the code of ``code`` modules (with their imports)."""
    described = {"parts": _plain(key_parts), "code": code_digest(code, root) if code else ""}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _encode(value: Any, kind: str) -> bytes:
    buffer = io.BytesIO()
    if kind == "torch":
        import torch  # heavy: this layer-1 module is loaded by `ctrlgen --help`, which must not load torch

        torch.save(value, buffer)
    elif kind == "numpy":
        import numpy as np  # only the numpy kind needs it (light CLI start, as torch above)

        arrays = value if isinstance(value, Mapping) else {"__array__": value}
        np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
    else:
        buffer.write(json.dumps(value, allow_nan=False).encode())
    return buffer.getvalue()


def _decode(path: Path, kind: str) -> Any:
    if kind == "torch":
        import torch  # heavy: this layer-1 module is loaded by `ctrlgen --help`, which must not load torch

        return torch.load(path, map_location="cpu", weights_only=True)  # tensors and containers only: no pickled code
    if kind == "numpy":
        import numpy as np  # only the numpy kind needs it (light CLI start, as torch above)

        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
        return arrays["__array__"] if list(arrays) == ["__array__"] else arrays
    return json.loads(path.read_text(encoding="utf-8"))


def cache_dir(cfg: Mapping[str, Any] | None = None) -> Path:
    """``<cache root>/results``: where :func:`cached` keeps its values."""
    return paths.cache_root(cfg) / "results"


def entry_path(key: str, kind: str, cfg: Mapping[str, Any] | None = None) -> Path:
    """Where the value of ``key`` lives: ``<cache root>/results/<kind>/<key>.<ext>``."""
    if kind not in KINDS:
        raise ValueError(f"result_cache kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return cache_dir(cfg) / kind / f"{key}{KINDS[kind]}"


def cached(key_parts: Mapping[str, Any], compute: Callable[[], T], kind: str = "torch", *,
           cfg: Mapping[str, Any] | None = None, code: Iterable[str] = (), root: Path | None = None) -> T:
    """Return the stored value for ``key_parts`` (+ ``code``), or ``compute()`` it, store it and return it.

    The value is written atomically (temporary file + rename), so an interrupted run leaves either no
    entry or a complete one; two processes computing the same key both write the same content.
    ``$CTRLGEN_NO_RESULT_CACHE=1`` recomputes every value (and refreshes the stored copy).
    A stored value is returned as loaded from disk even on a miss, so hits and misses look the same
    to the caller (tensors on the CPU, numpy arrays, JSON types).
    """
    code = list(code)
    key = key_of(key_parts, code, root)
    path = entry_path(key, kind, cfg)
    if path.is_file() and os.environ.get(DISABLE_ENV, "") != "1":
        return _decode(path, kind)
    value = compute()
    atomic_write_bytes(path, _encode(value, kind))
    try:
        stored = _decode(path, kind)
    except Exception as err:  # e.g. a whole nn.Module under "torch": refuse it now, not on the next hit
        path.unlink(missing_ok=True)
        raise TypeError(f"result_cache kind {kind!r} cannot store a {type(value).__name__} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0]}); store tensors, arrays or JSON values (a module's state_dict)") from None
    atomic_write_json(path.with_suffix(".key.json"), {"key": key, "kind": kind, "parts": _plain(key_parts), "code": code})
    return stored
