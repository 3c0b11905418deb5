"""`metallo serve` as a user starts and stops it: it answers on 127.0.0.1 only, and `kill` (SIGTERM, even
twice, as `uv run` forwarding it and `pkill` give) stops it through the clean-up of its work folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import psutil

from metallo_core import tracking
from tests.conftest import REPO_ROOT
from tests.serve.test_serve_page import free_port


def test_the_server_listens_on_loopback_and_kill_removes_its_work_folder(tmp_path):
    tracking.ensure_experiment("serve")  # a store exists (the README's set-up makes one); serve only reads it
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    server = subprocess.Popen([sys.executable, "-m", "metallo_core", "serve", "--port", str(port)], cwd=REPO_ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.communicate()[0][-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the page never answered"
                time.sleep(1)
        [work] = list(tmp_path.glob("metallo-serve-*"))
        listening = [c.laddr.ip for c in psutil.Process(server.pid).net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening == ["127.0.0.1"], listening
        server.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        server.send_signal(signal.SIGTERM)
        output = server.communicate(timeout=60)[0]
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, output[-3000:]
    assert not work.exists(), sorted(str(path) for path in work.rglob("*"))
