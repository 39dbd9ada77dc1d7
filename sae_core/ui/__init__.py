"""Pure presentation helpers for views/: formatting, HTML fragments, frames, chart specs, form parsing.
No Streamlit and no torch here, so every rule the pages rely on is unit-tested without a browser."""
