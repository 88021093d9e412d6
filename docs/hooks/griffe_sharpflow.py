"""Griffe extension: read sharpflow's docstrings as they are written.

sharpflow's docstrings are Google style with Sphinx habits: ``:class:`~sharpflow.config.RunConfig```
roles, RST ````code```` and ``#:`` comments above module constants. This extension, run on every
package mkdocstrings loads, turns the roles and double backquotes into Markdown code spans (the
name as the role would show it) and makes a ``#:`` comment the docstring of the attribute below it.
The source files stay as they are.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import griffe

sys.path.insert(0, str(Path(__file__).parent))
from sharpflow_markup import markdown  # a sibling file, not a package


def _comment_above(attr: griffe.Attribute) -> str | None:
    """The ``#:`` lines right above an attribute's first line, joined."""
    try:
        lines = attr.lines_collection[attr.filepath]
    except (KeyError, TypeError):
        return None
    if not attr.lineno:
        return None
    found: list[str] = []
    i = attr.lineno - 2
    while i >= 0 and lines[i].lstrip().startswith("#:"):
        found.insert(0, lines[i].lstrip()[2:].strip())
        i -= 1
    return " ".join(found) or None


class SharpflowDocstrings(griffe.Extension):
    """Sphinx roles to Markdown; ``#:`` comments to attribute docstrings."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg)

    def _walk(self, obj: griffe.Object) -> None:
        if isinstance(obj, griffe.Attribute) and obj.docstring is None:
            comment = _comment_above(obj)
            if comment:
                obj.docstring = griffe.Docstring(comment, lineno=obj.lineno, parent=obj)
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member)
