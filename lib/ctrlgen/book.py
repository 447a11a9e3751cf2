"""The book pipeline: jupytext source → papermill execution → Jupyter Book HTML (DESIGN.md §4).

``run_chapter`` converts ``chapters/<name>.py`` to a notebook in memory and executes it with
papermill into ``<output>/executed/<profile>/<name>.ipynb`` — the source is never written back.
The executed copy's metadata keeps what the run depended on (``chapter_stamp``: the chapter's source,
the library files it imports transitively, the profile values it read, the data fingerprint), so a
later run re-executes a chapter only when one of *its* inputs changed. While a chapter runs, a status
line shows the current cell, the kernel's progress bars and an estimate (``ctrlgen.progress``).
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
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import jupytext
import papermill
import yaml
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from papermill.engines import NBClientEngine, papermill_engines
from papermill.exceptions import PapermillExecutionError

from ctrlgen import paths, result_cache
from ctrlgen.config import READS_ENV, Config, flatten, load_profile
from ctrlgen.progress import PROGRESS_ENV, ProgressMonitor
from ctrlgen.result_cache import data_fingerprint

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
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
        if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve():
            return KERNEL_NAME
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install  # only on the first run in an environment (registers the kernel)

    install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY, prefix=sys.prefix)
    return KERNEL_NAME


# ---------------------------------------------------------------- what a chapter depends on
def code_inputs(chapter: str, root: Path) -> dict[str, Any]:
    """The chapter's source hash and the hashes of the library files it imports, transitively."""
    source = root / "chapters" / f"{chapter}.py"
    files = result_cache.code_files(sources=[source], root=root)
    return {"source": hashlib.sha256(source.read_bytes()).hexdigest(),
            "code": result_cache.file_digests(files, root)}


def chapter_stamp(chapter: str, cfg: Config, reads: set[str], code: Mapping[str, Any], data: str) -> dict[str, Any]:
    """What an executed chapter depended on: its code (``code_inputs``), the values of the profile keys
    it read during the run, and the data fingerprint. Stored in the executed notebook's metadata."""
    flat = flatten(cfg.to_dict())
    return {"profile": cfg.profile_name, **code, "config": {k: flat[k] for k in sorted(reads) if k in flat}, "data": data}


def stale_reasons(stamp: Mapping[str, Any] | None, chapter: str, cfg: Config, root: Path,
                  now: tuple[Mapping[str, Any], str] | None = None) -> list[str]:
    """Why an executed chapter with ``stamp`` is out of date for ``cfg`` now (empty: up to date).

    Only the chapter's own inputs count: a library file it does not import or a profile value it did
    not read can change without re-executing it. ``now``: this run's ``(code_inputs, data_fingerprint)``
    when the caller has them already (each hashes files).
    """
    if not stamp:
        return ["no record of its inputs"]
    reasons = []
    if stamp.get("profile") != cfg.profile_name:
        reasons.append(f"profile {stamp.get('profile')!r} -> {cfg.profile_name!r}")
    now, data = now or (code_inputs(chapter, root), data_fingerprint(cfg))
    if stamp.get("source") != now["source"]:
        reasons.append(f"chapters/{chapter}.py changed")
    before = stamp.get("code", {})
    changed = sorted(f for f in set(before) | set(now["code"]) if before.get(f) != now["code"].get(f))
    if changed:
        reasons.append(f"{', '.join(changed[:3])}{' and more' if len(changed) > 3 else ''} changed")
    flat = flatten(cfg.to_dict())
    values = [f"{k}={v!r} -> {flat.get(k, '(no such key)')!r}" for k, v in stamp.get("config", {}).items()
              if k not in flat or flat[k] != v]
    if values:
        reasons.append("profile values it read changed: " + ", ".join(values[:3]) + (" ..." if len(values) > 3 else ""))
    if stamp.get("data") != data:
        reasons.append("the data root's contents changed")
    return reasons


