"""The container → Litestar bridge: controllers resolve their services from the container."""

from __future__ import annotations

import inspect
from typing import Any

from litestar.datastructures import State
from litestar.di import Provide


async def resolve(provider: Any) -> Any:
    """Call a provider; those that depend on an async resource return an awaitable."""
    result = provider()
    if inspect.isawaitable(result):
        result = await result
    return result


def provide(name: str) -> Provide:
    """A Litestar dependency that returns the container's `name` provider's object."""

    async def dependency(state: State) -> Any:
        return await resolve(getattr(state.container, name))

    dependency.__name__ = f"provide_{name}"
    return Provide(dependency)
