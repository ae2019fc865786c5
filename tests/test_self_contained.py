"""The repository is self-contained: no tracked file refers to a path outside it.

A clone in an empty folder must run and test with nothing beside it, and every document a comment
cites must be in the clone. The guard reads every tracked file (``git ls-files``; a plain walk when
the tree is not a git checkout) and reports:

* relative paths that climb above the repository root (``../`` more often than the file is deep), or
  that lead to nothing in the repository (a comment pointing at a folder beside the clone, written
  relative to the root rather than to the file); ``../`` to a file of the tree, e.g. from ``docs/``
  to ``../README.md``, is fine;
* ``Path(__file__)`` chains (``.parent``, ``.parents[N]``) that climb above the root;
* absolute paths into someone's machine or workspace (top-level ``work``, ``home``, ``root``,
  ``Users`` or ``workspace`` folders), which exist only where the file was written.

Not references: URLs (``https://host/../x`` is the server's business) and Python's relative imports
(``from ..models import x`` has dots but no slashes). Example paths such as ``/data/imagenet`` or
``/tmp`` name places on the user's machine on purpose and are not flagged.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
# A run of "../" steps, not preceded by a path character (so "a/../b" inside the tree is measured from
# "a", which we do not track, and is left alone) -- the steps are what climbs.
_UP = ".." + "/"
_CLIMB = re.compile(r"(?<![\w.\-/])((?:\.\./)+)([\w.\-]*)")
_FILE_CHAIN = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?((?:\.parent\b|\.parents\[\d+\])+)")
_STEP = re.compile(r"\.parents\[(\d+)\]|\.parent\b")
_MACHINE_ROOTS = tuple("/" + name + "/" for name in ("work", "home", "root", "Users", "workspace"))
_MACHINE_PATH = re.compile(r"(?<![\w.~\-/])(" + "|".join(re.escape(r) for r in _MACHINE_ROOTS) + r")\S*")
SKIPPED_SUFFIXES = (".png", ".jpg", ".jpeg", ".tar", ".parquet", ".safetensors", ".bin", ".npz", ".pt", ".pth")


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    text: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.why}: {self.text.strip()[:120]}"


def tracked_files(root: Path) -> list[str]:
    """Repository-relative paths of the tracked files (every file but .git when not a checkout)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True, timeout=60)
        return [p for p in out.stdout.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".git" not in p.parts]


def _climbs(steps: int, depth: int) -> bool:
    """``steps`` times "../" from a file ``depth`` folders below the root leaves the repository."""
    return steps > depth


def _file_chain_levels(chain: str) -> int:
    """Levels above the file itself: ``.parent`` is 1, ``.parents[N]`` is N + 1."""
    return sum(int(m.group(1)) + 1 if m.group(1) is not None else 1 for m in _STEP.finditer(chain))


def scan_text(relpath: str, text: str, root: Path | None = None) -> list[Finding]:
    """Outside references in one file's text (``relpath`` relative to ``root``, the repository root;
    without ``root`` only climbing is checked, not where a relative path leads)."""
    depth = len(Path(relpath).parts) - 1
    findings = []
    for number, line in enumerate(text.splitlines(), 1):
        bare = _URL.sub(" ", line)
        for match in _CLIMB.finditer(bare):
            steps, first = match.group(1).count(_UP), match.group(2).rstrip(".")
            if _climbs(steps, depth):
                findings.append(Finding(relpath, number, line, f"{steps} x '{_UP}' from {depth} folder(s) deep"))
            elif root is not None and first:
                target = Path(*Path(relpath).parts[:depth - steps], first)
                if not (root / target).exists():
                    findings.append(Finding(relpath, number, line, f"'{match.group(0)}' leads to nothing in the "
                                                                   f"repository ({target} does not exist)"))
        for match in _FILE_CHAIN.finditer(bare):
            levels = _file_chain_levels(match.group(1))
            if levels > depth + 1:
                findings.append(Finding(relpath, number, line, f"Path(__file__) climbs {levels} levels "
                                                               f"from {depth} folder(s) deep"))
        for match in _MACHINE_PATH.finditer(bare):
            findings.append(Finding(relpath, number, line, f"machine-specific path {match.group(0)}"))
    return findings


def outside_references(root: Path, files: list[str] | None = None) -> list[Finding]:
    """Every outside reference in the tracked text files under ``root``."""
    findings = []
    for relpath in tracked_files(root) if files is None else files:
        if relpath.lower().endswith(SKIPPED_SUFFIXES):
            continue
        try:
            text = (root / relpath).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary data, or deleted in the work tree
        findings.extend(scan_text(relpath, text, root))
    return findings


# ----------------------------------------------------------------------------------------------


def test_no_tracked_file_refers_outside_the_repository() -> None:
    files = tracked_files(REPO_ROOT)
    assert "tests/data/official_keys/official_keys_summary.json" in files  # the data the model tests read
    findings = outside_references(REPO_ROOT, files)
    assert not findings, "references outside the repository:\n" + "\n".join(map(str, findings))


def test_the_guard_catches_planted_references(tmp_path: Path) -> None:
    """A repository with planted references outside it, and look-alikes that stay inside."""
    up, here = _UP, "Path(__file" + "__)"  # spelled in pieces: this file must pass the guard itself
    planted = {
        "README.md": f"See {up}shared/spec/README.md for the format.\n"           # climbs from the root
                     "Docs: docs/format.md. Data: /data/imagenet (the user's).\n",  # fine
        "docs/format.md": f"Back to [the readme]({up}README.md).\n"                # stays inside: fine
                          f"Notes: {up}{up}notes/spec.md\n"                           # climbs
                          f"Mirror: https://example.com/a/{up}{up}{up}b\n",           # a URL: fine
        "pkg/sub/mod.py": "from ..util import x\n"                                     # relative import: fine
                          f"HERE = {here}.resolve().parents[2]\n"                    # the root: fine
                          f"SPEC = {here}.resolve().parents[2].parent / 'shared'\n"  # climbs
                          f"LOCAL = '{up}util.py'\n"                                # pkg/util.py: fine
                          f"GONE = '{up}{up}nothing/x.json'\n"                      # leads to nothing
                          "CACHE = '/" + "work/cache/x'\n",                          # machine path
        "configs/a.yaml": "# sizes from /" + "home/someone/spec.md\n",              # machine path
    }
    planted["pkg/util.py"] = "x = 1\n"
    for relpath, text in planted.items():
        (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relpath).write_text(text)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "."], check=True)
    found = {(f.path, f.line) for f in outside_references(tmp_path)}
    assert found == {("README.md", 1), ("docs/format.md", 2), ("pkg/sub/mod.py", 3), ("pkg/sub/mod.py", 5),
                     ("pkg/sub/mod.py", 6), ("configs/a.yaml", 1)}
    # The same planted line in a copy of one of this repository's own files is caught too.
    readme = (REPO_ROOT / "README.md").read_text()
    assert not scan_text("README.md", readme, REPO_ROOT)
    assert [f.line for f in scan_text("README.md", readme + planted["README.md"], REPO_ROOT)] == [readme.count("\n") + 1]
