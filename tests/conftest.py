"""Test-wide set-up: offline, no network beyond loopback, isolated output and cache roots.

- ``HF_HUB_OFFLINE=1`` for the whole run (chapter kernels inherit it).
- Any socket connection to a non-loopback address fails the test that opened it.
- ``CTRLGEN_DATA_ROOT`` points at ``../shared/data`` (real samples in official layouts) when that
  folder exists beside the checkout, unless the caller already set it.
- Cache and output roots go to a temporary folder for the session, so tests never touch a user's
  ``_build/`` or ``_cache/``; the folder is removed when the run ends (``CTRLGEN_KEEP_TEST_TMP=1`` keeps it).
"""
from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARED_THESIS = ROOT.parent / "shared" / "thesis" / "thesis.txt"

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
if SHARED_DATA.is_dir():
    os.environ.setdefault("CTRLGEN_DATA_ROOT", str(SHARED_DATA))
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="ctrlgen-tests-"))
# Each run's models and builds take ~200 MB: left behind, a few hundred runs filled a CI disk.
# CTRLGEN_KEEP_TEST_TMP=1 keeps the folder for a post-mortem.
if not os.environ.get("CTRLGEN_KEEP_TEST_TMP"):
    atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)
os.environ.setdefault("CTRLGEN_CACHE_ROOT", str(_SESSION_TMP / "cache"))
os.environ.setdefault("CTRLGEN_OUTPUT_ROOT", str(_SESSION_TMP / "build"))


class NetworkAccessError(RuntimeError):
    """Raised when a test tries to reach a non-loopback address."""


def _is_loopback(address) -> bool:
    if isinstance(address, tuple):
        host = address[0]
    elif isinstance(address, (str, bytes)):
        return True  # AF_UNIX socket path
    else:
        return False
    if isinstance(host, bytes):
        host = host.decode()
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name: resolving it would already leave the machine


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise NetworkAccessError(f"test tried to open a network connection to {address!r} (only loopback is allowed)")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise NetworkAccessError(f"test tried to open a network connection to {address!r} (only loopback is allowed)")
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name not in (None, "", "localhost"):
        try:
            ipaddress.ip_address(str(name).split("%")[0])  # a literal address: connect() checks it
        except ValueError:
            raise NetworkAccessError(f"test tried to resolve the host name {name!r} (only loopback is allowed)") from None
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True, scope="session")
def _forbid_network():
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    socket.getaddrinfo = _guarded_getaddrinfo
    yield
    socket.socket.connect = _real_connect
    socket.socket.connect_ex = _real_connect_ex
    socket.getaddrinfo = _real_getaddrinfo


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def thesis_text() -> str:
    if not SHARED_THESIS.is_file():
        pytest.skip(f"thesis text not found at {SHARED_THESIS}")
    return SHARED_THESIS.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run several times faster on one torch thread when the machine's two cores are shared
    (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory):
    """A cache root of this test module's own (``CTRLGEN_CACHE_ROOT``), restored afterwards: models it trains are
    keyed by their settings and shared within the module only."""
    root = tmp_path_factory.mktemp("cache") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRLGEN_CACHE_ROOT", str(root))
        yield root
