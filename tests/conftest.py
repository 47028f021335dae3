"""Test-wide guards: no test may reach the network, and no library may try a model hub."""
from __future__ import annotations

import ipaddress
import os
import socket

import pytest

# Set before anything imports transformers / huggingface_hub so they never try to download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class NetworkAccessInTest(RuntimeError):
    pass


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)) and not isinstance(address, tuple):
        return True  # AF_UNIX path
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _guarded_connect(self, address):
    if self.family != getattr(socket, "AF_UNIX", None) and not _is_local(address):
        raise NetworkAccessInTest(f"test tried to connect to {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family != getattr(socket, "AF_UNIX", None) and not _is_local(address):
        raise NetworkAccessInTest(f"test tried to connect to {address!r}")
    return _real_connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host not in (None, "localhost", "127.0.0.1", "::1", "0.0.0.0") and not str(host).startswith("127."):
        raise NetworkAccessInTest(f"test tried to resolve {host!r}")
    return _real_getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: longer integration test (still runs in CI)")
    config.addinivalue_line("markers", "lavis: needs salesforce-lavis importable")


@pytest.fixture(autouse=True)
def _seeded():
    try:
        import torch
    except ImportError:  # pragma: no cover - pure-python tests
        yield
        return
    torch.manual_seed(0)
    yield


@pytest.fixture()
def one_thread():
    """Torch on one intra-op thread for the test: on tiny tensors more threads only add synchronisation
    (ruinous on a busy 2-core box). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
