"""Background tasks: `spawn` keeps each one referenced until it is done
(the event loop holds only a weak reference) and logs its failure.

A cancelled task is not a failure and is not logged. An owner that cancels
or awaits its tasks at shutdown passes its own set as `tasks`; the others
land in a module-wide set."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from functools import partial
from typing import Any, TypeVar

log = logging.getLogger("channels.tasks")

T = TypeVar("T")

# Tasks spawned without a set of their own: referenced here until done.
_RUNNING: set[asyncio.Task] = set()


def spawn(
    coro: Coroutine[Any, Any, T],
    *,
    name: str | None = None,
    tasks: set[asyncio.Task] | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.Task[T]:
    """Run `coro` as a task held in `tasks` (or a module-wide set) until it
    ends; an exception it ends with is logged, with its traceback."""
    task = (loop or asyncio.get_running_loop()).create_task(coro, name=name)
    keep = _RUNNING if tasks is None else tasks
    keep.add(task)
    task.add_done_callback(partial(_finished, keep))
    return task


def running() -> int:
    """How many spawned tasks without a set of their own are not done yet."""
    return len(_RUNNING)


def _finished(keep: set[asyncio.Task], task: asyncio.Task) -> None:
    keep.discard(task)
    if task.cancelled():
        return
    exc = task.exception()  # also marks it retrieved: asyncio does not log it again
    if exc is not None:
        log.error(
            "background task failed",
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"task": task.get_name()},
        )
