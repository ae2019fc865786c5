"""The end-of-session check of tests/conftest.py can fail: it finds a child that is still running and a
process that was re-parented to init, by the session's environment marker, and ignores orphans of
other sessions."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests import process_guard


def _orphan(marker_value: str, pid_file: Path) -> int:
    """A ``sleep`` re-parented to init at once (sh starts it in the background and exits), the way a
    Ray worker outlives its raylet: only its environment ties it to a session."""
    env = {**os.environ, process_guard.MARKER: marker_value}
    subprocess.run(["sh", "-c", f"sleep 300 & echo $! > {pid_file}"], env=env, check=True)
    return int(pid_file.read_text())


def test_leftovers_are_found_by_tree_and_by_marker_then_killed(tmp_path: Path) -> None:
    ours, theirs = uuid.uuid4().hex, uuid.uuid4().hex
    orphan = _orphan(ours, tmp_path / "ours.pid")
    stranger = _orphan(theirs, tmp_path / "theirs.pid")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # unmarked, but our child
    try:
        found = {item.pid for item in process_guard.session_processes(ours)}
        assert {orphan, child.pid} <= found
        assert stranger not in found and os.getpid() not in found
        left = [item for item in process_guard.wait_for_exit(ours, timeout_s=0.5) if item.pid in (orphan, child.pid)]
        assert len(left) == 2 and all(item.line().startswith(f"pid {item.pid} ") for item in left)
        process_guard.kill(left)
        child.wait(timeout=10)
        after = {item.pid for item in process_guard.wait_for_exit(ours, timeout_s=10)}
        assert not {orphan, child.pid} & after
        assert stranger in {item.pid for item in process_guard.session_processes(theirs)}
    finally:
        child.kill()
        child.wait()
        for pid in (orphan, stranger):
            try:
                os.kill(pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
