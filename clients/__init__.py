"""Python clients for wavecast: async (:func:`connect`) and blocking (:class:`SyncClient`)."""

from .client import Client, GenerationResult, RequestStream, connect, server_url, stream_url
from .sync import SyncClient, SyncRequest

__all__ = [
    "Client",
    "GenerationResult",
    "RequestStream",
    "SyncClient",
    "SyncRequest",
    "connect",
    "server_url",
    "stream_url",
]
