"""The book pipeline: jupytext source → papermill execution → Jupyter Book HTML (DESIGN.md §4).

``run_chapter`` converts ``chapters/<name>.py`` to a notebook in memory and executes it with
papermill into ``<output>/executed/<profile>/<name>.ipynb`` — the source is never written back.
``build_book`` executes every chapter of ``_toc.yml`` in order, assembles a staging folder with
the front/back matter and the executed notebooks, runs ``jupyter-book build`` (execution off,
warnings as errors) into a new folder, and only then swaps it in place of the previous site.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ctrlgen import paths
from ctrlgen.config import load_profile

KERNEL_NAME = "ctrlgen"
KERNEL_DISPLAY = "Python (ctrlgen)"


class ChapterFailed(RuntimeError):
    """A chapter raised; ``notebook`` holds the executed copy with the traceback."""

    def __init__(self, chapter: str, notebook: Path, reason: str):
        super().__init__(f"chapter {chapter!r} failed: {reason}\n  the executed notebook with the traceback: {notebook}")
        self.chapter = chapter
        self.notebook = notebook


class UnknownChapter(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


# ---------------------------------------------------------------- table of contents
def toc_files(root: Path | None = None) -> list[str]:
    """Every ``file:`` entry of ``_toc.yml`` in reading order (root first)."""
    root = root or paths.project_root()
    toc = yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            if "file" in node:
                files.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk({k: v for k, v in toc.items() if k != "root"})
    return files


def toc_chapters(root: Path | None = None) -> list[str]:
    """Names of the executable chapters (``chapters/<name>``) in ``_toc.yml`` order."""
    return [f.split("/", 1)[1] for f in toc_files(root) if f.startswith("chapters/")]


def resolve_chapter(name: str, root: Path | None = None) -> str:
    """Accept a full chapter name (``ch02_background``) or a unique prefix (``ch02``)."""
    chapters = toc_chapters(root)
    stem = Path(name).stem
    if stem in chapters:
        return stem
    matches = [c for c in chapters if c.startswith(stem)]
    if len(matches) == 1:
        return matches[0]
    detail = f"{stem!r} matches {', '.join(matches)}" if matches else f"no chapter {stem!r}"
    raise UnknownChapter(f"{detail}; chapters in _toc.yml: {', '.join(chapters)}")


# ---------------------------------------------------------------- kernel
def ensure_kernel() -> str:
    """Make sure a kernel spec named ``ctrlgen`` runs *this* interpreter; register it if not.

    papermill looks kernels up by name; registering one inside the environment (``--sys-prefix``)
    with this interpreter's absolute path avoids NoSuchKernel and the wrong-``python`` trap.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
        if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve():
            return KERNEL_NAME
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY, prefix=sys.prefix)
    return KERNEL_NAME


