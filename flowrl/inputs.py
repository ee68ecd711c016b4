"""Checked reading of user-supplied inputs (prompt files, folders), with one-line errors."""
from __future__ import annotations

from pathlib import Path
from typing import List, Union


class UsageError(ValueError):
    """Bad user input (a missing file, an empty prompt list, ...): the CLI prints it as one line and
    exits with status 2."""


def read_prompts(path: Union[str, Path]) -> List[str]:
    """Prompts from a UTF-8 text file, one per line; blank lines and lines starting with '#' are
    skipped. Raises UsageError for a missing, non-UTF-8 or empty file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"prompt file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"prompt file {p} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [s for s in prompts if s and not s.startswith("#")]
    if not prompts:
        raise UsageError(f"prompt file {p} holds no prompts")
    return prompts


def existing_dir(path: Union[str, Path], what: str = "folder") -> Path:
    """``path`` as a Path, or UsageError naming it when it is not an existing directory."""
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{what} not found: {p}")
    return p
