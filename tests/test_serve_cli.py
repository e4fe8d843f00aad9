"""`python -m llama.serve` as a process: it serves the demo model when given no checkpoint; SIGTERM or Ctrl-C
stops accepting connections, lets a running stream finish (or, past --drain_timeout, cuts it) and exits 0; the
core package imports without the server's packages, and the server then says what to install."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import SMALL_GQA, subprocess_env

pytestmark = pytest.mark.slow  # each test starts a server process


def start(*args: str) -> "tuple[subprocess.Popen, int]":
    """Start the server on a free port; return the process and the port its first lines announce."""
    proc = subprocess.Popen([sys.executable, "-m", "llama.serve", "--port", "0", "--log_level", "warning", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(OMP_NUM_THREADS="1"))
    lines = []
    for line in proc.stdout:  # (bounded by the process: it exits on an error)
        lines.append(line)
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    raise AssertionError(f"the server did not start: {''.join(lines)}")


def open_stream(port: int, body: dict) -> "tuple[socket.socket, bytes]":
    """POST a streaming completion on a raw socket; return it with what came until the first token's event."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    data = json.dumps(dict(body, stream=True)).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    received = b""
    while received.count(b"data: ") < 2:
        more = sock.recv(65536)
        assert more and received[:12] != b"HTTP/1.1 400", received
        received += more
    return sock, received


def read_to_end(sock: socket.socket, received: bytes) -> list:
    """The stream's events (decoded JSON, or "[DONE]") once the server has closed the connection."""
    while True:
        more = sock.recv(65536)
        if not more:
            break
        received += more
    sock.close()
    return [e if e == "[DONE]" else json.loads(e) for e in re.findall(r"^data: (.*)$", received.decode(), re.M)]


def refuses_connections(port: int) -> bool:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_lets_a_running_stream_finish_then_exits_cleanly():
    proc, port = start()  # the demo model
    try:
        sock, received = open_stream(port, {"model": "llama-demo", "prompt": "It is a truth", "max_tokens": 200,
                                            "temperature": 0, "ignore_eos": True})
        proc.send_signal(signal.SIGTERM)
        assert refuses_connections(port)  # no new connection while it drains
        events = read_to_end(sock, received)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "SIGTERM: draining 1 request(s)" in out and out.rstrip().endswith("llama.serve: stopped")
    # the whole answer came: the demo model's own, as text_completion gives it alone
    from llama.cli.demo import build_demo

    [alone] = build_demo(device="cpu").text_completion(["It is a truth"], max_gen_len=200, temperature=0,
                                                       ignore_eos=True)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == alone["generation"]


def test_past_the_drain_timeout_ctrl_c_cuts_the_running_stream_and_exits_cleanly(tiny_checkpoint):
    ckpt = tiny_checkpoint(dict(SMALL_GQA, vocab_size=512))
    proc, port = start("--ckpt_dir", str(ckpt.dir), "--max_seq_len", "4096", "--drain_timeout", "0.5",
                       "--device", "cpu")
    try:
        name = os.path.basename(str(ckpt.dir))
        sock, received = open_stream(port, {"model": name, "prompt": "x", "max_tokens": 4000, "temperature": 0,
                                            "ignore_eos": True})
        proc.send_signal(signal.SIGINT)
        events = read_to_end(sock, received)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert "[DONE]" not in events and len(events) < 4000  # cut short
    assert proc.returncode == 0, out
    assert "SIGINT: draining 1 request(s)" in out and out.rstrip().endswith("llama.serve: stopped")


def test_the_core_imports_without_the_server_packages_and_the_server_says_what_to_install():
    code = ("import sys\n"
            "sys.modules['starlette'] = sys.modules['uvicorn'] = None  # as if not installed\n"
            "import llama, llama.serve.pipeline, llama.serve.async_engine, llama.serve.protocol\n"
            "from llama.serve.__main__ import main\n"
            "sys.exit(main([]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                            timeout=300)
    assert result.returncode == 2
    assert "pip install" in result.stderr and "starlette" in result.stderr and "uvicorn" in result.stderr
