"""The ctrlgen CLI: help everywhere, clear errors with conventional exit codes, failed builds lose nothing."""
from __future__ import annotations

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
