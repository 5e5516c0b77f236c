"""``llmasos serve`` as a user starts it: a process on an ephemeral loopback port (the eager paged runner of the
random llama-tiny preset: no compile), one request, Ctrl-C; it must exit cleanly."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx


def test_llmasos_serve_cli_end_to_end():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "llmasos", "serve", "llama-tiny", "--target", "torch", "--port", "0",
                          "--max-seq", "64", "--max-batch", "4", "--kv-blocks", "20", "--name", "tiny"],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        url, lines, deadline = None, [], time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = p.stderr.readline()
            if not line and p.poll() is not None:
                break
            lines.append(line)
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)/v1", line)
            url = m and m.group(1)
        assert url, "".join(lines)
        assert "20 KV blocks of 16" in "".join(lines)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 5,
                                                      "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        assert httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": [1, 500]},
                          timeout=60).status_code == 400          # vocab 128
    finally:
        p.send_signal(signal.SIGINT)
        try:
            rc = p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
            raise
        p.stderr.close()
    assert rc == 0
