"""Python clients for wavecast: async (:func:`connect`) and blocking (:class:`SyncClient`)."""

from .client import Client, GenerationResult, RequestStream, connect, stream_url
from .sync import SyncClient, SyncRequest

__all__ = [
    "Client",
    "GenerationResult",
    "RequestStream",
    "SyncClient",
    "SyncRequest",
    "connect",
    "stream_url",
]
