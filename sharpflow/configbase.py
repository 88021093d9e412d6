"""The base of every config model (pydantic v2): strict, no extra keys, no NaN or inf.

Separate from :mod:`sharpflow.config` so that an analysis module can declare its config section
next to its computation (:mod:`sharpflow.analyses`) without an import cycle. Imports no torch.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    #: Options added after a stage's results were first cached: dumped only when set to something
    #: other than their default, so adding an option changes no existing job's params (Snakemake
    #: would otherwise rerun every job whose config section gained the key).
    omit_at_default: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler: SerializerFunctionWrapHandler) -> Any:
        out = handler(self)
        for name in self.omit_at_default:
            if isinstance(out, dict) and getattr(self, name) == type(self).model_fields[name].default:
                out.pop(name, None)
        return out


Name = Annotated[str, Field(pattern=NAME_RE.pattern)]

__all__ = ["NAME_RE", "Name", "Strict"]
