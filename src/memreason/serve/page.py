"""The trace-editor page: ``page.html`` (one file, inline CSS and JavaScript, shipped as package data) and
the headers it is served with.

The page loads nothing from elsewhere (no CDN, no fonts), so it works offline. It writes every piece of
model or user text with ``textContent`` (never ``innerHTML``), and the Content-Security-Policy allows only
its own inline script (by hash) and requests to this server: text that slipped into markup still could not
run a script or send anything anywhere.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
_STYLE = re.compile(r"<style>(.*?)</style>", re.DOTALL)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


@functools.lru_cache(maxsize=1)
def page() -> tuple[bytes, dict[str, str]]:
    """The page's bytes and its reply headers (CSP with the hashes of its one script and one style)."""
    html = resources.files("memreason.serve").joinpath("page.html").read_text(encoding="utf-8")
    scripts, styles = _SCRIPT.findall(html), _STYLE.findall(html)
    policy = ("default-src 'none'; script-src " + " ".join(_sha256(s) for s in scripts)
              + "; style-src " + " ".join(_sha256(s) for s in styles)
              + "; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
              "frame-ancestors 'none'")
    headers = {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-store", "X-Frame-Options": "DENY"}
    return html.encode("utf-8"), headers
