"""A blocking wrapper around the async client, for scripts and notebooks.

Example::

    with SyncClient("ws://127.0.0.1:5555/v1/stream") as client:
        result = client.generate("tiny-musicgen", "lofi beat", duration=5).collect()
"""

from __future__ import annotations

import asyncio
import os
import ssl as ssl_module
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from wavecast.protocol import Hello, ParamValue, ServerMessage

from .client import Client, GenerationResult, RequestStream, RetryHook, connect

__all__ = ["SyncClient", "SyncRequest"]

T = TypeVar("T")


async def _next(iterator: AsyncIterator[ServerMessage]) -> ServerMessage:
    return await anext(iterator)


class SyncRequest:
    """A request's events, as a blocking iterator."""

    def __init__(self, owner: SyncClient, stream: RequestStream) -> None:
        self._owner = owner
        self._stream = stream
        self.id = stream.id

    def __iter__(self) -> Iterator[ServerMessage]:
        iterator = self._stream.__aiter__()
        while True:
            try:
                yield self._owner._run(_next(iterator))
            except StopAsyncIteration:
                return

    def cancel(self) -> None:
        self._owner._run(self._stream.cancel())

    def send_text(self, text: str, *, flush: bool = False, end: bool = False) -> None:
        """``RequestStream.send_text``: more text of a ``text_stream`` request."""
        self._owner._run(self._stream.send_text(text, flush=flush, end=end))

    def end_text(self, text: str = "") -> None:
        self._owner._run(self._stream.end_text(text))

    def collect(self) -> GenerationResult:
        return self._owner._run(self._stream.collect())


class SyncClient:
    """Runs an async :class:`Client` on a private event-loop thread (``url`` and
    the rest: :class:`connect`'s)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        text: bool = False,
        open_timeout: float = 10.0,
        api_key: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        ssl: ssl_module.SSLContext | None = None,
        retry_for: float = 0.0,
        on_retry: RetryHook | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="wavecast-client", daemon=True
        )
        self._thread.start()
        try:
            self._client: Client = self._run(
                connect(
                    url,
                    text=text,
                    open_timeout=open_timeout,
                    api_key=api_key,
                    ca_file=ca_file,
                    ssl=ssl,
                    retry_for=retry_for,
                    on_retry=on_retry,
                    headers=headers,
                )._connect()
            )
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def hello(self) -> Hello:
        return self._client.hello

    def generate(self, model: str, prompt: str = "", **kwargs: ParamValue) -> SyncRequest:
        """Start a generation; see :meth:`Client.generate`."""
        stream = self._run(self._client.generate(model, prompt, **kwargs))  # type: ignore[arg-type]
        return SyncRequest(self, stream)

    def speak(self, model: str, text: str, **kwargs: Any) -> SyncRequest:
        """Start text to speech; see :meth:`Client.speak`."""
        stream = self._run(self._client.speak(model, text, **kwargs))
        return SyncRequest(self, stream)

    def close(self) -> None:
        try:
            self._run(self._client.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
