"""A static KV cache: preallocated keys and values for a table of rows.

Keys and values live in ``[layers, rows, heads, T, head_dim]`` tensors allocated
once; each row keeps its own length. A decode step writes one position per row
and attends over all ``T`` positions with a per-row length mask, so its shapes
never change with the rows' lengths (what a captured graph needs). Rows grow the
table in powers of two; ``T`` grows when a row needs more (both copy, rarely).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from wavecast.protocol import Busy

from . import rowkernel
from .base import ModelLoadError
from .pipelining import upload

__all__ = [
    "CacheRows",
    "LayerMask",
    "StaticKV",
    "additive_mask",
    "auto_most",
    "check_room",
    "free_memory",
    "most_that_fit",
    "reserving",
    "room_for",
]

log = logging.getLogger(__name__)

GiB = float(2**30)
# Of the memory free, what a table reserved at load may take: the rest is left
# for the step's activations and the recorded graphs' pools.
ROOM_SHARE = 0.9


# ``--max-active``'s default (auto): at most this many requests on a device of
# each kind (a GPU's graphs are recorded at start-up for every count up to it;
# on a CPU the admission keeps fewer running where they would fall behind real
# time), their table taking at most this part of what is free for the model.
AUTO_MOST = {"cuda": 64, "cpu": 16}
AUTO_SHARE = 0.5
# On a CPU, a model whose one stream steps less than this many times faster than
# real time at warm-up gets at most AUTO_SLOW: warming up for more (the codec's
# and the context's costs measured over their rows) takes a minute and more
# there (musicgen-small on two cores: 101 s for 16, 31 s for 4), for crowds it
# could not keep in real time.
AUTO_FAST = 4.0
AUTO_SLOW = 4


def auto_most(device: torch.device | str, step_seconds: float, frame_rate: float) -> int:
    """The most requests ``--max-active``'s default takes on ``device`` for a model
    whose one stream stepped in ``step_seconds`` at warm-up (``run_once``)."""
    device = torch.device(device)
    most = AUTO_MOST.get(device.type, 1)
    if device.type == "cpu" and step_seconds * frame_rate * AUTO_FAST > 1.0:
        most = min(most, AUTO_SLOW)
    return most


def most_that_fit(need: Callable[[int], int], free: int | None, most: int) -> int:
    """``--max-active``'s default for a model: the most requests, a power of two
    up to ``most``, whose table (``need(n)`` bytes: ``check_room``'s) takes at
    most ``AUTO_SHARE`` of ``free`` bytes (None: not known, ``most``); one at
    least (``check_room`` then says whether even that fits)."""
    if free is None:
        return most
    fits = 1
    while 2 * fits <= most and need(2 * fits) <= AUTO_SHARE * free:
        fits *= 2
    return fits


def free_memory(device: torch.device | str) -> int | None:
    """Bytes free on ``device`` now: CUDA's free memory, or for the CPU the
    system's available memory (Linux); None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as info:
                for line in info:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_room(
    name: str, need: Callable[[int], int], requests: int, device: torch.device | str
) -> None:
    """Refuse, before reserving it, a table the device has no room for.

    ``need(n)``: the bytes a table for ``n`` requests takes (its cache, rounded
    up as it grows). Raises ``ModelLoadError`` naming what ``--max-active``
    asks for, what is free and how many requests would fit.
    """
    free = free_memory(device)
    if free is None or need(requests) <= ROOM_SHARE * free:
        return
    fits = 0  # the most requests, a power of two (as the table grows), that fit
    while (more := 2 * fits or 1) < requests and need(more) <= ROOM_SHARE * free:
        fits = more
    advice = f"{fits} fit (--max-active {fits})" if fits else "not even one fits"
    raise ModelLoadError(
        f"{name}: --max-active {requests} needs {need(requests) / GiB:.1f} GiB of "
        f"key/value cache and {device} has {free / GiB:.1f} GiB free; {advice}"
    )


def room_for(
    name: str,
    need: Callable[[int], int],
    requests: int,
    device: torch.device | str,
    share: float,
    most: int,
) -> int:
    """The requests a model's table is sized for: ``requests`` where given
    (``check_room``: refused where they do not fit), else (0: ``--max-active``'s
    default) ``most_that_fit`` in ``share`` of the memory free now (a server's
    models divide it, each sized before any reserves its table), up to ``most``
    (``auto_most``)."""
    if requests > 0:
        check_room(name, need, requests, device)
        return requests
    device = torch.device(device)
    free = free_memory(device)
    chosen = most_that_fit(need, None if free is None else int(share * free), most)
    check_room(name, need, chosen, device)
    log.info(
        "%s: up to %d requests at once (--max-active: as many as fit, up to %d on %s; "
        "their key/value cache %.2f GiB)",
        name,
        chosen,
        most,
        device.type,
        need(chosen) / GiB,
    )
    return chosen


@contextmanager
def reserving(name: str, requests: int) -> Iterator[None]:
    """The table reserved at load: where the memory runs out all the same (the
    estimate leaves room for the rest, not for everything), the load stops with
    one line rather than a ``busy`` no one asked for."""
    try:
        yield
    except Busy as exc:
        raise ModelLoadError(
            f"{name}: no memory to reserve --max-active {requests} requests' key/value "
            "cache; lower --max-active"
        ) from exc


class LayerMask:
    """An attention mask made once for all the layers of a forward.

    ``scaled_dot_product_attention`` turns a boolean mask into an additive one
    (0 where a query attends, -inf elsewhere, in the query's dtype) on every
    call, that is in every layer: three or four more operations a layer, and on
    a GPU as many more kernels a step. ``for_(q)`` makes that additive mask at
    the first layer, in the dtype of its queries (autocast's, where it is on),
    and hands the same tensor to the others: the same values as the call's own
    conversion, so the same attention.
    """

    __slots__ = ("_additive", "keep")

    def __init__(self, keep: torch.Tensor) -> None:
        self.keep = keep  # True where a query attends
        self._additive: torch.Tensor | None = None

    def for_(self, q: torch.Tensor) -> torch.Tensor:
        additive = self._additive
        if additive is None or additive.dtype != q.dtype:
            additive = self._additive = additive_mask(self.keep, q.dtype)
        return additive


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What attention makes of a boolean mask: 0 where ``keep``, -inf elsewhere."""
    additive = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return additive.masked_fill_(~keep, float("-inf"))


class StaticKV:
    """Keys and values of ``layers`` attention layers for ``rows`` rows."""

    def __init__(
        self,
        layers: int,
        heads: int,
        head_dim: int,
        *,
        rows: int,
        length: int,
        device: torch.device | str,
        dtype: torch.dtype,
        fill: int = 0,
    ) -> None:
        # Keys and values in one tensor ``[2, layers, rows, H, length, d]``: each
        # is contiguous, and a decode step writes a layer's both in one
        # operation (``step_pair_writer``; on a GPU, one kernel, not two).
        self._both = torch.zeros(
            (2, layers, rows, heads, length, head_dim), device=device, dtype=dtype
        )
        self.k, self.v = self._both.unbind(0)
        # How many positions each row holds (``fill`` for a fresh row).
        self.fill = fill
        self.lengths = torch.full((rows,), fill, dtype=torch.int64, device=device)
        self._views: dict[tuple[int, int | None], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._pairs: dict[int, list[torch.Tensor]] = {}
        self._tables: dict[int, rowkernel.PairTable | None] = {}

    @property
    def rows(self) -> int:
        return int(self.k.shape[1])

    def bytes_for(self, rows: int, length: int) -> int:
        """Bytes of the keys and values of ``rows`` rows (as many as ``grow`` makes
        room for: a power of two) of ``length`` positions."""
        rows = 1 << (max(rows, 1) - 1).bit_length()
        layers, _, heads, _, dim = (int(n) for n in self.k.shape)
        return 2 * layers * rows * heads * length * dim * int(self.k.element_size())

    @property
    def length(self) -> int:
        return int(self.k.shape[3])

    def grow(self, *, rows: int | None = None, length: int | None = None) -> None:
        """At least ``rows`` rows and ``length`` positions, keeping what is stored."""
        layers, old_rows, heads, old_length, dim = self.k.shape
        new_rows = max(old_rows, rows or 0)
        if new_rows > old_rows:
            new_rows = 1 << (new_rows - 1).bit_length()
        new_length = max(old_length, length or 0)
        if (new_rows, new_length) == (old_rows, old_length):
            return
        # The new table first: where the memory runs out, the cache stays as it
        # was (the rows in use go on) and the request that needed more ends ``busy``.
        try:
            both = self._zeros((2, layers, new_rows, heads, new_length, dim))
        except torch.OutOfMemoryError as exc:
            raise Busy("no memory for this request's key/value cache now; retry later") from exc
        both[:, :, :old_rows, :, :old_length] = self._both
        lengths = self.lengths
        if new_rows > old_rows:
            lengths = torch.cat([lengths, lengths.new_full((new_rows - old_rows,), self.fill)])
        self._both, self.lengths = both, lengths
        self.k, self.v = both.unbind(0)
        self._views.clear()
        self._pairs.clear()
        self._tables.clear()

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.k.new_zeros(shape)

    def layers(self, rows: int, span: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys and values ``[rows, H, span, d]``: the first ``rows``
        rows' first ``span`` positions (every position: None).

        Views, made once per shape until the cache grows: a decode step reads
        its layers' caches through them rather than slicing the cache again in
        every layer (two to four operations a layer, each a dispatch on a CPU).
        """
        views = self._views.get((rows, span))
        if views is None:
            k, v = self.k[:, :rows], self.v[:, :rows]
            if span is not None:
                k, v = k[:, :, :, :span], v[:, :, :, :span]
            views = list(zip(k.unbind(0), v.unbind(0), strict=True))
            if len(self._views) >= 256:  # (rows and spans are powers of two: a few)
                self._views.clear()
            self._views[(rows, span)] = views
        return views

    def write(
        self,
        layer: int,
        rows: torch.Tensor,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Store ``k``, ``v`` ``[R, H, S, d]`` of ``rows`` ``[R]`` at ``positions`` ``[R, S]``."""
        heads = torch.arange(k.shape[1], device=k.device)
        index = (rows[:, None, None], heads[None, :, None], positions[:, None, :])
        self.k[layer].index_put_(index, k.to(self.k.dtype))
        self.v[layer].index_put_(index, v.to(self.v.dtype))

    def step_writer(
        self, positions: torch.Tensor
    ) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
        """A decode step's writes, layer by layer: each of the first ``R`` rows' key
        and value ``[R, H, 1, d]`` at its position (``positions``: ``[R]``).

        ``scatter_`` where it is cheapest (float32, and on CUDA); a 16-bit cache on
        a CPU takes ``index_put_``, since there ``scatter_`` converts the whole
        layer to float32 and back (16 rows of bfloat16: 0.9 ms a write, not 11 µs).
        """
        rows = int(positions.shape[0])
        layers = self.layers(rows)
        _, _, heads, _, dim = (int(n) for n in self.k.shape)
        dtype, device = self.k.dtype, self.k.device
        if device.type != "cpu" or dtype == torch.float32:
            where = positions.view(rows, 1, 1, 1).expand(rows, heads, 1, dim)

            def scatter(layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
                keys, values = layers[layer]
                keys.scatter_(2, where, key.to(dtype))
                values.scatter_(2, where, value.to(dtype))

            return scatter
        index = (
            torch.arange(rows, device=device)[:, None],
            torch.arange(heads, device=device)[None, :],
            positions[:, None],
        )

        def put(layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
            keys, values = layers[layer]
            keys.index_put_(index, key[:, :, 0].to(dtype))
            values.index_put_(index, value[:, :, 0].to(dtype))

        return put

    def step_pair_writer(self, positions: torch.Tensor) -> Callable[[int, torch.Tensor], None]:
        """``step_writer`` for a decoder whose key and value lie side by side: each
        of the first ``R`` rows' ``[R, 2, H, 1, d]`` (its key, then its value, as
        a joint projection's output views them) at its position, both in one
        write (on a GPU, one kernel a layer rather than two). A 16-bit cache on
        a CPU writes them one by one (``step_writer``: ``index_put_`` there)."""
        rows = int(positions.shape[0])
        _, _, _, heads, _, dim = (int(n) for n in self._both.shape)
        dtype, device = self.k.dtype, self.k.device
        if device.type == "cpu" and dtype != torch.float32:
            write = self.step_writer(positions)

            def each(layer: int, pair: torch.Tensor) -> None:
                write(layer, pair[:, 0], pair[:, 1])

            return each
        views = self.pair_views(rows)
        table = self._pair_table(rows, positions)
        written = None if table is None else table.writer(positions)
        if written is not None:  # (torch's scatter works out every float's place)
            return written
        where = positions.view(1, rows, 1, 1, 1).expand(2, rows, heads, 1, dim)

        def scatter(layer: int, pair: torch.Tensor) -> None:
            views[layer].scatter_(3, where, pair.transpose(0, 1).to(dtype))

        return scatter

    def pair_views(self, rows: int) -> list[torch.Tensor]:
        """Each layer's keys and values of the first ``rows`` rows, as one view
        ``[2, rows, H, length, d]`` (made once per number of rows)."""
        views = self._pairs.get(rows)
        if views is None:
            views = list(self._both[:, :, :rows].unbind(1))
            if len(self._pairs) >= 64:
                self._pairs.clear()
            self._pairs[rows] = views
        return views

    def _pair_table(self, rows: int, positions: torch.Tensor) -> rowkernel.PairTable | None:
        """The first ``rows`` rows' tables as the row kernel writes a step's keys
        and values into them (on a CPU, outside a trace), checked once for each
        number of rows while the tensors stay; None where it does not."""
        if rowkernel.on_cpu(positions) is None:
            return None
        if rows not in self._tables:
            if len(self._tables) >= 64:
                self._tables.clear()
            kernel = rowkernel.built()
            views = self.pair_views(rows)
            self._tables[rows] = None if kernel is None else kernel.pair_table(views)
        return self._tables[rows]

    def clear(self, rows: list[int]) -> None:
        """Zero ``rows``' keys and values (a failed request's, before its row is reused)."""
        self._both[:, :, rows] = 0


class CacheRows:
    """What a batched decoder over a ``StaticKV`` (``self.kv``) says of its rows."""

    kv: StaticKV

    @property
    def rows(self) -> int:
        return self.kv.rows

    @property
    def length(self) -> int:
        """Positions a row can hold (the cache keeps one more: a spare position
        that inactive rows write to in a decode step)."""
        return self.kv.length - 1

    @property
    def lengths(self) -> torch.Tensor:
        """``[rows]``: how many positions each row holds."""
        return self.kv.lengths

    def held(self, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of ``row``'s first ``length`` positions (views):
        ``[layers, H, length, d]`` each."""
        return self.kv.k[:, row, :, :length], self.kv.v[:, row, :, :length]

    def empty(self, rows: list[int]) -> None:
        """``rows`` hold no position now (a new window's rows, whose first position
        goes in by a decode step)."""
        self.kv.lengths[upload({"rows": rows}, self.kv.lengths.device)["rows"]] = 0

    def hold(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put ``keys`` and ``values`` ``[layers, H, P, d]`` in ``row``'s first ``P``
        positions (room for them made already): the row then holds ``P``."""
        length = int(keys.shape[2])
        self.kv.k[:, row, :, :length] = keys
        self.kv.v[:, row, :, :length] = values
        self.kv.lengths[row] = length
