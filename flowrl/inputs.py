"""Checked user-supplied inputs (prompt files, folders) and output paths, with one-line errors."""
from __future__ import annotations

import argparse
import os
import tempfile
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


def writable_dir(path: Union[str, Path], what: str = "output folder") -> Path:
    """``path`` as a Path to a folder that exists (created, with its parents, when missing) and
    takes new files; UsageError naming it when it is a file or cannot be created or written (checked
    by creating and removing a small temporary file)."""
    p = Path(path).expanduser()
    try:
        if p.exists() and not p.is_dir():
            raise UsageError(f"{what} {p} is an existing file, not a folder")
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a parent is a file
        raise UsageError(f"{what} {p} cannot be created: a part of its path is a file") from None
    except OSError as e:
        raise UsageError(f"{what} {p} cannot be created ({e.strerror or type(e).__name__})") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".flowrl-write-test-", dir=p)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"{what} {p} is not writable ({e.strerror or type(e).__name__})") from None
    return p


def writable_file(path: Union[str, Path], what: str = "output file") -> Path:
    """``path`` as a Path to a file that can be written: not a folder, not read-only, its folder
    created when missing (:func:`writable_dir`); UsageError naming it otherwise."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{what} {p} is a folder, not a file")
    try:
        writable_dir(p.parent, "folder")
    except UsageError as e:
        raise UsageError(f"{what} {p}: {e}") from None
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{what} {p} is not writable (Permission denied)")
    return p


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors (a missing or unknown argument, a bad value) raise
    UsageError, one line, instead of printing the usage and exiting; ``--help`` is unchanged."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


DTYPE_NAMES = ("float32", "float16", "bfloat16")  # the floating dtypes a config or command line may name


def torch_dtype(name: str):
    """The torch dtype called ``name`` (one of :data:`DTYPE_NAMES`); UsageError otherwise."""
    import torch  # heavy: only when a dtype is actually needed

    if name not in DTYPE_NAMES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)
