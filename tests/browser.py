"""The headless browser the page and report tests drive."""

from __future__ import annotations

import os
import shutil

import pytest


def chromium(what: str) -> str:
    """The Chromium binary; skips (saying `what` is then not tested) when there is none, unless
    METALLO_REQUIRE_BROWSER=1 (CI) makes that a failure."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("METALLO_REQUIRE_BROWSER") == "1":
        pytest.fail("METALLO_REQUIRE_BROWSER=1 but no chromium on PATH; install it (apt-get install chromium)")
    pytest.skip(f"headless Chromium is not installed (apt-get install chromium); {what}")
