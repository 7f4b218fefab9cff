"""Crash isolation: implementations run in a worker process, for ``harness bench`` (a row)
and ``harness check`` (an implementation on a case).

A kernel that corrupts memory can take its process down (a segfault), leave the CUDA context
unusable (an illegal memory access is sticky), exhaust memory, or never return. So the
command's own process never runs an implementation on the device: it hands each piece of work
to a worker (``python -m harness.worker``) and waits at most ``timeout`` seconds for the answer.

* One worker is kept alive across requests: Triton's in-process caches (compiled kernels,
  autotuning results) then serve every request of that process, and torch is imported once.
* After any request that did not succeed (an exception, a death, a timeout) the worker is
  killed and a fresh one is started for the next: a CUDA error may have poisoned its context,
  and a fresh process costs seconds, a wrong result much more.
* A death is reported with its signal (``SIGSEGV``...) and the tail of what the worker wrote
  to stderr (faulthandler prints the Python stack of a fatal signal there); a timeout kills
  the worker's whole process group.

Protocol: JSON lines. The parent writes the worker's configuration (device, device index,
plugins, environment) as the first line of its stdin and waits for ``{"ready": ...}``; then
each request ``{"target": "module:function", "spec": {...}}`` gets one reply line: the
function's result (a dict) called as ``function(spec, device)``, with ``"status": "ok"``, or
``{"status": "failed", "reason": ...}`` when it raised. Naming the function in the request
keeps this module free of the engines it serves. The worker keeps its real stdout for replies
and sends everything else printed (by kernels, libraries) to stderr, which the parent appends
to a log file.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT = 300.0  # s: importing torch, triton and the plugins
STDERR_TAIL_LINES = 3
PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h)
MAX_REASON = 400  # characters of stderr quoted in a failed row's reason


class WorkerFailed(Exception):
    """The worker did not answer: ``status`` is "failed" (it died) or "timeout"."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def describe_exit(code: int | None, who: str = "worker") -> str:
    if code is None:
        return f"{who} still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{who} killed by {name} (exit code {code})"
    return f"{who} exited with code {code}"


def condense_stderr(text: str) -> str:
    """A dead process's stderr in one line: a fatal error's first line and innermost frame
    (faulthandler's report of a fatal signal), else its last lines; at most MAX_REASON
    characters."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    fatal = [i for i, ln in enumerate(lines) if ln.startswith("Fatal Python error")]
    if fatal:
        i = fatal[-1]
        frames = [ln for ln in lines[i + 1:] if ln.startswith("File ")]
        picked = [lines[i]] + frames[:1]
    else:
        picked = [ln for ln in lines if not ln.startswith("Extension modules")][-STDERR_TAIL_LINES:]
    tail = " | ".join(picked)
    return "..." + tail[-MAX_REASON:] if len(tail) > MAX_REASON else tail


# Autotuning timings taken while other processes share the device are noise: not written to
# Triton's on-disk cache, where a later timing run would take them as its choice. Triton's own
# setting, and fla's: it passes cache_results=True to its autotuners, which wins over Triton's.
NO_AUTOTUNE_CACHE = {"TRITON_CACHE_AUTOTUNING": "0", "FLA_CACHE_RESULTS": "0"}


class Worker:
    """The parent's handle on one worker process (started on first use, restarted after a
    failure); ``env``: variables set for it on top of this process's environment."""

    def __init__(self, config: dict[str, Any], log_path: Path, env: dict[str, str] | None = None):
        self.config = config
        self.env = dict(env or {})
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self._buffer = b""
        self.started = 0

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harness.worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
        log.close()  # the child holds its own descriptor
        self._buffer = b""
        self.started += 1
        self._send({**self.config, "parent": os.getpid()})
        reply = self._receive(STARTUP_TIMEOUT, self.log_path.stat().st_size)
        if not reply.get("ready"):
            self.kill()
            raise WorkerFailed("failed", f"worker did not start: {reply}")

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and return the reply; raises :class:`WorkerFailed` when the worker
        dies or does not answer within ``timeout`` seconds (it is then killed)."""
        if self.proc is None or self.proc.poll() is not None:
            self._spawn()
        mark = self.log_path.stat().st_size
        self._send(message)
        return self._receive(timeout, mark)

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died: _receive reads the EOF and says how

    def _receive(self, timeout: float, log_mark: int) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise WorkerFailed("timeout", f"no result after {timeout:g} s (worker killed)"
                                   + self._stderr_tail(log_mark))
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:  # EOF: the worker is gone
                try:
                    code = self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.kill()
                    code = self.proc.returncode
                self.proc = None
                raise WorkerFailed("failed", describe_exit(code) + self._stderr_tail(log_mark))
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _stderr_tail(self, mark: int) -> str:
        """What the worker wrote to stderr during this request, condensed (the whole of it is in
        the log file): a fatal error's first line and innermost frame, else the last lines."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(mark)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        tail = condense_stderr(text)
        if not tail:
            return ""
        return f"; stderr: {tail} (log: {self.log_path})"

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    def close(self) -> None:
        """Let the worker finish (EOF on its stdin), killing it if it does not."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None
        except (subprocess.TimeoutExpired, OSError):
            self.kill()


def cores() -> int:
    """The CPU cores this process may run on (what a pool of processes divides)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------- the worker's side
def error_text(exc: BaseException) -> str:
    """``Type: message`` of an exception, on one line, cut to a readable length."""
    text = " ".join(traceback.format_exception_only(type(exc), exc)[-1].split())
    return text if len(text) <= MAX_REASON else text[:MAX_REASON] + "..."


def handle(message: dict[str, Any], device: str) -> dict[str, Any]:
    """One request, in the worker: ``target(spec, device)``'s result, or why it raised."""
    module, _, name = message["target"].partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
        return {"status": "ok", **function(message["spec"], device)}
    except Exception as exc:  # an exception fails this request; the parent restarts us
        return {"status": "failed", "reason": error_text(exc)}


def die_with_parent(parent: int) -> None:
    """The worker runs in its own session (so a timeout can kill its process group without
    touching the sweep); ask Linux to kill it when the sweep's process dies, so a sweep killed
    from outside (``timeout``, a job limit) leaves no worker holding the GPU."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker ends at EOF on stdin instead
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def prepare(config: dict[str, Any]) -> str:
    """Set up a process that runs implementations (this worker, a prewarm job): Python's stack on
    a fatal signal, death with the parent, the interpreter on the CPU, the registry and plugins,
    torch's ``threads``, the GPU ``device_index``. Returns the device."""
    import faulthandler

    faulthandler.enable()
    die_with_parent(config.get("parent", os.getppid()))
    device = config["device"]
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    from harness.registry import load_plugin, load_plugins

    load_plugins()
    for spec in config.get("plugins", []):
        load_plugin(spec)
    import torch

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    if device == "cuda":
        torch.cuda.set_device(config.get("device_index", 0))
    return device


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else is printed goes to the log, not into the protocol
    sys.stdout = sys.stderr
    device = prepare(json.loads(sys.stdin.readline()))
    replies.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if line.strip():
            replies.write(json.dumps(handle(json.loads(line), device)) + "\n")


if __name__ == "__main__":
    main()
