"""Every tracked Python file keeps its lines within 120 characters (the developers' guide): a long line is
reflowed where it is written, not here."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIMIT = 120


def test_no_tracked_python_line_exceeds_120_characters():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    assert len(files) > 100, "git ls-files found too few files: the test would check nothing"
    long = [f"{name}:{number}: {len(line)} characters"
            for name in files if (REPO / name).is_file()
            for number, line in enumerate((REPO / name).read_text(encoding="utf-8").splitlines(), 1)
            if len(line) > LIMIT]
    assert not long, f"{len(long)} lines longer than {LIMIT} characters:\n" + "\n".join(long[:50])
