"""The queue is shared among clients: their requests start in turns, and a full
queue makes room for a client holding fewer of its places (server/scheduler.py's
``fair_order``)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import replace
from typing import Any

import pytest
from helpers import make_config, running_server, timeout
from websockets.asyncio.client import connect as ws_connect

from wavecast.protocol import Cancel, Done, Generate, Queued, Started, decode, encode
from wavecast.server.engines.base import EngineRequest
from wavecast.server.scheduler import Request, fair_order


def request(rid: str, client: str) -> Request:
    return Request(
        id=rid,
        model="m",
        engine_request=EngineRequest(rid, "", {}, {}),
        format="pcm_s16le",
        sink=lambda _: None,
        log=logging.LoggerAdapter(logging.getLogger(__name__), {}),
        client=client,
    )


def test_requests_start_in_turns_among_clients() -> None:
    # a1 runs; a2..a5 came first, then b1, b2, then c1.
    active = [request("a1", "a")]
    came = [request(r, r[0]) for r in ("a2", "a3", "a4", "a5", "b1", "b2", "c1")]
    order = [r.id for r in fair_order(collections.deque(came), active)]
    assert order == ["b1", "c1", "a2", "b2", "a3", "a4", "a5"]
    # One client alone: first come, first served, as before.
    alone = [request(f"a{i}", "a") for i in range(5)]
    assert [r.id for r in fair_order(collections.deque(alone), [])] == [r.id for r in alone]


def test_a_clients_streams_picked_up_take_its_first_places_in_its_turns() -> None:
    """A stream cut under way and asked again (``resume``) goes ahead of its
    client's requests not started, not ahead of another client's turn."""
    active = [request("a1", "a")]
    came = [request(r, r[0]) for r in ("a2", "a3", "b1", "a4", "b2")]
    came[3] = replace(came[3], resume=32000, picked_up=True)  # (a4: picked up where it was cut)
    # (b2: a file picked up before its first audio: its client has bytes, no frame)
    came[4] = replace(came[4], resume_until=0, picked_up=True)
    order = [r.id for r in fair_order(collections.deque(came), active)]
    assert order == ["b2", "a4", "b1", "a2", "a3"]


class Client:
    """A raw connection from ``address`` (a trusted proxy's X-Forwarded-For): each
    request's events, and when its ``started`` came."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: dict[str, list[Any]] = {}
        self.started_at: dict[str, float] = {}
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for frame in self.ws:
            message = decode(frame)
            rid = getattr(message, "id", None)
            if rid is None:
                continue
            self.events.setdefault(rid, []).append(message)
            if isinstance(message, Started):
                self.started_at[rid] = time.perf_counter()

    async def generate(self, rid: str, duration: float) -> None:
        frame = Generate(id=rid, model="tiny-musicgen", prompt=rid, params={"duration": duration})
        await self.ws.send(encode(frame))
        await self.until(rid, lambda e: isinstance(e, Queued | Done))

    async def until(self, rid: str, test: Any, seconds: float = 30) -> Any:
        for _ in range(int(timeout(seconds) * 100)):
            for event in self.events.get(rid, []):
                if test(event):
                    return event
            await asyncio.sleep(0.01)
        raise AssertionError(f"{rid}: {self.events.get(rid)}")


async def open_client(server: Any, headers: dict[str, str]) -> Client:
    ws = await ws_connect(server.url, additional_headers=headers)
    await ws.recv()  # the greeting
    return Client(ws)


# Two clients: two addresses (a trusted proxy names them), or, on a server with
# API keys, two keys (from the same address).
CLIENTS = {
    "address": [{"X-Forwarded-For": "10.0.0.1"}, {"X-Forwarded-For": "10.0.0.2"}],
    "key": [{"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}],
}


@pytest.mark.parametrize("by", ["address", "key"])
async def test_a_full_queue_makes_room_for_another_client_and_its_request_goes_first(
    by: str,
) -> None:
    config = make_config(max_active=1, max_queue=4, admission="slots")
    network = replace(config.network, forwarded_allow_ips=("127.0.0.1",))
    if by == "key":
        network = replace(network, api_keys=("key-a", "key-b"))
    config = replace(config, network=network)
    async with running_server(config) as server:
        a = await open_client(server, CLIENTS[by][0])
        b = await open_client(server, CLIENTS[by][1])
        await a.generate("a1", 60)  # runs
        await a.until("a1", lambda e: isinstance(e, Started))
        for rid in ("a2", "a3", "a4"):
            await a.generate(rid, 1)
        # A fifth of a's: the queue holds a's three and one place more.
        await a.generate("a5", 1)
        assert isinstance(a.events["a5"][0], Queued)
        # The queue is full: b's request takes the place of a's newest, and
        # goes before a's others (a has one running).
        await b.generate("b1", 1)
        first = b.events["b1"][0]
        assert isinstance(first, Queued) and first.position == 1, b.events["b1"]
        done = await a.until("a5", lambda e: isinstance(e, Done))
        assert done.status == "error" and done.error.code == "busy"
        assert "went to another client" in done.error.message
        # Each of a's queued requests moved a place back.
        moved = await a.until("a2", lambda e: isinstance(e, Queued) and e.position == 2)
        assert moved.position == 2
        # Even: a third of a's is refused outright (a holds 3 places, b 1).
        await a.generate("a6", 1)
        refused = a.events["a6"][0]
        assert isinstance(refused, Done) and refused.error is not None
        assert refused.error.code == "busy" and "another client" not in refused.error.message
        # a1 cancelled: b1 starts, then a's in their order.
        await a.ws.send(encode(Cancel(id="a1")))
        for rid in ("a2", "a3", "a4"):
            await a.until(rid, lambda e: isinstance(e, Done) and e.status == "completed", 60)
        await b.until("b1", lambda e: isinstance(e, Done) and e.status == "completed")
        starts = sorted([*a.started_at.items(), *b.started_at.items()], key=lambda kv: kv[1])
        assert [rid for rid, _ in starts] == ["a1", "b1", "a2", "a3", "a4"]
        for client in (a, b):
            await client.ws.close()
            await client.reader
