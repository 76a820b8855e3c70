"""The loaded heap and the garbage collector: what the models hold is frozen out
of every collection's walk while the server serves (a full collection over it
held the interpreter, and every stream, for about 300 ms), and collectable
again once it stops."""

from __future__ import annotations

import gc

from helpers import running_server, tiny_engines

from wavecast.clients import connect
from wavecast.protocol import Done


def walked(obj: object) -> bool:
    """Whether a collection visits ``obj`` (frozen objects are in no generation)."""
    return any(o is obj for o in gc.get_objects())


async def test_the_models_are_out_of_the_collectors_walk_while_serving() -> None:
    engine = tiny_engines()["tiny-musicgen"]
    async with running_server() as srv:
        assert gc.get_freeze_count() > 0
        assert not walked(engine) and not walked(engine.lm)
        async with connect(srv.url) as client:
            stream = await client.generate("tiny-musicgen", "x", duration=1.0, seed=1)
            events = [event async for event in stream]
        assert isinstance(events[-1], Done) and events[-1].status == "completed"
        # What requests allocate is walked, and collected, as ever.
        assert walked(events)
    assert walked(engine)  # the server stopped: collectable again
