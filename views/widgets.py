"""Widgets shared by several pages (not a page itself: the router in app.py lists the pages)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from sae_core import ui_support


def sae_download(container, sae_dir: Path, file_name: str, download_key: str, prepare_key: str) -> None:
    """Download button for the SAE zip, or a button that builds it first.

    The zip is built only when asked and opened only when the download is clicked (deferred data),
    so a multi-GB SAE is never read on a rerun."""
    zip_path = sae_dir / ui_support.ZIP_NAME
    if ui_support.zip_is_current(zip_path, sae_dir):
        container.download_button(
            f"Download SAE ({ui_support.format_bytes(zip_path.stat().st_size)} zip)",
            data=ui_support.file_reader(zip_path),
            file_name=file_name,
            mime="application/zip",
            on_click="ignore",
            key=download_key,
            icon=":material/download:",
            help=f"On this machine: {zip_path} (for files too large for a browser download, copy it from there)",
        )
    elif container.button("Prepare SAE download", key=prepare_key, icon=":material/folder_zip:"):
        with st.spinner("Packing cfg.json, weights, sparsity and eval into a zip…"):
            ui_support.build_sae_zip(sae_dir)
        st.rerun()
