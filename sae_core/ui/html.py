"""HTML and Streamlit-markdown fragments: memory bars coloured by fill, and badges whose text cannot break out."""

from __future__ import annotations

from ..text import format_bytes

# Thresholds from the GPU-selector design: >90 % used is red, >70 % yellow, else green.
MEMORY_RED_ABOVE = 90.0
MEMORY_YELLOW_ABOVE = 70.0
_BAR_COLOURS = {"red": "#ef4444", "yellow": "#eab308", "green": "#10b981"}


def memory_fraction(used: float | None, total: float | None) -> float | None:
    if used is None or not total:
        return None
    return max(0.0, min(1.0, used / total))


def memory_colour(used: float | None, total: float | None) -> str:
    """'red' | 'yellow' | 'green' (grey when unknown)."""
    frac = memory_fraction(used, total)
    if frac is None:
        return "grey"
    percent = frac * 100
    if percent > MEMORY_RED_ABOVE:
        return "red"
    if percent > MEMORY_YELLOW_ABOVE:
        return "yellow"
    return "green"


def memory_bar_html(used: float | None, total: float | None) -> str:
    """A thin coloured bar with `used / total` under it, for st.html/markdown."""
    frac = memory_fraction(used, total) or 0.0
    colour = _BAR_COLOURS.get(memory_colour(used, total), "#9ca3af")
    label = f"{format_bytes(used)} / {format_bytes(total)}"
    return (
        f'<div class="sae-membar" data-colour="{memory_colour(used, total)}" '
        'style="background:#e5e7eb;border-radius:4px;height:8px;overflow:hidden">'
        f'<div style="width:{frac * 100:.1f}%;height:8px;background:{colour}"></div></div>'
        f'<div style="font-size:0.8em;color:#6b7280">Memory {label}</div>'
    )


def badge(text: str, colour: str) -> str:
    """Streamlit markdown badge; brackets in `text` are escaped so names cannot break it."""
    safe = text.replace("[", "(").replace("]", ")")
    return f":{colour}-badge[{safe}]"
