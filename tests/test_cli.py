"""The ctrlgen CLI: help everywhere, clear errors with conventional exit codes, failed builds lose nothing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ctrlgen.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def ctrlgen(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ctrlgen.cli.main", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or ROOT, timeout=600)


def _subcommands() -> list[tuple[str, ...]]:
    parser = build_parser(load_all=True)
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    found = [()]
    for name, child in sub.choices.items():
        found.append((name,))
        for action in child._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                found += [(name, grand) for grand in action.choices]
    return found


@pytest.mark.parametrize("words", _subcommands(), ids=lambda w: " ".join(w) or "ctrlgen")
def test_help_everywhere(words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*words, "--help"])
    assert exit_info.value.code == 0
    assert "usage: ctrlgen" in capsys.readouterr().out


def test_help_does_not_import_torch():
    """Plugin groups load lazily: listing commands must not pay for torch/diffusers."""
    probe = "import sys; from ctrlgen.cli.main import build_parser; build_parser([]); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert out == "False"


def test_core_commands_exist():
    names = {w[0] for w in _subcommands() if w}
    assert {"run", "book", "chapters", "profile"} <= names


def test_unknown_chapter_lists_the_chapters(capsys):
    assert main(["run", "ch99_nothing", "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert "no chapter 'ch99_nothing'" in err and "ch02_background" in err


def test_unknown_profile_and_key_are_usage_errors(capsys):
    assert main(["run", "ch02", "--profile", "huge"]) == 2
    assert "unknown profile 'huge'" in capsys.readouterr().err
    assert main(["run", "ch02", "--profile", "smoke", "-p", "ch02.toy.steps=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'ch02.toy.steps'" in err and "ch02.toy.train_steps" in err
    assert main(["book", "--profile", "smoke", "-p", "seed=x"]) == 2
    assert "seed: expected int" in capsys.readouterr().err


def test_profile_command_prints_the_merged_profile(capsys):
    assert main(["profile", "--profile", "smoke", "-p", "ch02.toy.train_steps=9"]) == 0
    assert "train_steps: 9" in capsys.readouterr().out


def test_missing_argument_is_exit_2():
    result = ctrlgen("run")
    assert result.returncode == 2 and "the following arguments are required: chapter" in result.stderr


# --------------------------------------------------------------------------- a throwaway project
GOOD = textwrap.dedent('''\
    # %% [markdown]
    # # A good chapter

    # %% tags=["parameters"]
    profile = "mini"
    overrides = {}

    # %%
    from ctrlgen import load_profile
    cfg = load_profile(profile, overrides)
    print("ran on", cfg.profile_name, dict(cfg.overrides))

    # %%
    from ctrlgen.results import ChapterRun
    ChapterRun("good", cfg).save()
    ''')
BAD = GOOD.replace("A good chapter", "A bad chapter") + '\n# %%\nraise RuntimeError("deliberate failure 42")\n'


def _write_project(root: Path, chapters: list[str]) -> None:
    (root / "chapters").mkdir(parents=True, exist_ok=True)
    (root / "book").mkdir(exist_ok=True)
    (root / "lib" / "ctrlgen").mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "_config.yml", root / "_config.yml")
    shutil.copy2(ROOT / "book" / "references.bib", root / "book" / "references.bib")
    (root / "book" / "intro.md").write_text("# Intro\n\nA test book.\n")
    (root / "chapters" / "good.py").write_text(GOOD)
    (root / "chapters" / "bad.py").write_text(BAD)
    entries = "\n".join(f"      - file: chapters/{c}" for c in chapters)
    (root / "_toc.yml").write_text(f"format: jb-book\nroot: book/intro\nparts:\n  - caption: Chapters\n    chapters:\n{entries}\n")


def test_failed_chapter_names_itself_and_keeps_the_previous_site(tmp_path):
    project, out = tmp_path / "project", tmp_path / "out"
    _write_project(project, ["good"])
    env = {"CTRLGEN_PROJECT_ROOT": str(project), "CTRLGEN_OUTPUT_ROOT": str(out)}
    first = ctrlgen("book", "--profile", "smoke", "-p", "seed=4", env=env)
    assert first.returncode == 0, first.stderr
    index = out / "html" / "smoke" / "index.html"
    assert index.is_file()
    executed = (out / "executed" / "smoke" / "good.ipynb").read_text()
    assert "ran on smoke {'seed': 4}" in executed
    assert sorted(p.name for p in (project / "chapters").iterdir()) == ["bad.py", "good.py"]  # nothing written back
    before = index.read_bytes()

    _write_project(project, ["good", "bad"])
    second = ctrlgen("book", "--profile", "smoke", env=env)
    assert second.returncode == 1
    failed = out / "executed" / "smoke" / "bad.FAILED.ipynb"
    assert "chapter 'bad' failed" in second.stderr and str(failed) in second.stderr
    assert "deliberate failure 42" in failed.read_text()
    assert index.read_bytes() == before  # the previous site is untouched

    # the second book run executed "good" without overrides before "bad" failed: that copy is current
    cached = ctrlgen("run", "good", "--profile", "smoke", "--cached", env=env)
    assert cached.returncode == 0 and "up to date (cached)" in cached.stdout
    other = ctrlgen("run", "good", "--profile", "smoke", "-p", "seed=4", "--cached", env=env)  # other overrides
    assert other.returncode == 0 and "executed in" in other.stdout


def test_broken_sphinx_build_keeps_the_previous_site(tmp_path):
    project, out = tmp_path / "project", tmp_path / "out"
    _write_project(project, ["good"])
    env = {"CTRLGEN_PROJECT_ROOT": str(project), "CTRLGEN_OUTPUT_ROOT": str(out)}
    assert ctrlgen("book", "--profile", "smoke", env=env).returncode == 0
    index = out / "html" / "smoke" / "index.html"
    before = index.read_bytes()
    (project / "book" / "intro.md").write_text("# Intro\n\nA broken reference {doc}`does-not-exist`.\n")
    result = ctrlgen("book", "--profile", "smoke", env=env)
    assert result.returncode == 1 and "jupyter-book build failed" in result.stderr
    assert index.read_bytes() == before


def test_missing_data_root_is_one_clear_error(tmp_path):
    missing = tmp_path / "no-such-datasets"
    result = ctrlgen("run", "ch02", "--profile", "smoke", env={"CTRLGEN_DATA_ROOT": str(missing)})
    assert result.returncode == 2
    assert f"the data root {missing} (from $CTRLGEN_DATA_ROOT) does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    result = ctrlgen("book", "--profile", "smoke", "-p", f"paths.data_root={missing}", env={"CTRLGEN_DATA_ROOT": ""})
    assert result.returncode == 2 and "from the profile's paths.data_root" in result.stderr


# --------------------------------------------------------------------------- values out of range
@pytest.mark.parametrize("command", ["run ch02", "book"])
@pytest.mark.parametrize("assignment, message", [
    ("ch02.toy.train_steps=-5", "ch02.toy.train_steps = -5 (-p override) is not allowed: expected a number >= 1"),
    ("device=tpu", "device = 'tpu' (-p override) is not allowed: expected 'cpu', 'cuda', 'cuda:N'"),
    ("sampling.scheduler=euler", "expected one of 'ddim', 'pndm', 'ddpm'"),
    ("attention.cross_res=[16]", "attention sides this model has at 32 px: [8, 4]"),
])
def test_out_of_range_values_are_usage_errors_before_anything_runs(capsys, command, assignment, message):
    assert main([*command.split(), "--profile", "smoke", "-p", assignment]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


# --------------------------------------------------------------------------- incremental execution, progress
def _copy_library(project: Path) -> None:
    shutil.copytree(ROOT / "lib" / "ctrlgen", project / "lib" / "ctrlgen", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))


def test_chapter_reexecutes_only_when_its_own_inputs_change(tmp_path):
    """GOOD imports ctrlgen (config) and ctrlgen.results (paths) and reads only `seed` (through ChapterRun)."""
    project, out = tmp_path / "project", tmp_path / "out"
    _write_project(project, ["good"])
    _copy_library(project)
    env = {"CTRLGEN_PROJECT_ROOT": str(project), "CTRLGEN_OUTPUT_ROOT": str(out)}
    first = ctrlgen("run", "good", "--profile", "smoke", "--cached", env=env)
    assert first.returncode == 0 and "executed in" in first.stdout and "never executed" in first.stdout, first.stderr
    stamp = json.loads((out / "executed" / "smoke" / "good.ipynb").read_text())["metadata"]["ctrlgen"]["inputs"]
    assert stamp["config"] == {"seed": 0}
    assert {"lib/ctrlgen/results.py", "lib/ctrlgen/config.py"} <= set(stamp["code"])
    assert "lib/ctrlgen/experiments/ch02_background.py" not in stamp["code"]

    (project / "lib" / "ctrlgen" / "experiments" / "ch02_background.py").write_text("# a module GOOD does not import\n")
    unrelated = ctrlgen("run", "good", "--profile", "smoke", "--cached", "-p", "ch02.toy.train_steps=9", env=env)
    assert unrelated.returncode == 0 and "up to date (cached)" in unrelated.stdout, unrelated.stdout + unrelated.stderr

    with (project / "lib" / "ctrlgen" / "results.py").open("a") as handle:
        handle.write("\n# an edit of a module GOOD imports\n")
    imported = ctrlgen("run", "good", "--profile", "smoke", "--cached", "-q", env=env)
    assert imported.returncode == 0 and imported.stdout == ""
    rerun = ctrlgen("run", "good", "--profile", "smoke", "--cached", env=env)
    assert "up to date (cached)" in rerun.stdout  # the quiet run above did re-execute it

    value = ctrlgen("run", "good", "--profile", "smoke", "--cached", "-p", "seed=5", env=env)
    assert "executed in" in value.stdout and "profile values it read changed: seed=0 -> 5" in value.stdout


PROGRESS = textwrap.dedent('''\
    # %% [markdown]
    # # A chapter with a loop

    # %% tags=["parameters"]
    profile = "mini"
    overrides = {}

    # %% [markdown]
    # ## Training the fake model

    # %%
    import time
    from ctrlgen import load_profile
    from ctrlgen.progress import tqdm
    from ctrlgen.results import ChapterRun
    cfg = load_profile(profile, overrides)
    for step in tqdm(range(6), desc="fake training"):
        time.sleep(0.4)

    # %%
    ChapterRun("looping", cfg).save()
    ''')


def test_progress_shows_cells_and_kernel_bars_and_quiet_shows_nothing(tmp_path):
    project, out = tmp_path / "project", tmp_path / "out"
    _write_project(project, [])
    (project / "chapters" / "looping.py").write_text(PROGRESS)
    (project / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nparts:\n  - caption: Chapters\n"
                                      "    chapters:\n      - file: chapters/looping\n")
    env = {"CTRLGEN_PROJECT_ROOT": str(project), "CTRLGEN_OUTPUT_ROOT": str(out), "CTRLGEN_PROGRESS_INTERVAL": "0"}
    shown = ctrlgen("run", "looping", "--profile", "smoke", env=env)
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stderr.splitlines() if line.startswith("[1/1] looping")]
    # code cells: the parameters cell, papermill's injected one, the loop, the record
    assert any("cell 3/4 (Training the fake model) · fake training " in line and "/6 [" in line for line in lines), lines
    assert all("elapsed" in line for line in lines)
    assert "last run" not in shown.stderr  # no record yet, so no estimate
    assert "executed in" in shown.stdout and "fake training" not in shown.stdout
    cells = json.loads((out / "executed" / "smoke" / "looping.ipynb").read_text())["cells"]
    assert "fake training" not in json.dumps([c.get("outputs", []) for c in cells])  # the rendered book shows no bar

    again = ctrlgen("run", "looping", "--profile", "smoke", env=env)
    assert "left (last run " in again.stderr or "past the last run's" in again.stderr  # the record's wall time

    quiet = ctrlgen("run", "looping", "--profile", "smoke", "-q", env=env)
    assert quiet.returncode == 0 and quiet.stdout == ""
    assert "[1/1]" not in quiet.stderr and "fake training" not in quiet.stderr
