"""Fields added to a stored model after rows of it were written: left out of every dump while at their default.

A run's identity is the hash of its config's dump, and the report prints that dump and the store's rows as they
are. A new setting that appeared in every dump would rename every stored run (a resume would start it again) and
change every report. `added_later(...)` in place of `Field(...)`, on a model that inherits `OmitsAddedDefaults`,
keeps the field out of `model_dump` / `model_dump_json` while it holds its default: a config or row that does not
use it dumps byte for byte as before, and one that does is told apart. Reading fills the default back in.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, SerializationInfo, SerializerFunctionWrapHandler, model_serializer
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


def added_later(default: Any = PydanticUndefined, **kwargs: Any) -> Any:
    """`Field(default, **kwargs)` for a field added after rows without it were stored: omitted from a dump while
    it equals its default (on a model inheriting `OmitsAddedDefaults`)."""
    return Field(default, json_schema_extra={"added_later": True}, **kwargs)


def is_added_later(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and extra.get("added_later") is True


class OmitsAddedDefaults(BaseModel):
    """A model whose `added_later` fields are dumped only when they differ from their default."""

    @model_serializer(mode="wrap")
    def _omit_added_defaults(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        data = handler(self)
        if not isinstance(data, dict):
            return data
        for name, field in type(self).model_fields.items():
            key = field.serialization_alias or name if info.by_alias else name
            if is_added_later(field) and key in data \
                    and getattr(self, name) == field.get_default(call_default_factory=True):
                del data[key]
        return data
