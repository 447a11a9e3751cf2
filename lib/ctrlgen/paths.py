"""Where things live: project, data, cache and output roots; the permissions published files get.

Resolution order for each root: an environment variable, then the profile's ``paths.*`` value,
then a folder inside the project. The data root is *read-only* for the product: datasets a user
(or ``../shared/data`` in tests and CI) keeps there are never modified; generated data and resized
copies go under the cache root.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctrlgen.config import ConfigError

ENV_PROJECT = "CTRLGEN_PROJECT_ROOT"
ENV_DATA = "CTRLGEN_DATA_ROOT"
ENV_CACHE = "CTRLGEN_CACHE_ROOT"
ENV_OUTPUT = "CTRLGEN_OUTPUT_ROOT"


def _looks_like_project(folder: Path) -> bool:
    return (folder / "_toc.yml").is_file() and (folder / "lib" / "ctrlgen").is_dir()


def project_root() -> Path:
    """The checkout holding ``_toc.yml`` and ``lib/ctrlgen``.

    ``$CTRLGEN_PROJECT_ROOT`` wins; else the package's own checkout (editable install); else the first
    parent of the working directory that looks like one (a chapter opened from ``chapters/``).
    """
    env = os.environ.get(ENV_PROJECT)
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parents[2]
    if _looks_like_project(here):
        return here
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if _looks_like_project(folder):
            return folder
    raise FileNotFoundError(
        f"cannot find the ctrlgen project (a folder with _toc.yml and lib/ctrlgen) from {cwd}; "
        f"set {ENV_PROJECT} to the checkout"
    )


def _profile_path(cfg: Mapping[str, Any] | None, key: str) -> str:
    if cfg is None:
        return ""
    paths = cfg.get("paths", {}) if hasattr(cfg, "get") else {}
    return str(paths.get(key, "") or "")


def _resolve(env: str, cfg: Mapping[str, Any] | None, key: str, default: str) -> Path:
    value = os.environ.get(env) or _profile_path(cfg, key)
    if value:
        path = Path(value).expanduser()
        return (path if path.is_absolute() else project_root() / path).resolve()
    return project_root() / default


def data_root(cfg: Mapping[str, Any] | None = None) -> Path:
    """Root of the real datasets (each in its official layout): env, profile ``paths.data_root``, ``data/``."""
    return _resolve(ENV_DATA, cfg, "data_root", "data")


def check_data_root(cfg: Mapping[str, Any] | None = None) -> Path:
    """The data root, refusing one that was set explicitly (env or profile) but does not exist.

    The default ``<project>/data`` may be empty (chapters then use procedural data); a root the user
    named and mistyped must not silently turn a real-data run into a procedural one.
    """
    root = data_root(cfg)
    explicit = os.environ.get(ENV_DATA) or _profile_path(cfg, "data_root")
    if explicit and not root.is_dir():
        source = f"${ENV_DATA}" if os.environ.get(ENV_DATA) else "the profile's paths.data_root"
        raise ConfigError(f"the data root {root} (from {source}) does not exist; point it at the folder that holds "
                          f"the datasets in their official layouts, or unset it to use <project>/data")
    return root


def cache_root(cfg: Mapping[str, Any] | None = None) -> Path:
    """Trained models, resized datasets, generated worlds: env, profile ``paths.cache_root``, ``_cache/``."""
    return _resolve(ENV_CACHE, cfg, "cache_root", "_cache")


def output_root(cfg: Mapping[str, Any] | None = None) -> Path:
    """Executed notebooks, result records, the HTML book: env, profile ``paths.output_root``, ``_build/``."""
    return _resolve(ENV_OUTPUT, cfg, "output_root", "_build")


def results_dir(profile: str, cfg: Mapping[str, Any] | None = None) -> Path:
    """``<output>/results/<profile>/``: one JSON record per chapter plus its figures."""
    return output_root(cfg) / "results" / profile


def executed_dir(profile: str, cfg: Mapping[str, Any] | None = None) -> Path:
    """``<output>/executed/<profile>/``: papermill's executed copies of the chapters."""
    return output_root(cfg) / "executed" / profile


def html_dir(profile: str, cfg: Mapping[str, Any] | None = None) -> Path:
    """``<output>/html/<profile>/``: the rendered book for one profile."""
    return output_root(cfg) / "html" / profile


# ------------------------------------------------------------------ permissions of published files
def current_umask() -> int:
    """The process umask, read without changing it (Linux ``/proc``); else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(folder: bool = False) -> int:
    """Mode of a file (0o666) or folder (0o777) created the usual way under the process umask: 0o644 /
    0o755 under umask 022. ``tempfile`` creates 0o600 files and 0o700 folders, which would leave a cache
    or a built site shared between users unreadable to all but its writer."""
    return (0o777 if folder else 0o666) & ~current_umask()


def make_public(path: str | os.PathLike) -> Path:
    """Give a file, or a folder and everything in it, the usual permissions (``publish_mode``) before it is
    renamed into place. The whole tree, because libraries write 0600 files too (``safetensors.save_file``,
    hence diffusers' ``save_pretrained``), not only ``tempfile``. Symbolic links are left alone."""
    path = Path(path)
    file_mode, folder_mode = publish_mode(), publish_mode(folder=True)
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in dirs:
                if not os.path.islink(os.path.join(folder, name)):
                    os.chmod(os.path.join(folder, name), folder_mode)
            for name in files:
                if not os.path.islink(os.path.join(folder, name)):
                    os.chmod(os.path.join(folder, name), file_mode)
        os.chmod(path, folder_mode)
    else:
        os.chmod(path, file_mode)
    return path
