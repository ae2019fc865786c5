"""Which processes a test session started and left running.

Two ways of finding them, because neither alone sees everything:

* the descendants of the pytest process (``psutil.Process.children(recursive=True)``): every child,
  whatever its environment, as long as its parents live;
* a marker in the environment (:data:`MARKER`, set by ``tests/conftest.py`` before any test runs):
  every process started by the suite inherits it, Ray's raylet passes it on to the workers it starts,
  and ``/proc/<pid>/environ`` keeps it after the process was re-parented to init (which is how an
  orphaned ``ray::TrainController`` escapes the tree).

Zombies are not counted: they run nothing (their parent has only not reaped them yet).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import psutil

MARKER = "TITOK_TEST_SESSION"


@dataclass(frozen=True)
class Leftover:
    pid: int
    ppid: int
    name: str
    cmdline: str

    def line(self) -> str:
        return f"pid {self.pid} (parent {self.ppid}): {self.cmdline[:160] or self.name}"


def _describe(proc: psutil.Process) -> Leftover | None:
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return Leftover(proc.pid, proc.ppid(), proc.name(), " ".join(proc.cmdline()))
    except (psutil.Error, OSError):
        return None


def session_processes(marker_value: str, root_pid: int | None = None) -> list[Leftover]:
    """Live processes (not ``root_pid`` itself) below ``root_pid`` or carrying ``MARKER=marker_value``."""
    root_pid = os.getpid() if root_pid is None else root_pid
    found: dict[int, psutil.Process] = {}
    try:
        found.update({p.pid: p for p in psutil.Process(root_pid).children(recursive=True)})
    except psutil.Error:
        pass
    for proc in psutil.process_iter():
        if proc.pid == root_pid or proc.pid in found:
            continue
        try:
            if proc.environ().get(MARKER) == marker_value:
                found[proc.pid] = proc
        except (psutil.Error, OSError):  # gone meanwhile, or another user's process
            continue
    described = (_describe(p) for p in found.values())
    return sorted((d for d in described if d is not None), key=lambda d: d.pid)


def wait_for_exit(marker_value: str, timeout_s: float, root_pid: int | None = None) -> list[Leftover]:
    """Poll until no session process is left or ``timeout_s`` passed; returns what is left.

    Processes that are shutting down (Ray workers notice their raylet's end within about a second)
    get that long to go by themselves."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = session_processes(marker_value, root_pid)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.5)


def kill(leftovers: list[Leftover]) -> None:
    """SIGKILL each leftover (by pid; only processes this session started are ever passed here)."""
    for item in leftovers:
        try:
            os.kill(item.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


__all__ = ["MARKER", "Leftover", "session_processes", "wait_for_exit", "kill"]
