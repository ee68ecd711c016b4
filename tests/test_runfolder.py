"""Tests of flowrl.train.runfolder: atomic_write leaves the old file or the new one (never a part,
never a temporary file), whatever fails; append_jsonl adds whole lines; the helpers write the bytes
a plain write would (PNG, scores.csv), and a text run's evaluation files keep their format.
"""
from __future__ import annotations

import csv
import errno
import json
import math
import os

import pytest
from PIL import Image

from flowrl.train import runfolder
from flowrl.train.runfolder import append_jsonl, atomic_write, save_png, write_scores_csv


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_bytes_and_text(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    assert atomic_write(p, b"\x00\x01old") == p  # creates the folder
    assert p.read_bytes() == b"\x00\x01old"
    atomic_write(p, "new é\r\nline\n")  # text: UTF-8, newlines as given
    assert p.read_bytes() == "new é\r\nline\n".encode("utf-8")
    assert _listing(p.parent) == ["a.txt"]


@pytest.mark.parametrize("fail_at", ["fsync", "replace", "interrupt"])
def test_atomic_write_failure_keeps_the_old_file(fail_at, tmp_path, monkeypatch):
    """A failure after the new bytes were written (full disk at fsync, a failing rename, Ctrl-C)
    leaves the old file as it was and no temporary file; a write in place would leave the new
    bytes or a part of them."""
    p = tmp_path / "scores.csv"
    p.write_bytes(b"old contents\n")

    def fail(*a, **k):
        if fail_at == "interrupt":
            raise KeyboardInterrupt
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfolder.os, "replace" if fail_at == "replace" else "fsync", fail)
    with pytest.raises(KeyboardInterrupt if fail_at == "interrupt" else OSError):
        atomic_write(p, b"new contents, longer than the old ones\n")
    assert p.read_bytes() == b"old contents\n"
    assert _listing(tmp_path) == ["scores.csv"]


def test_atomic_write_failure_without_an_old_file(tmp_path, monkeypatch):
    monkeypatch.setattr(runfolder.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError):
        atomic_write(tmp_path / "grid.png", b"png")
    assert _listing(tmp_path) == []


def test_append_jsonl(tmp_path):
    p = tmp_path / "eval.jsonl"
    append_jsonl(p, {"step": 1, "x": math.nan})
    append_jsonl(p, {"step": 2, "y": "é"})
    assert p.read_text(encoding="utf-8") == '{"step": 1, "x": NaN}\n{"step": 2, "y": "\\u00e9"}\n'
    with pytest.raises(ValueError):
        append_jsonl(p, {"step": 3, "x": math.nan}, allow_nan=False)
    assert len(p.read_text(encoding="utf-8").splitlines()) == 2


def test_helpers_write_what_a_plain_write_writes(tmp_path):
    """save_png and write_scores_csv give the bytes of PIL's own save and of csv on a file."""
    im = Image.new("RGB", (7, 5), (10, 200, 30))
    im.putpixel((3, 2), (255, 0, 0))
    im.save(tmp_path / "plain.png", format="PNG")
    save_png(im, tmp_path / "atomic.png")
    assert (tmp_path / "atomic.png").read_bytes() == (tmp_path / "plain.png").read_bytes()

    columns = ["prompt", "seed", "total"]
    rows = [{"prompt": 'a "quoted", prompt', "seed": 0, "total": "0.5"}, {"prompt": "é\nline", "seed": 1, "total": "nan"}]
    with open(tmp_path / "plain.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    write_scores_csv(tmp_path / "atomic.csv", rows, columns)
    assert (tmp_path / "atomic.csv").read_bytes() == (tmp_path / "plain.csv").read_bytes()


def test_text_task_eval_files(tmp_path):
    """TextTask.save_eval: samples.jsonl and the eval.jsonl record in their format (NaN kept)."""
    from flowrl.train.tasks import TextTask

    samples = [{"prompt": "1+1=", "completion": "2", "exact": 1.0}, {"prompt": "2+2=", "completion": "5", "exact": 0.0}]
    out = TextTask.save_eval(None, tmp_path, 40, {"means": {"exact": 0.5, "total": math.nan}, "samples": samples})
    assert out["means"]["exact"] == 0.5 and out["details"] == {}
    d = tmp_path / "eval" / "step-00000040"
    assert (d / "samples.jsonl").read_text(encoding="utf-8") == "".join(json.dumps(x) + "\n" for x in samples)
    assert (tmp_path / "eval.jsonl").read_text(encoding="utf-8") == (
        '{"step": 40, "means": {"exact": 0.5, "total": NaN}, "details": {}, '
        '"samples": "eval/step-00000040/samples.jsonl"}\n')
    assert _listing(d) == ["samples.jsonl"] and not any(n.startswith(".") for n in os.listdir(tmp_path))
