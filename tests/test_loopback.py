"""``make test`` runs the suite through ``tests/loopback.sh``: in a network namespace that
holds only ``lo``, so that no server a test starts (torchrun's rendezvous store, Ray, MLflow,
Slurm) can be reached from beyond this machine, whatever address it binds."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "tests/loopback.sh"

# Binds every interface, as torchrun's store does, and talks to itself over 127.0.0.1.
PROBE = """
import socket, sys
server = socket.create_server(("0.0.0.0", 0))
client = socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=5)
peer, _ = server.accept(); client.sendall(b"ok"); assert peer.recv(2) == b"ok"
print(sorted(name for _, name in socket.if_nameindex()))
sys.exit(7)
"""


def test_the_script_runs_the_command_with_loopback_alone_and_keeps_its_exit_code():
    env = {k: v for k, v in os.environ.items() if k != "PVEN_LOOPBACK_ONLY"}
    proc = subprocess.run(["bash", str(SCRIPT), sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.strip() == "['lo']", proc.stdout


def test_the_script_without_a_command_is_a_usage_error():
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage: tests/loopback.sh COMMAND" in proc.stderr


def test_the_suite_itself_sees_loopback_alone():
    inside = os.environ.get("PVEN_LOOPBACK_ONLY") == "1"
    if not inside and os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true: the suite must run through tests/loopback.sh (make test)")
    if not inside:
        pytest.skip("run outside tests/loopback.sh (make test runs it inside)")
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
