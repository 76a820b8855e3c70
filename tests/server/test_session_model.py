"""Sessions under any order of generate, cancel and disconnect (Hypothesis).

Each example is a program run against a real server on the tiny model, over raw
WebSockets: a few connections open, send requests (some to be refused), cancel
them (some unknown), and drop. Whatever the order, every request a connection
still holds gets exactly one ``done`` and nothing after it, and when the dust
settles no request is left queued or running and no slot of the batched
decoder is still held.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from helpers import make_config, running_server, timeout, tiny_engines
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from wavecast.protocol import (
    Cancel,
    Done,
    ErrorMessage,
    Generate,
    Queued,
    ServerMessage,
    decode,
    encode,
)

CONNECTIONS = 3
IDS = ("a", "b", "c", "d")

op = st.one_of(
    st.tuples(
        st.just("generate"),
        st.integers(0, CONNECTIONS - 1),
        st.sampled_from(IDS),
        st.sampled_from([0.1, 1.0, 10.0, -1.0]),
    ),
    st.tuples(st.just("cancel"), st.integers(0, CONNECTIONS - 1), st.sampled_from(IDS)),
    st.tuples(st.just("disconnect"), st.integers(0, CONNECTIONS - 1)),
    st.tuples(st.just("sleep"), st.sampled_from([0, 5, 30])),
)


@dataclass
class Conn:
    ws: ClientConnection
    received: list[ServerMessage] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)  # generate ids, in order
    dropped: bool = False
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        try:
            async for frame in self.ws:
                self.received.append(decode(frame))
        except ConnectionClosed:
            pass


def held_slots() -> set[int]:
    """The tiny engine's slots held now (the engine is shared by the whole test
    session: other tests' unfinished jobs may hold some)."""
    engine = tiny_engines()["tiny-musicgen"]
    return {id(owner) for owner in engine._slots.owners if owner is not None}


async def program(server: Any, ops: list[tuple[Any, ...]]) -> None:
    held_before = held_slots()
    conns: list[Conn] = []
    for _ in range(CONNECTIONS):
        ws = await ws_connect(server.url)
        decode(await ws.recv())  # hello
        conn = Conn(ws)
        conn.reader = asyncio.create_task(conn.read())
        conns.append(conn)
    for step in ops:
        kind = step[0]
        if kind == "sleep":
            await asyncio.sleep(step[1] / 1000)
            continue
        conn = conns[step[1]]
        if conn.dropped:
            continue
        if kind == "generate":
            _, _, rid, duration = step
            message = Generate(id=rid, model="tiny-musicgen", params={"duration": duration})
            await conn.ws.send(encode(message))
            conn.sent.append(rid)
        elif kind == "cancel":
            await conn.ws.send(encode(Cancel(id=step[2])))
        else:
            conn.dropped = True
            await conn.ws.close()
    # Every request a live connection sent ends, each with its done.
    for conn in conns:
        if conn.dropped:
            continue

        def settled(c: Conn = conn) -> bool:
            return answers(c) == len(c.sent)

        for _ in range(int(timeout(30) / 0.02)):
            if settled():
                break
            await asyncio.sleep(0.02)
        check(conn)
        await conn.ws.close()
    for conn in conns:
        assert conn.reader is not None
        await conn.reader
    assert await server.scheduler.wait_idle(timeout(10))
    snapshot = server.scheduler.snapshot()
    assert (snapshot["queued"], snapshot["active"], snapshot["rendering"]) == (0, 0, 0)
    # A request leaves the queue before its slot is freed: allow the thread a moment.
    for _ in range(50):
        if held_slots() <= held_before:
            break
        await asyncio.sleep(0.02)
    assert held_slots() <= held_before, "a slot was leaked"


def answers(conn: Conn) -> int:
    """Terminal answers to generate frames: a done, or (for an id still in flight)
    a duplicate_id error (§6: the first request is left alone)."""
    dones = sum(isinstance(m, Done) for m in conn.received)
    duplicates = sum(
        isinstance(m, ErrorMessage) and m.code == "duplicate_id" for m in conn.received
    )
    return dones + duplicates


def check(conn: Conn) -> None:
    """Exactly one terminal answer per generate sent, and nothing for a request
    outside its life (between its queued and its done)."""
    in_flight: set[str] = set()
    for message in conn.received:
        rid = getattr(message, "id", None)
        if isinstance(message, Done):
            assert rid is not None
            in_flight.discard(rid)
        elif isinstance(message, Queued) and rid is not None:
            in_flight.add(rid)
        elif rid is not None and not isinstance(message, ErrorMessage):
            # started, progress, audio only for a request in flight
            assert rid in in_flight, f"{message.type} for {rid!r} outside its request"
    assert answers(conn) == len(conn.sent), (conn.sent, [m.type for m in conn.received])


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(st.lists(op, min_size=1, max_size=14))
# The cases that matter most, always tried first: a cancel in flight, a
# disconnect in flight, an id reused while in flight and once free, a refusal.
@example([("generate", 0, "a", 10.0), ("sleep", 30), ("cancel", 0, "a")])
@example([("generate", 1, "a", 10.0), ("generate", 1, "b", 10.0), ("disconnect", 1)])
@example([("generate", 0, "a", 1.0), ("generate", 0, "a", 0.1), ("sleep", 30), ("cancel", 0, "a")])
@example([("generate", 2, "c", -1.0), ("generate", 2, "c", 0.1), ("cancel", 2, "d")])
@example(
    [("generate", c, rid, 10.0) for c in range(CONNECTIONS) for rid in IDS]
    + [("sleep", 30), ("disconnect", 0), ("cancel", 1, "a"), ("cancel", 2, "b")]
)
def test_any_order_of_generate_cancel_and_disconnect(ops: list[tuple[Any, ...]]) -> None:
    async def run() -> None:
        async with running_server(make_config(max_active=2, max_queue=3)) as server:
            await asyncio.wait_for(program(server, ops), timeout(120))

    asyncio.run(run())
