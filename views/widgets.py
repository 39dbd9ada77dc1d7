"""Widgets shared by several pages (not a page itself: the router in app.py lists the pages)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from sae_core.files import SAE_ZIP_FILE
from sae_core.outputs import build_sae_zip, zip_is_current
from sae_core.text import format_bytes
from sae_core.ui.downloads import file_reader


def sae_download(container, sae_dir: Path, file_name: str, download_key: str, prepare_key: str) -> None:
    """Download button for the SAE zip, or a button that builds it first.

    The zip is built only when asked and opened only when the download is clicked (deferred data),
    so a multi-GB SAE is never read on a rerun."""
    zip_path = sae_dir / SAE_ZIP_FILE
    if zip_is_current(zip_path, sae_dir):
        container.download_button(
            f"Download SAE ({format_bytes(zip_path.stat().st_size)} zip)",
            data=file_reader(zip_path),
            file_name=file_name,
            mime="application/zip",
            on_click="ignore",
            key=download_key,
            icon=":material/download:",
            help=f"On this machine: {zip_path} (for files too large for a browser download, copy it from there)",
        )
    elif container.button("Prepare SAE download", key=prepare_key, icon=":material/folder_zip:"):
        with st.spinner("Packing cfg.json, weights, sparsity and eval into a zip…"):
            build_sae_zip(sae_dir)
        st.rerun()
