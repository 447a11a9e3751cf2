"""Installation from the project's own files: pins agree, the package and its kernel are in place."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        requirement, _, marker = line.partition(";")
        if "aarch64" in marker:
            continue  # the conda environment targets x86_64 GPU boxes
        name, _, version = requirement.partition("==")
        assert version, f"unpinned requirement: {line}"
        pins[name.strip().lower()] = version.strip()
    return pins


def test_requirements_and_environment_yml_agree():
    required = _pins((ROOT / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert _pins(pip_section) == required
    assert "python=3.11" in env["dependencies"]


def test_core_dependencies_are_pinned():
    required = _pins((ROOT / "requirements.txt").read_text().splitlines())
    for name in ("torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "papermill", "jupytext",
                 "ipykernel", "jupyter-book", "matplotlib", "seaborn", "pandas", "scipy", "scikit-image",
                 "scikit-learn", "torchmetrics", "tqdm", "pyyaml", "safetensors"):
        assert name in required, name
    assert required["torch"] == "2.14.1" and required["torchvision"] == "0.29.1"
    assert required["jupyter-book"].startswith("1.")


def test_installed_versions_match_the_pins():
    from importlib.metadata import version

    required = _pins((ROOT / "requirements.txt").read_text().splitlines())
    for name, pinned in required.items():
        assert version(name).split("+")[0] == pinned, f"{name}: installed {version(name)}, pinned {pinned}"


def test_constraints_pin_every_installed_package_consistently():
    constraints = _pins((ROOT / "constraints.txt").read_text().splitlines())
    required = _pins((ROOT / "requirements.txt").read_text().splitlines())
    for name, pinned in required.items():
        if name in constraints:
            assert constraints[name] == pinned, name


def test_pyproject_reads_the_pins_and_exposes_the_cli():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dependencies = { file = ["requirements.txt"] }' in text
    assert re.search(r'ctrlgen = "ctrlgen.cli.main:main"', text)


def test_project_kernel_is_registered_in_this_environment():
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec("ctrlgen")
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve()
