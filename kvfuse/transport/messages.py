"""Dataclasses to protobuf messages and back, field by field, where the field names are the same."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

M = TypeVar("M", bound=Message)
D = TypeVar("D", bound="DataclassInstance")


def to_message(value: DataclassInstance, message_type: type[M], **overrides: Any) -> M:
    """A `message_type` with each field of `value` in the message field of the same name;
    `overrides` replace fields or set message fields the dataclass does not have."""
    fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    return message_type(**{**fields, **overrides})


def from_message(message: Message, cls: type[D], **overrides: Any) -> D:
    """A `cls` with each field read from the message field of the same name; `overrides`
    give fields instead (the ones the message does not have, or values to convert)."""
    names = [field.name for field in dataclasses.fields(cls) if field.name not in overrides]
    return cls(**{name: getattr(message, name) for name in names}, **overrides)
