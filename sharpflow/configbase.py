"""The base of every config model (pydantic v2): strict, no extra keys, no NaN or inf.

Separate from :mod:`sharpflow.config` so that an analysis module can declare its config section
next to its computation (:mod:`sharpflow.analyses`) without an import cycle. Imports no torch.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


Name = Annotated[str, Field(pattern=NAME_RE.pattern)]

__all__ = ["NAME_RE", "Name", "Strict"]
