"""The shared URL's door: which password (if any) guards the app, and a constant-time check of a guess."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from typing import Any


def configured_password(env: Mapping[str, str], secrets_get: Callable[[str], Any] | None = None) -> str | None:
    """SAE_LAB_PASSWORD from the environment, else from st.secrets; None (or empty) = no gate."""
    value = env.get("SAE_LAB_PASSWORD")
    if not value and secrets_get is not None:
        try:
            value = secrets_get("SAE_LAB_PASSWORD")
        except Exception:  # no secrets.toml at all is the common case, not an error
            value = None
    return str(value) if value else None


def password_matches(given: str, expected: str) -> bool:
    """Constant-time compare, so response time does not leak how much of a guess was right."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
