"""HTTPS and WSS from the server itself (``--tls-cert``, ``--tls-key``).

A browser gives a page on another computer its microphone and its audio decoders
(WebCodecs) only over https: the demo page's recording and its Opus, MP3 and FLAC
streams need it, unless a proxy in front ends TLS. The certificate and its key
are PEM files; a ``SIGHUP`` reads them again (a renewed certificate), and the
handshakes from then on present the new one while the open connections go on.
"""

from __future__ import annotations

import ssl
from pathlib import Path

__all__ = ["Certificates", "TlsError"]


class TlsError(ValueError):
    """A certificate or key that cannot be read or used (the message says which)."""


class Certificates:
    """The TLS context a server listens with, over ``cert`` (PEM: the certificate,
    then any intermediates; its key too where ``key`` is None) and ``key``.

    The listening context never changes; each handshake takes the context last
    loaded (an SNI callback switches to it), so that :meth:`reload` needs no new
    socket and leaves the open connections alone.

    Raises:
        TlsError: The files cannot be read, or the key is not the certificate's.
    """

    def __init__(self, cert: Path, key: Path | None = None) -> None:
        self.cert = cert
        self.key = key
        # (read once: the context listened with is the first one handshakes take)
        self.context = self.current = self._load()
        self.context.sni_callback = self._pick

    def reload(self) -> None:
        """Read the files again; the next handshakes use them. On an error the
        ones loaded before stay.

        Raises:
            TlsError: As at start.
        """
        self.current = self._load()  # (one reference replaced: safe across threads)

    def _pick(self, connection: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: object) -> None:
        connection.context = self.current

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        what = f"{self.cert} and {self.key}" if self.key else str(self.cert)
        for path in (self.cert, self.key):
            if path is not None and not path.is_file():
                raise TlsError(f"no such file: {path}")
        try:
            context.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:  # (an OSError too)
            raise TlsError(
                f"{what}: not a PEM certificate with its private key ({exc.reason or exc})"
            ) from None
        except OSError as exc:  # (OpenSSL's, with no file name)
            raise TlsError(f"cannot read {what}: {exc.strerror or exc}") from None
        return context
