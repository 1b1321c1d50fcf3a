"""The list envelope every collection answer of the control API uses."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

ItemT = TypeVar("ItemT")


class ListOf(BaseModel, Generic[ItemT]):
    # Subclassed per item type (`class KeyList(ListOf[KeyResponse])`) so that each list
    # keeps its own name in the OpenAPI document.
    object: Literal["list"] = "list"
    data: list[ItemT]
