"""Sphinx roles and RST double backquotes as Markdown code spans (no griffe: the tests use it too)."""

from __future__ import annotations

import re

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc|const):`(~?)([^`]+)`")
DOUBLE = re.compile(r"``(.+?)``", re.S)


def _role(m: re.Match[str]) -> str:
    tilde, target = m.groups()
    target = target.strip()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target.lstrip('.')}`"


def markdown(text: str) -> str:
    """A docstring with Sphinx roles and RST double backquotes as Markdown code spans."""
    return DOUBLE.sub(r"`\1`", ROLE.sub(_role, text))
