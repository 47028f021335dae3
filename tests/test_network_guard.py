import socket

import pytest

from conftest import NetworkAccessInTest


def test_outbound_connection_is_refused():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(NetworkAccessInTest):
            s.connect(("93.184.216.34", 80))
    finally:
        s.close()


def test_dns_lookup_is_refused():
    with pytest.raises(NetworkAccessInTest):
        socket.getaddrinfo("huggingface.co", 443)
