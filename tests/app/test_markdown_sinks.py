"""Every text a page hands Streamlit to render as markdown is our own words or goes through the escaping helpers.

Streamlit renders markdown (links, images, autolinks) in far more than st.markdown: metric labels, values and
deltas, captions, alerts, toasts, tooltips (`help`), widget labels, radio/segmented/pill options, expander and
tab labels, page links, buttons, st.table cells (checked in a real browser: tests/app/test_hostile_text_browser.py).
This reads the source of every page and the router and names each call that passes such a widget anything
but a string literal, a value put in through `md`/`md_text`/`badge`, a number formatted as one, or a name
ending in `_md` (by convention: markdown we wrote or escaped).
"""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

PAGES = sorted((REPO / "views").glob("*.py")) + [REPO / "app.py"]

# Widget → the positions of its markdown arguments (keywords `label`, `help`, `body`, ... by name below).
MARKDOWN_POSITIONS: dict[str, tuple[int, ...]] = {
    **dict.fromkeys(
        (
            "markdown",
            "write",
            "caption",
            "title",
            "header",
            "subheader",
            "error",
            "warning",
            "info",
            "success",
            "toast",
            "expander",
            "popover",
            "spinner",
            "status",
        ),
        (0,),
    ),  # fmt: skip
    "metric": (0, 1, 2),
    **dict.fromkeys(
        (
            "button",
            "download_button",
            "link_button",
            "form_submit_button",
            "checkbox",
            "toggle",
            "radio",
            "selectbox",
            "multiselect",
            "text_input",
            "number_input",
            "text_area",
            "slider",
            "select_slider",
            "segmented_control",
            "pills",
            "date_input",
            "time_input",
            "file_uploader",
            "color_picker",
        ),
        (0,),
    ),  # fmt: skip
    "page_link": (),  # its label is a keyword
    "tabs": (0,),
}
MARKDOWN_KEYWORDS = {"label", "help", "body", "text", "captions"}
METRIC_KEYWORDS = {"value", "delta"}
# Widgets whose options render as markdown (a selectbox's and multiselect's options are plain text).
MARKDOWN_OPTIONS = {"radio", "segmented_control", "pills"}
# Escape what they are given (html.md, html.md_text, html.badge), or give numbers and units only.
SAFE_CALLS = {
    "md", "md_text", "badge", "format_bytes", "format_rate", "format_percent", "format_duration", "power_label",
}  # fmt: skip
SAFE_HTML_CALLS = {"memory_bar_html", "shaded_text_html"}  # HTML built from numbers, or escaped (html.escape)
NUMERIC_SPEC_TYPES = set("bcdeEfFgGnoxX%")
STR_METHODS_KEEPING_SAFETY = {"removesuffix", "removeprefix", "strip", "capitalize", "upper", "lower"}


def is_numeric_spec(spec: ast.expr | None) -> bool:
    """A format spec only numbers take (`:,`, `:.3g`, `:.0%`): a string there raises instead of rendering."""
    if not isinstance(spec, ast.JoinedStr) or not all(isinstance(v, ast.Constant) for v in spec.values):
        return False
    text = "".join(str(v.value) for v in spec.values)  # type: ignore[attr-defined]
    return bool(text) and (text[-1] in NUMERIC_SPEC_TYPES or text.endswith((",", "_")))


