"""The test-wide guard: loopback works, anything else fails loudly (and offline mode is on)."""
from __future__ import annotations

import os
import socket
import threading

import pytest

from conftest import NetworkAccessError


def test_offline_mode_is_set_for_the_whole_run():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_non_loopback_connection_is_refused_before_any_packet():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(NetworkAccessError, match="192.0.2.1"):  # TEST-NET-1, never routed
            sock.connect(("192.0.2.1", 80))


def test_host_names_are_not_resolved():
    with pytest.raises(NetworkAccessError, match="huggingface.co"):
        socket.getaddrinfo("huggingface.co", 443)


def test_loopback_is_allowed():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()))
    thread.start()
    with socket.create_connection(server.getsockname(), timeout=5):
        pass
    thread.join(5)
    server.close()
    assert accepted
