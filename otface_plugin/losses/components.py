"""The OTFace loss's logged parts: their keys, the training-log line and its parser.

:meth:`OTFaceLoss.components` returns :data:`COMPONENTS`; the patched ``train_v2.py`` writes them
as one training-log line (:func:`format_components`, from ``log_components``) and the accuracy
study's recipe route reads that line back (:func:`parse_components`). Both sides use the one
field list below, so a new part is added here once.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping

__all__ = ["COMPONENTS", "PARTS", "LOG_PREFIX", "format_components", "parse_components"]

# what OTFaceLoss.components() returns, in this order
COMPONENTS = ("loss", "margin", "ot", "lambda", "triplets", "w_ap", "w_an", "grad_share", "grad_cos")
# the parts beside the total loss (the recipe's own "Training:" line logs the loss too)
PARTS = COMPONENTS[1:]

LOG_PREFIX = "OTFace"
# (label, component key or None for the step, printf format, regex of the printed value)
_FLOAT = (r"%.4f", r"[-\d.naif]+")  # %.4f prints nan, inf and -inf too
_INT = (r"%d", r"\d+")
_FIELDS = (
    ("Global Step:", None, *_INT),
    ("Loss", "loss", *_FLOAT),
    ("Margin", "margin", *_FLOAT),
    ("OT", "ot", *_FLOAT),
    ("Lambda", "lambda", *_FLOAT),
    ("HardTriplets", "triplets", *_INT),
    ("W(a,p)", "w_ap", *_FLOAT),
    ("W(a,n)", "w_an", *_FLOAT),
    # ||d(lambda L_OT)/dF|| / ||d L_margin/dF|| at the features F the OT term reads, and the cosine
    ("GradShare", "grad_share", *_FLOAT),
    ("GradCos", "grad_cos", *_FLOAT),
)
_SEP = "   "
LOG_FORMAT = _SEP.join([LOG_PREFIX, *(f"{label} {fmt}" for label, _, fmt, _ in _FIELDS)])


def _words(label: str) -> str:
    return r"\s+".join(re.escape(word) for word in label.split())


# fields a line written before the gradient-share diagnostic lacks: parsed as NaN when absent
_LATER = ("grad_share", "grad_cos")
_EARLY = [f for f in _FIELDS if f[1] not in _LATER]
# any run of white space where the format has spaces: a log viewer may have re-spaced the line
LOG_LINE = re.compile(r"\s+".join(
    [_words(LOG_PREFIX), *(rf"{_words(label)}\s+({value})" for label, _, _, value in _EARLY)])
    + "(?:" + "".join(rf"\s+{_words(label)}\s+({value})" for label, key, _, value in _FIELDS if key in _LATER) + ")?")


def format_components(global_step: int, components: Mapping[str, float]) -> str:
    """The training-log line of one step's components (``HardTriplets`` as an integer)."""
    values = [global_step] + [
        int(components[key]) if fmt == "%d" else components[key] for _, key, fmt, _ in _FIELDS[1:]
    ]
    return LOG_FORMAT % tuple(values)


def parse_components(text: str) -> Dict[int, Dict[str, float]]:
    """Global step -> components of every :func:`format_components` line in ``text`` (the last
    line of a step wins)."""
    rows: Dict[int, Dict[str, float]] = {}
    order = [f[1] for f in _EARLY[1:]] + [f[1] for f in _FIELDS if f[1] in _LATER]
    for m in LOG_LINE.finditer(text):
        rows[int(m.group(1))] = {key: float("nan") if v is None else float(v) for key, v in zip(order, m.groups()[1:])}
    return rows