def _read_stamp(executed: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(executed.read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, json.JSONDecodeError):
        return None
    return meta.get("ctrlgen", {}).get("inputs")


def _write_stamp(notebook: Path, stamp: Mapping[str, Any]) -> None:
    data = json.loads(notebook.read_text(encoding="utf-8"))
    data.setdefault("metadata", {}).setdefault("ctrlgen", {})["inputs"] = dict(stamp)
    notebook.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_reads(path: Path) -> set[str]:
    try:
        return set(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError):
        return set()  # the chapter read no profile value


def _last_wall_time(record: Path) -> float | None:
    try:
        return float(json.loads(record.read_text(encoding="utf-8"))["wall_time_s"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------- execution
@contextlib.contextmanager
def _kernel_environment(extra: Mapping[str, str] | None = None):
    """Environment the chapter kernel inherits: offline hub, no progress bars in the rendered book,
    and the files where it reports the profile keys it reads and its progress bars' state."""
    settings = {"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                "MPLBACKEND": "module://matplotlib_inline.backend_inline", **(extra or {})}
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


def _cell_sections(nb: Any) -> dict[int, tuple[int, str]]:
    """``{cell index: (1-based code-cell number, the heading of the section it is in)}``."""
    sections, heading, number = {}, "", 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            titles = [line.lstrip("#").strip() for line in cell.source.splitlines() if line.startswith("#")]
            heading = titles[-1] if titles else heading
        elif cell.cell_type == "code":
            number += 1
            sections[index] = (number, heading)
    return sections


class _ReportingEngine(NBClientEngine):
    """papermill's nbclient engine, telling ``monitor`` when each code cell starts (papermill's
    registered-engine extension point; the notebook is executed exactly as by the default engine)."""

    monitor: ProgressMonitor | None = None

    @classmethod
    def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, **kwargs: Any) -> Any:
        monitor = cls.monitor
        if monitor is not None:
            sections = _cell_sections(nb_man.nb)
            total = len(sections)
            original = nb_man.cell_start

            def cell_start(cell: Any, cell_index: int | None = None, **kw: Any) -> Any:
                if cell_index in sections:
                    number, heading = sections[cell_index]
                    monitor.set_cell(number, total, heading)
                return original(cell, cell_index, **kw)

            nb_man.cell_start = cell_start
        return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)


papermill_engines.register("ctrlgen", _ReportingEngine)


@dataclass
class ChapterResult:
    """One chapter's outcome: where the executed notebook is, how long it took, why it ran."""

    chapter: str
    notebook: Path
    seconds: float
    cached: bool
    reasons: list[str] = field(default_factory=list)


def _prepare_notebook(chapter: str, profile: str, checked: Mapping[str, Any], root: Path) -> Any:
    notebook = jupytext.read(root / "chapters" / f"{chapter}.py")
    notebook.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": KERNEL_DISPLAY, "language": "python"}
    notebook.metadata.pop("jupytext", None)
    notebook.metadata["ctrlgen"] = {"chapter": chapter, "profile": profile, "overrides": dict(checked)}
    for cell in notebook.cells:  # the book shows papermill's injected values, not the defaults they replace
        tags = cell.metadata.setdefault("tags", [])
        if "parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
    return notebook


def run_chapter(chapter: str, profile: str = "mini", overrides: Mapping[str, Any] | None = None,
                force: bool = True, log_output: bool = False, progress: str | None = None,
                stream: TextIO | None = None) -> ChapterResult:
    """Execute one chapter with papermill on ``profile``; raise ChapterFailed on an error.

    Overrides are validated (keys, types, ranges) before a kernel starts. Unless ``force``, a chapter
    whose executed copy's inputs (``stale_reasons``) are unchanged is not run again. The executed copy
    is written beside the previous one and swapped in only on success; a failure leaves
    ``<name>.FAILED.ipynb``. ``progress`` is a label (``"[1/3]"``): when given, a status line with the
    current cell, the kernel's bars and the elapsed time is shown on ``stream`` (stderr) while it runs.
    """
    root = paths.project_root()
    chapter = resolve_chapter(chapter, root)
    cfg = load_profile(profile, overrides)  # raises ConfigError early
    paths.check_data_root(cfg)
    checked = dict(cfg.overrides)
    out_dir = paths.executed_dir(profile, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{chapter}.ipynb"
    record = paths.results_dir(profile, cfg) / f"{chapter}.json"
    code, data = code_inputs(chapter, root), data_fingerprint(cfg)  # what runs, taken before it runs
    reasons = ["--force"] if force else (
        stale_reasons(_read_stamp(target), chapter, cfg, root, now=(code, data))
        if target.is_file() and record.is_file() else ["never executed on this profile"])
    if not reasons:
        return ChapterResult(chapter, target, 0.0, cached=True)

    notebook = _prepare_notebook(chapter, profile, checked, root)
    running = out_dir / f"{chapter}.running.ipynb"
    failed = out_dir / f"{chapter}.FAILED.ipynb"
    expected = _last_wall_time(record)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"ctrlgen-{chapter}-") as scratch:
        reads_file, bars_file = Path(scratch) / "reads.json", Path(scratch) / "progress.json"
        monitor = (ProgressMonitor(f"{progress} {chapter}".strip(), bars_file, stream, expected)
                   if progress is not None else None)
        _ReportingEngine.monitor = monitor
        try:
            with _kernel_environment({READS_ENV: str(reads_file), PROGRESS_ENV: str(bars_file)}), \
                    (monitor or contextlib.nullcontext()):
                papermill.execute_notebook(
                    notebook, str(running), parameters={"profile": profile, "overrides": checked},
                    kernel_name=ensure_kernel(), cwd=str(root / "chapters"), progress_bar=False,
                    log_output=log_output, engine_name="ctrlgen",
                )
        except PapermillExecutionError as err:
            os.replace(running, failed)
            raise ChapterFailed(chapter, failed, f"{err.ename}: {err.evalue}") from None
        except Exception as err:  # kernel died, timeout, ...
            if running.exists():
                os.replace(running, failed)
            raise ChapterFailed(chapter, failed, f"{type(err).__name__}: {err}") from None
        finally:
            _ReportingEngine.monitor = None
        _write_stamp(running, chapter_stamp(chapter, cfg, _read_reads(reads_file), code, data))
    os.replace(running, target)
    failed.unlink(missing_ok=True)
    return ChapterResult(chapter, target, time.perf_counter() - start, cached=False, reasons=reasons)


# ---------------------------------------------------------------- site
def _stage_mathjax(target: Path) -> None:
    """A local MathJax (from the jupyter-server-mathjax package) so the site renders maths offline.

    It goes to ``html_extra_path`` (copied verbatim to the site root), not ``_static``: Jupyter Book adds a
    script tag for every .js file under ``_static``, which would load each MathJax component directly.
    """
    import jupyter_server_mathjax  # only when the HTML site is built (its MathJax copy)

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
