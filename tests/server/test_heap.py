"""The loaded heap and the garbage collector: what the models hold is frozen out
of every collection's walk while the server serves (a full collection over it
held the interpreter, and every stream, for about 300 ms), and collectable
again once it stops. And the C heap: what a step frees is kept for the next
one's tensors, not handed back to the system to be mapped again."""

from __future__ import annotations

import gc
import platform
import subprocess
import sys

import pytest
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


# Eight blocks of 12 MiB alive at once (as a codec call's tensors are), written
# and freed, ten times after three rounds to settle: the page faults that costs,
# in a fresh interpreter. (The C heap's own calls: a tensor's small allocations
# beside its storage would make where the heap's top lies a matter of chance.)
ROUNDS = """
import ctypes, resource, sys
from wavecast.server.scheduler import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 12 << 20
def rounds(count):
    for _ in range(count):
        held = [libc.malloc(size) for _ in range(8)]
        for block in held:
            ctypes.memset(block, 1, size)
        for block in held:
            libc.free(block)
rounds(3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds(10)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_memory_is_kept_for_the_next_tensors() -> None:
    """By default glibc maps a large block on its own and unmaps it when freed,
    and hands the top of its heap back once more than twice the largest block
    it has freed is free there (64 MiB at most): each round maps its 96 MiB
    afresh (24,576 page faults). Kept, the rounds after the first fault none."""

    def faults(how: str) -> int:
        run = [sys.executable, "-c", ROUNDS, how]
        return int(subprocess.run(run, capture_output=True, check=True, text=True).stdout)

    assert faults("default") > 10 * 12_000
    assert faults("kept") < 2_000
