"""What the download buttons hand to Streamlit: a file opened only on click, metrics as CSV."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd


def file_reader(path: Path) -> Callable[[], io.BufferedReader]:
    """A zero-argument callable for st.download_button's deferred `data`: the file is opened only
    when the user clicks, never during a rerun."""

    def open_file() -> io.BufferedReader:
        # O_NOFOLLOW: a link swapped in after the page checked the file is refused, not followed.
        return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")

    return open_file


def metrics_csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode("utf-8")
