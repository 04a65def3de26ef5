"""`matvlm serve` as a user runs it: a hybrid directory made by `matvlm convert`, a separate process."""

import os
import subprocess
import sys
import time

import httpx

from matvlm.cli import convert_and_save

from ..conftest import free_port
from .conftest import TEACHER, image_message, scene_png


def test_serve_command_serves_a_converted_hybrid(tmp_path):
    hybrid = convert_and_save(TEACHER, tmp_path / "hybrid-25", overwrite=False, context=256, ratio=0.25)
    port = free_port()
    cmd = [sys.executable, "-m", "matvlm.cli", "serve", str(hybrid), "--port", str(port), "--max-batch", "2",
           "--max-seq-len", "256"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        info = httpx.get(f"{url}/v1/models").json()["data"][0]
        assert info["id"] == "hybrid-25" and info["matvlm"]["kind"] == "hybrid"
        assert info["matvlm"]["mixer_layers"] == [0, 4] and info["matvlm"]["max_batch"] == 2
        r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "hybrid-25", "messages": [image_message("Describe the image.", scene_png(1))], "max_tokens": 8})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(f"{url}/").text.startswith("<!doctype html>")
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_command_refuses_a_missing_directory(tmp_path):
    out = subprocess.run([sys.executable, "-m", "matvlm.cli", "serve", str(tmp_path / "nope")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "not found" in out.stdout