def call_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def is_safe(node: ast.expr | None, html_allowed: bool = False) -> bool:
    """Our own words (literals, module constants), escaped values, or numbers."""
    if node is None:
        return True
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Name):
        # A module constant is our own sentence; a name ending in _md holds markdown we wrote or escaped.
        return node.id.isupper() or node.id.endswith("_md")
    if isinstance(node, ast.Attribute):
        return node.attr == "__doc__"
    if isinstance(node, ast.JoinedStr):
        return all(
            isinstance(part, ast.Constant)
            or (isinstance(part, ast.FormattedValue) and (is_numeric_spec(part.format_spec) or is_safe(part.value)))
            for part in node.values
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return is_safe(node.left) and is_safe(node.right)
    if isinstance(node, ast.IfExp):
        return is_safe(node.body) and is_safe(node.orelse)
    if isinstance(node, ast.BoolOp):
        return all(is_safe(v) for v in node.values)
    if isinstance(node, ast.List | ast.Tuple):
        return all(is_safe(e) for e in node.elts)
    if isinstance(node, ast.Starred):
        return is_safe(node.value)
    if isinstance(node, ast.GeneratorExp | ast.ListComp):
        return is_safe(node.elt)
    if isinstance(node, ast.Call):
        return is_safe_call(node, html_allowed)
    return False


def is_safe_call(node: ast.Call, html_allowed: bool) -> bool:
    name = call_name(node.func)
    if name in SAFE_CALLS or (html_allowed and name in SAFE_HTML_CALLS):
        return True
    if isinstance(node.func, ast.Attribute):
        receiver = node.func.value
        if name in STR_METHODS_KEEPING_SAFETY:
            return is_safe(receiver)
        if name == "join" and isinstance(receiver, ast.Constant) and len(node.args) == 1:
            return is_safe(node.args[0])
    return False


def is_safe_format_func(node: ast.expr) -> bool:
    if isinstance(node, ast.Lambda):
        return is_safe(node.body)
    # {"d_sae": "d_sae", ...}.get: a table of our own labels
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "get"
        and isinstance(node.value, ast.Dict)
        and all(is_safe(v) for v in node.value.values)
    )


def unescaped_uses(source: str, file_name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, file_name)):
        if not isinstance(node, ast.Call):
            continue
        name = call_name(node.func)
        where = f"{file_name}:{node.lineno} {name}"
        if name == "table":
            found.append(f"{where}: st.table renders its cells as markdown; use st.dataframe")
            continue
        if name == "html":
            if not all(is_safe(a, html_allowed=True) for a in node.args):
                found.append(f"{where}: HTML from a value not escaped by an html helper")
            continue
        if name not in MARKDOWN_POSITIONS:
            continue
        html_allowed = any(k.arg == "unsafe_allow_html" for k in node.keywords)
        args = [a for i, a in enumerate(node.args) if i in MARKDOWN_POSITIONS[name]]
        keywords = MARKDOWN_KEYWORDS | (METRIC_KEYWORDS if name == "metric" else set())
        args += [k.value for k in node.keywords if k.arg in keywords]
        for arg in args:
            if not is_safe(arg, html_allowed):
                found.append(f"{where}: {ast.unparse(arg)[:80]}")
        if name in MARKDOWN_OPTIONS:
            format_func = next((k.value for k in node.keywords if k.arg == "format_func"), None)
            options = node.args[1] if len(node.args) > 1 else None
            if format_func is not None and not is_safe_format_func(format_func):
                found.append(f"{where}: format_func {ast.unparse(format_func)[:80]}")
            elif format_func is None and options is not None and not is_safe(options):
                found.append(f"{where}: options {ast.unparse(options)[:80]}")
    return found


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_every_markdown_widget_gets_escaped_text(path):
    assert unescaped_uses(path.read_text(), str(path.relative_to(REPO))) == []


@pytest.mark.parametrize(
    ("line", "flagged"),
    [
        ('st.metric("Submitted by", job.submitted_by)', True),
        ('st.metric("Submitted by", md_text(job.submitted_by))', False),
        ('c1.caption(f"{status.name} · util {format_percent(u)}")', True),
        ('c1.caption(md("{} · util {}", status.name, format_percent(u)))', False),
        ('st.success(f"Job {job_id} queued.")', True),
        ('st.success(f"Job {job_id:,} queued.")', False),
        ('st.button("Go", help=f"On this machine: {path}")', True),
        ('st.page_link("views/jobs.py", label=f"Open job {job.id}")', True),
        ('st.radio("Mode", modes, format_func=lambda m: m.title())', True),
        ('st.radio("Mode", ["a", "b"], format_func={"a": "A", "b": "B"}.get)', False),
        ('st.selectbox("Job", ids, format_func=lambda i: names[i])', False),  # options render as plain text
        ("st.expander(sae.name)", True),
        ('st.tabs([name, "Config"])', True),
        ("st.table(frame)", True),
        ("st.markdown(memory_bar_html(1, 2), unsafe_allow_html=True)", False),
        ("st.html(f'<b>{name}</b>')", True),
    ],
)
def test_the_scan_tells_escaped_from_unescaped(line, flagged):
    assert bool(unescaped_uses(line, "sample.py")) == flagged
