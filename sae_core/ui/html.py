"""HTML and Streamlit-markdown fragments: memory bars coloured by fill, and badges whose text cannot break out."""

from __future__ import annotations

import re
import string

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


# Inline markdown: emphasis, code, links, images, HTML, tables, strike, math, Streamlit's `:red[...]`.
_INLINE_MARKUP = set("\\`*_[]<>!|~${}")
# What makes markup at the start of a line: headings, lists, quotes, rules, setext underlines.
_LINE_MARKUP = set("#-+>=")
_LIST_NUMBER = re.compile(r"\d+[.)](\s|$)")
_SIGNED_NUMBER = re.compile(r"[-+]\d")  # -0.5 is a number, not a list item or a rule
# Links without brackets (GFM's `http://host`, `www.host`, `name@host`), `:smile:` emoji and `:material/x:`
# icons are found in the text after its escapes are undone, so escaping cannot stop them: an invisible word
# joiner splits their patterns instead (`http:⁠//host`, `www⁠.host`, `name⁠@host`, `:⁠smile:`).
WORD_JOINER = "\u2060"
_WWW_DOT = re.compile(r"(www)\.", re.IGNORECASE)


def md_text(value: object, multiline: bool = False) -> str:
    """`value` as markdown that renders as exactly this text: no heading, link, image or HTML can come from
    it (job names, errors, paths and commands are other people's words). Newlines become spaces, or line
    breaks with `multiline`."""
    lines = str(value).splitlines() or [""]
    escaped = [_escape_line(line) for line in lines]
    return "  \n".join(escaped) if multiline else " ".join(escaped)


def _escape_line(line: str) -> str:
    out = "".join(f"\\{ch}" if ch in _INLINE_MARKUP else ch for ch in line)
    out = out.replace(":", ":" + WORD_JOINER).replace("@", WORD_JOINER + "@")
    out = _WWW_DOT.sub(r"\1" + WORD_JOINER + ".", out)
    stripped = out.lstrip()
    indent = len(out) - len(stripped)
    if _LIST_NUMBER.match(stripped):  # "1. " or "2) " starts an ordered list; "0.0812" does not
        digits = len(stripped) - len(stripped.lstrip("0123456789"))
        return out[: indent + digits] + "\\" + out[indent + digits :]
    if stripped[:1] in _LINE_MARKUP and not _SIGNED_NUMBER.match(stripped):
        return out[:indent] + "\\" + stripped
    return out


class _EscapingFormatter(string.Formatter):
    def format_field(self, value: object, format_spec: str) -> str:
        return md_text(super().format_field(value, format_spec))


_ESCAPING = _EscapingFormatter()


def md(template: str, *values: object, **named: object) -> str:
    """`template` (our own markdown, in str.format syntax) with every value put in as text (md_text): the
    one way a page puts a value into a label, caption, message, metric or tooltip, all of which Streamlit
    renders as markdown. `md("**GPU {}** · {name}", 3, name=gpu.name)`."""
    return _ESCAPING.format(template, *values, **named)


def badge(text: str, colour: str) -> str:
    """Streamlit markdown badge whose text renders literally (brackets become parentheses: a badge ends at ])."""
    safe = md_text(text.replace("[", "(").replace("]", ")"))
    return f":{colour}-badge[{safe}]"
