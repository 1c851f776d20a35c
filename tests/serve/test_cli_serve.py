"""`mmembed serve`: prints the URL, listens on loopback by default, serves the run, stops on Ctrl+C;
a busy port is one line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from mmembed.cli import main  # noqa: E402
from tests.serve.conftest import untrained_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tiny_world, tmp_path_factory):
    return untrained_model(tiny_world).save(tmp_path_factory.mktemp("serve-cli") / "tiny-run")


def first_line(stream, timeout: float) -> str:
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return got[0] if got else ""


def test_serve_prints_the_url_and_serves_until_interrupted(run_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "mmembed.cli", "serve", str(run_dir), "--port", "0"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = first_line(proc.stdout, timeout=120)
        assert line.startswith("mmembed serve: http://127.0.0.1:") and line.rstrip().endswith("(Ctrl+C to stop)"), line
        url = line.split()[2]
        for _ in range(200):
            status = json.loads(urllib.request.urlopen(url + "api/status", timeout=10).read())
            if status["index"]["state"] == "ready":
                break
            time.sleep(0.1)
        assert status["run"] == "tiny-run" and status["index"]["state"] == "ready"
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "<title>mmembed</title>" in page
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_a_busy_port_is_one_line(run_dir, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmembed: error: cannot listen on 127.0.0.1:{port}") and "\n" not in err



@pytest.mark.parametrize("host", ["a..b", "x" * 64 + ".example"])  # names IDNA cannot encode: a UnicodeError
def test_a_malformed_host_name_is_one_line(host):
    from mmembed.errors import UserError
    from mmembed.serve.app import bind

    with pytest.raises(UserError, match=f"cannot listen on {host}:0"):
        bind(host, 0)

def test_a_port_out_of_range_is_one_line(run_dir, capsys):
    assert main(["serve", str(run_dir), "--port", "70000"]) == 2  # a socket would take it as 70000 % 65536
    assert "'70000' is not a port (0-65535" in capsys.readouterr().err


def test_a_refused_memory_file_is_one_line_and_exit_2(run_dir, tmp_path):
    """In a process of its own: the index's build thread must not be running when the error ends it
    (it did, and the interpreter aborted: exit 134)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    (tmp_path / "folder").mkdir()
    done = subprocess.run([sys.executable, "-m", "mmembed.cli", "serve", str(run_dir), "--port", "0", "--memory",
                           str(tmp_path / "folder")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"mmembed: error: {tmp_path / 'folder'} is a folder, not a memory file"


def test_loopback_is_told_apart():
    from mmembed.serve import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("example.org")


def test_ctrl_c_with_a_request_in_flight_prints_no_traceback(run_dir):
    """A request still running 2 s after Ctrl+C was cancelled by uvicorn, which printed "Cancel 1
    running task(s)" and the CancelledError's long traceback after the one-line messages."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "mmembed.cli", "serve", str(run_dir), "--port", "0"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = first_line(proc.stdout, timeout=120).split()[2]
        urllib.request.urlopen(url + "api/status", timeout=30).read()  # uvicorn is serving (and handles Ctrl+C)
        with socket.create_connection(("127.0.0.1", int(url.rstrip("/").rsplit(":", 1)[1])), timeout=10) as conn:
            # a body that never ends: the app waits for it until the shutdown cancels the request
            conn.sendall(b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded"
                         b"\r\nContent-Length: 100\r\n\r\ntext=a")
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert time.monotonic() - sent > 1.9  # the request was in flight: uvicorn waited its 2 s before cancelling it
    assert "Traceback" not in err and "Cancel" not in err, err
    assert err.strip().splitlines()[-1] == "mmembed serve: stopped"