# ---------------------------------------------------------------- execution
def _tree_digest(folder: Path, patterns: tuple[str, ...] = ("*.py", "*.yaml", "*.json")) -> str:
    digest = hashlib.sha256()
    for pattern in patterns:
        for file in sorted(folder.rglob(pattern)):
            if "__pycache__" in file.parts:
                continue
            digest.update(str(file.relative_to(folder)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def cache_key(chapter: str, profile: str, overrides: Mapping[str, Any], root: Path) -> str:
    """What an executed chapter depends on: its source, the library (code + profiles), the overrides."""
    digest = hashlib.sha256()
    digest.update((root / "chapters" / f"{chapter}.py").read_bytes())
    digest.update(_tree_digest(root / "lib" / "ctrlgen").encode())
    digest.update(json.dumps({"profile": profile, "overrides": dict(overrides)}, sort_keys=True).encode())
    return digest.hexdigest()


def _is_up_to_date(executed: Path, key: str, record: Path) -> bool:
    if not executed.is_file() or not record.is_file():
        return False
    try:
        meta = json.loads(executed.read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("ctrlgen", {}).get("cache_key") == key


@contextlib.contextmanager
def _kernel_environment():
    """Environment the chapter kernel inherits: offline hub, no progress bars in the rendered book."""
    settings = {"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class ChapterResult:
    chapter: str
    notebook: Path
    seconds: float
    cached: bool


def run_chapter(chapter: str, profile: str = "mini", overrides: Mapping[str, Any] | None = None,
                force: bool = True, log_output: bool = False) -> ChapterResult:
    """Execute one chapter with papermill on ``profile``; raise ChapterFailed on an error.

    Overrides are validated against the profile before a kernel starts. The executed copy is written
    beside the previous one and swapped in only on success; a failure leaves ``<name>.FAILED.ipynb``.
    """
    import jupytext
    import papermill
    from papermill.exceptions import PapermillExecutionError

    root = paths.project_root()
    chapter = resolve_chapter(chapter, root)
    cfg = load_profile(profile, overrides)  # raises ConfigError early
    paths.check_data_root(cfg)
    checked = dict(cfg.overrides)
    out_dir = paths.executed_dir(profile, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{chapter}.ipynb"
    key = cache_key(chapter, profile, checked, root)
    record = paths.results_dir(profile, cfg) / f"{chapter}.json"
    if not force and _is_up_to_date(target, key, record):
        return ChapterResult(chapter, target, 0.0, cached=True)

    notebook = jupytext.read(root / "chapters" / f"{chapter}.py")
    notebook.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": KERNEL_DISPLAY, "language": "python"}
    notebook.metadata.pop("jupytext", None)
    notebook.metadata["ctrlgen"] = {"chapter": chapter, "profile": profile, "overrides": checked, "cache_key": key}
    for cell in notebook.cells:  # the book shows papermill's injected values, not the defaults they replace
        tags = cell.metadata.setdefault("tags", [])
        if "parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
    running = out_dir / f"{chapter}.running.ipynb"
    failed = out_dir / f"{chapter}.FAILED.ipynb"
    start = time.perf_counter()
    try:
        with _kernel_environment():
            papermill.execute_notebook(
                notebook, str(running), parameters={"profile": profile, "overrides": checked},
                kernel_name=ensure_kernel(), cwd=str(root / "chapters"), progress_bar=False, log_output=log_output,
            )
    except PapermillExecutionError as err:
        os.replace(running, failed)
        raise ChapterFailed(chapter, failed, f"{err.ename}: {err.evalue}") from None
    except Exception as err:  # kernel died, timeout, ...
        if running.exists():
            os.replace(running, failed)
        raise ChapterFailed(chapter, failed, f"{type(err).__name__}: {err}") from None
    os.replace(running, target)
    failed.unlink(missing_ok=True)
    return ChapterResult(chapter, target, time.perf_counter() - start, cached=False)


# ---------------------------------------------------------------- site
def _stage_mathjax(target: Path) -> None:
    """A local MathJax (from the jupyter-server-mathjax package) so the site renders maths offline.

    It goes to ``html_extra_path`` (copied verbatim to the site root), not ``_static``: Jupyter Book adds a
    script tag for every .js file under ``_static``, which would load each MathJax component directly.
    """
    import jupyter_server_mathjax

    source = Path(jupyter_server_mathjax.__file__).parent / "static"
    shutil.copytree(source, target)


def _stage_sources(profile: str, root: Path, stage: Path) -> None:
    """Copy config, toc, book pages and the executed chapters into a fresh staging folder."""
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root / name, stage / name)
    shutil.copytree(root / "book", stage / "book")
    _stage_mathjax(stage / "_extra" / "mathjax")
    (stage / "chapters").mkdir()
    executed = paths.executed_dir(profile)
    for chapter in toc_chapters(root):
        source = executed / f"{chapter}.ipynb"
        if not source.is_file():
            raise FileNotFoundError(f"chapter {chapter!r} has not been executed on profile {profile!r}: expected {source}")
        shutil.copy2(source, stage / "chapters" / source.name)


def _swap_into_place(new: Path, final: Path) -> None:
    """Replace ``final`` by ``new`` so that a complete site is always there (old kept until the swap)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    if old.exists():
        shutil.rmtree(old)


def build_site(profile: str, strict: bool = True) -> Path:
    """Run ``jupyter-book build`` on the executed chapters of ``profile``; return the HTML folder."""
    root = paths.project_root()
    out = paths.output_root()
    stage = out / "site-src" / profile
    _stage_sources(profile, root, stage)
    work = out / "jb" / f"{profile}.new"
    if work.exists():
        shutil.rmtree(work)
    # jupyter_book.cli.main has no __main__ guard: call its click entry point explicitly.
    entry = "import sys; from jupyter_book.cli.main import main; sys.exit(main())"
    command = [sys.executable, "-c", entry, "build", str(stage), "--path-output", str(work), "--builder", "html"]
    if strict:
        command += ["-W", "-n", "--keep-going"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        log = out / "jb" / f"{profile}.build.log"
        log.write_text(proc.stdout + "\n" + proc.stderr, encoding="utf-8")
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"jupyter-book build failed (full log: {log}); the previous site is untouched:\n{tail}")
    final = paths.html_dir(profile)
    final.parent.mkdir(parents=True, exist_ok=True)
    _swap_into_place(work / "_build" / "html", final)
    shutil.rmtree(work, ignore_errors=True)
    return final
