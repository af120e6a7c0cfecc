"""Test-only resolver for tests/test_attacks.py, loaded by the worker it starts (PYTHONPATH).

Names in ATTACK_DNS (JSON: name -> list of addresses) resolve to one address per lookup, the last
one repeating: a name can answer a public address first and loopback afterwards (DNS rebinding).
Connections to ATTACK_UNREACHABLE (the "public" address) are written to ATTACK_CONNECT_LOG and
refused, so that nothing leaves the machine. Without ATTACK_DNS this module does nothing.
"""

import json
import os
import socket

_ANSWERS = json.loads(os.environ.get("ATTACK_DNS") or "{}")

if _ANSWERS:
    _lookups: dict[str, int] = {}
    _real_getaddrinfo = socket.getaddrinfo
    _real_create_connection = socket.create_connection

    def getaddrinfo(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in _ANSWERS:
            return _real_getaddrinfo(host, port, *args, **kwargs)
        count = _lookups[name] = _lookups.get(name, 0) + 1
        address = _ANSWERS[name][min(count, len(_ANSWERS[name])) - 1]
        if ":" in address:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port or 0, 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0))]

    def create_connection(address, *args, **kwargs):
        if address[0] == os.environ.get("ATTACK_UNREACHABLE"):
            with open(os.environ["ATTACK_CONNECT_LOG"], "a") as log:
                log.write(f"{address[0]} {address[1]}\n")
            raise ConnectionRefusedError(111, "Connection refused (test resolver)")
        return _real_create_connection(address, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    socket.create_connection = create_connection
