"""channels_common.tasks.spawn: tasks stay referenced until done; failures
are logged once, cancellations and results are not."""

import asyncio
import gc
import logging

import pytest
from channels_common import tasks
from channels_common.tasks import spawn


async def test_an_unreferenced_task_runs_to_its_end():
    done = asyncio.Event()
    gate = asyncio.Event()

    async def work():
        await gate.wait()
        done.set()

    before = tasks.running()
    spawn(work(), name="unreferenced")  # the caller keeps nothing
    await asyncio.sleep(0)
    gc.collect()
    assert tasks.running() == before + 1
    gate.set()
    await asyncio.wait_for(done.wait(), 5)
    await asyncio.sleep(0)
    assert tasks.running() == before


async def test_a_task_is_kept_in_the_owners_set_until_done():
    mine: set[asyncio.Task] = set()
    gate = asyncio.Event()
    task = spawn(gate.wait(), tasks=mine)
    assert mine == {task}
    gate.set()
    await task
    await asyncio.sleep(0)
    assert mine == set()


async def test_a_failure_is_logged_with_its_traceback(caplog):
    async def broken():
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="channels.tasks"):
        task = spawn(broken(), name="broken-one")
        with pytest.raises(RuntimeError):
            await task
        await asyncio.sleep(0)
    failures = [r for r in caplog.records if r.name == "channels.tasks"]
    assert len(failures) == 1
    assert failures[0].task == "broken-one"
    assert failures[0].exc_info[0] is RuntimeError
    assert "boom" in caplog.text


async def test_cancellation_and_results_are_not_logged(caplog):
    mine: set[asyncio.Task] = set()

    async def answer():
        return 42

    with caplog.at_level(logging.DEBUG, logger="channels.tasks"):
        sleeper = spawn(asyncio.sleep(60), tasks=mine)
        answered = spawn(answer(), tasks=mine)
        await asyncio.sleep(0)
        sleeper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sleeper
        assert await answered == 42
        await asyncio.sleep(0)
    assert [r for r in caplog.records if r.name == "channels.tasks"] == []
    assert mine == set()


def test_spawn_on_a_given_loop_outside_it():
    loop = asyncio.new_event_loop()
    try:
        mine: set[asyncio.Task] = set()

        async def work():
            return "ran"

        task = spawn(work(), tasks=mine, loop=loop)
        assert mine == {task}
        assert loop.run_until_complete(task) == "ran"
        assert mine == set()
    finally:
        loop.close()
