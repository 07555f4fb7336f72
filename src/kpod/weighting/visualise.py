"""Seeing the learned weights: terminal colouring and an HTML heat-map like the paper's Figure 2."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from kpod.data.schema import Example
from kpod.weighting.weights import rationale_key

# Eight background shades from white to dark red (256-colour terminal palette).
_SHADES = (231, 224, 217, 210, 203, 196, 160, 124)


def _pieces(example: Example, row: dict[str, Any]) -> list[tuple[str, float | None]]:
    """The rationale cut into (text, weight) pieces; text between tokens gets ``None``."""
    out: list[tuple[str, float | None]] = []
    pos = 0
    for (start, end), w in zip(row.offsets, row.weights, strict=True):
        if start > pos:
            out.append((example.rationale[pos:start], None))
        out.append((example.rationale[start:end], w))
        pos = max(pos, end)
    if pos < len(example.rationale):
        out.append((example.rationale[pos:], None))
    return out


def _scale(weights: Sequence[float]) -> tuple[float, float]:
    """The range shades are stretched over: weights often sit in a narrow band (all near 0.8, or
    all near 0.1), where absolute shading would show one colour. Hover text keeps the true w."""
    lo, hi = min(weights, default=0.0), max(weights, default=1.0)
    return (lo, hi) if hi - lo > 1e-6 else (0.0, 1.0)


def _level(w: float, lo: float, hi: float) -> float:
    return min(1.0, max(0.0, (w - lo) / (hi - lo)))


def terminal_heatmap(example: Example, row: dict[str, Any]) -> str:
    """The rationale with each token's background shaded by its weight (ANSI 256 colours),
    stretched over this rationale's range of weights."""
    lo, hi = _scale(row.weights)
    parts = []
    for text, w in _pieces(example, row):
        if w is None:
            parts.append(text)
            continue
        shade = _SHADES[min(len(_SHADES) - 1, int(_level(w, lo, hi) * len(_SHADES)))]
        fg = 231 if shade in (196, 160, 124) else 16
        parts.append(f"\x1b[48;5;{shade}m\x1b[38;5;{fg}m{text}\x1b[0m")
    return "".join(parts)


def html_heatmap(
    examples: Sequence[Example], rows: dict[str, dict[str, Any]], title: str = "Token weights"
) -> str:
    """A self-contained HTML page: each rationale's tokens shaded by weight, values on hover.

    Shades are stretched over the range of weights shown (the legend gives the true values).
    """
    shown = [w for e in examples if rationale_key(e) in rows for w in rows[rationale_key(e)].weights]
    lo, hi = _scale(shown)
    blocks = []
    for e in examples:
        row = rows.get(rationale_key(e))
        if row is None:
            continue
        spans = []
        for text, w in _pieces(e, row):
            if w is None:
                spans.append(html.escape(text).replace("\n", "<br>"))
            else:
                spans.append(
                    f'<span class="t" style="background: rgba(200, 30, 30, {_level(w, lo, hi):.3f})" '
                    f'title="w = {w:.3f}">{html.escape(text)}</span>'
                )
        blocks.append(
            f'<div class="ex"><div class="q"><b>{html.escape(e.qid)}</b> {html.escape(e.question)}</div>'
            f'<div class="r">{"".join(spans)}</div></div>'
        )
    legend = "".join(
        f'<span class="t" style="background: rgba(200, 30, 30, {v / 4:.2f})">'
        f"w = {lo + (hi - lo) * v / 4:.3f}</span> "
        for v in range(5)
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; line-height: 1.9; }}
.ex {{ border-bottom: 1px solid #ddd; padding: 0.8rem 0; }}
.q {{ color: #444; margin-bottom: 0.4rem; }}
.r {{ font-family: ui-monospace, monospace; font-size: 0.95rem; white-space: normal; }}
.t {{ border-radius: 3px; padding: 0 1px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Each rationale token is shaded by its learned weight w (the probability that the mask generator
keeps it): darker red means more important to predicting the answer.
The weights shown range from w = {lo:.3f} to w = {hi:.3f}; shades span that range: {legend}</p>
{"".join(blocks)}
</body></html>
"""
