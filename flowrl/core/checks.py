"""One check for the float fields of every config dataclass (no torch, no imports from flowrl).

:func:`check_number` raises ``ValueError("<field>: must be a finite number > 0 ..., got <value>")``,
the form the ``validate()`` methods of :mod:`flowrl.config` turn into a one-line ``ConfigError``
naming the dotted key. NaN is never accepted; +-inf only where ``inf_ok`` says so (a field whose
infinite value means something, e.g. no gradient clipping).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

__all__ = ["check_number"]


def check_number(
    name: str,
    value: Any,
    *,
    gt: Optional[float] = None,
    ge: Optional[float] = None,
    lt: Optional[float] = None,
    le: Optional[float] = None,
    none_ok: bool = False,
    inf_ok: bool = False,
    why: str = "",
) -> None:
    """Raise ``ValueError(f"{name}: must be ...")`` unless ``value`` is a real number (not a bool)
    that is finite (``inf_ok``: or +-inf, never NaN) and satisfies every bound given
    (``gt < value``, ``ge <= value``, ``value < lt``, ``value <= le``). ``None`` passes when
    ``none_ok``. ``why``, when given, is appended to the message in parentheses."""
    if value is None and none_ok:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = (math.isfinite(v) or (inf_ok and not math.isnan(v))) and (
            (gt is None or v > gt) and (ge is None or v >= ge) and (lt is None or v < lt) and (le is None or v <= le))
    if ok:
        return
    bounds = [f"{op} {b:g}" for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if b is not None]
    what = ("a number" if inf_ok else "a finite number") + (" " + " and ".join(bounds) if bounds else "")
    if none_ok:
        what += " or null"
    note = f" ({why})" if why else ""
    raise ValueError(f"{name}: must be {what}{note}, got {value!r}")
