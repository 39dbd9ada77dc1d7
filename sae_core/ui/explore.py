"""The Explore page's presentation, pure: the latents table, a latent's activation histogram, shaded text.

Token texts are other people's data (any model's vocabulary, any dataset): they are HTML-escaped before
they become markup, so a token reading `<script>` or `**bold**` shows as exactly those characters.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

SHADE_RGB = (255, 140, 0)  # the colour of an activation; its strength is the opacity
FLAG_DEAD, FLAG_DENSE = "dead", "dense"


def source_note(summary: dict) -> str | None:
    """What the rows inspected are, when it is not an SAE's own input: a transcoder's latents fire on its
    module's input and its decoder (logit effects, nearest latents) writes to the module's output."""
    if not summary.get("transcoder"):
        return None
    module = summary.get("hook") or "its module"
    return (
        f"A transcoder of {module}: its latents are computed from the module's input (the rows and examples "
        "below), and its decoder writes to the module's output (the logit effects and nearest latents)."
    )


def latents_table(inspection, search: str = "") -> pd.DataFrame:
    """One row per latent: frequency, max and mean activation, the tokens it raises most, its flags;
    `search` keeps latents whose number is the text or whose top tokens contain it (case ignored)."""
    arrays = inspection.table_arrays
    frequency = arrays["frequency"]
    dense = float(inspection.summary.get("dense_frequency", 0.1))
    flags = np.where(frequency == 0, FLAG_DEAD, np.where(frequency > dense, FLAG_DENSE, ""))
    table = pd.DataFrame({
        "Latent": np.arange(inspection.d_sae),
        "Frequency": frequency,
        "Max activation": arrays["max_activation"],
        "Mean activation": arrays["mean_activation"],
        "Raises": _raised_tokens(inspection),
        "Flags": flags,
    })  # fmt: skip
    search = search.strip()
    if not search:
        return table
    if search.isdigit():
        return table[table["Latent"] == int(search)]
    return table[table["Raises"].str.contains(search, case=False, regex=False)]


def _raised_tokens(inspection, count: int = 3) -> list[str]:
    ids = inspection.logit_top_ids
    if ids is None:
        return [""] * inspection.d_sae
    return [" · ".join(repr(inspection.text(i))[1:-1] for i in row[:count]) for row in ids]


def activation_histogram(view, bins: list[tuple[float, float]]) -> pd.DataFrame:
    """The latent's activation histogram as bars from `low` to `high` (log-spaced bins)."""
    low, high = zip(*bins, strict=True) if bins else ((), ())
    return pd.DataFrame({"low": low, "high": high, "count": view.histogram[: len(bins)]})


def effects_frame(view) -> pd.DataFrame:
    """The tokens the latent raises most and lowers most, side by side."""
    rows = max(len(view.logit_top), len(view.logit_bottom))

    def column(pairs, i):
        return pairs[i] if i < len(pairs) else ("", math.nan)

    return pd.DataFrame({
        "Raises": [repr(column(view.logit_top, i)[0])[1:-1] for i in range(rows)],
        "by": [column(view.logit_top, i)[1] for i in range(rows)],
        "Lowers": [repr(column(view.logit_bottom, i)[0])[1:-1] for i in range(rows)],
        "by ": [column(view.logit_bottom, i)[1] for i in range(rows)],
    })  # fmt: skip


def log10_frequencies(inspection) -> np.ndarray:
    """log10 of each latent's firing frequency, never-fired latents at the floor firing_histogram drops."""
    frequency = inspection.table_arrays["frequency"].astype(np.float64)
    return np.log10(np.clip(frequency, 1e-10, None))


def shaded_text_html(tokens: list[str], acts: list[float], peak: int, scale: float) -> str:
    """An example's tokens as HTML spans shaded by the latent's activation (`scale` = full colour), the peak
    token outlined; every token's text escaped."""
    spans = []
    for i, (token, act) in enumerate(zip(tokens, acts, strict=True)):
        if token == "" and act == 0:
            continue  # outside the context
        alpha = 0.0 if scale <= 0 or not math.isfinite(act) else max(0.0, min(1.0, act / scale))
        style = f"background:rgba({SHADE_RGB[0]},{SHADE_RGB[1]},{SHADE_RGB[2]},{alpha:.2f});white-space:pre"
        if i == peak:
            style += ";outline:2px solid #b45309;border-radius:2px"
        text = html.escape(token.replace("\n", "↵"), quote=True)
        spans.append(f'<span class="sae-token" title="{act:.3g}" style="{style}">{text}</span>')
    return '<div class="sae-example" style="font-family:monospace;line-height:1.8">' + "".join(spans) + "</div>"
