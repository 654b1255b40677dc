"""A `composer serve` subprocess for the length of one command (`composer eval --lm-eval`).

Tools that speak only HTTP (lm-eval) must meet the real server, not an imitation: this starts
the same command a user runs, on 127.0.0.1 and a free port, waits for /health, and stops it
(and its engine) on exit, whatever happened. Its log goes to a file that errors point to.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.errors import ComposerError

START_TIMEOUT_S = 600.0  # an engine start takes 30-90 s on a busy CPU; vLLM compiles nothing here
# vLLM on CPU otherwise reserves 92 % of the machine's memory for its KV cache and refuses to
# start when less is free. 1 GiB holds ~20k tokens of SmolLM2-135M in float32: plenty for lm-eval.
KV_CACHE_BYTES = 1 << 30


class ServerError(ComposerError):
    """The server did not come up, or refused what the command asked of it."""


@dataclass(frozen=True)
class LocalServer:
    url: str  # http://127.0.0.1:PORT
    model: str  # served model name
    log: Path

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
        """(status, JSON body or text) of one POST; the X-Composer-Experts reply header is kept
        in the body under "_experts_header" for 200s."""
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", **headers},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                doc = json.loads(r.read())
                doc["_experts_header"] = r.headers.get("x-composer-experts", "")
                return r.status, doc
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def local_server(
    target: str, model: str, log: Path, max_model_len: int, kv_cache_bytes: int = KV_CACHE_BYTES
) -> Iterator[LocalServer]:
    """`composer serve TARGET` on a free local port until the block ends."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "cli.main", "serve", target, "--port", str(port),
        "--served-model-name", model, "--", "--max-model-len", str(max_model_len),
        "--kv-cache-memory-bytes", str(kv_cache_bytes),
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(),
            start_new_session=True,
        )  # fmt: skip
    server = LocalServer(f"http://127.0.0.1:{port}", model, log)
    main = threading.current_thread() is threading.main_thread()
    # SIGTERM ends the command through `finally`, which stops the server (signals: main thread).
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(server.url):
            if proc.poll() is not None:
                raise ServerError(f"composer serve {target} exited {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise ServerError(
                    f"composer serve {target}: not healthy in {START_TIMEOUT_S:.0f} s"
                )
            time.sleep(1.0)
        yield server
    finally:
        _stop(proc)
        if main:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def running_server(url: str) -> Iterator[LocalServer]:
    """A server someone else runs: its one served model, checked healthy first."""
    url = url.rstrip("/")
    if not _healthy(url):
        raise ServerError(f"--server {url}: no healthy composer serve there (GET /health)")
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            models = [m["id"] for m in json.loads(r.read())["data"]]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        raise ServerError(f"--server {url}: GET /v1/models failed ({e})") from None
    if len(models) != 1:
        raise ServerError(f"--server {url}: expected one served model, found {models}")
    yield LocalServer(url, models[0], Path("-"))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT first (vLLM shuts its engine down cleanly), then the whole process group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with suppress(ProcessLookupError):  # engine processes left in the group (vLLM's workers)
        os.killpg(proc.pid, signal.SIGKILL)
