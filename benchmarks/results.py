"""Shared by the benchmark scripts: entries go into RESULTS.md newest first."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


def append_entry(text: str) -> None:
    """Insert ``text`` (a '## ' section) before the newest existing entry."""
    content = RESULTS.read_text()
    i = content.find("\n## ")
    text = text.strip("\n") + "\n"
    RESULTS.write_text(content[:i].rstrip("\n") + "\n\n" + text + content[i:] if i >= 0
                       else content.rstrip("\n") + "\n\n" + text)
