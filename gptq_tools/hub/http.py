"""The HTTP client for file bytes: httpx2 (what huggingface_hub itself uses), tuned for large bodies.

httpcore reads a response 64 KiB at a time; each read goes through h11 and several generator layers,
which costs more CPU than the bytes themselves. Through httpcore's public ``network_backend`` extension
point, the sockets here are read up to 1 MiB at a time, which cuts the client's CPU per gigabyte by about
a third. Everything else (TLS, redirects, proxies from the environment, timeouts) is httpx2's own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpcore2
import httpx2

logger = logging.getLogger(__name__)

#: Bytes asked of the socket per read.
SOCKET_READ_BYTES = 1024 * 1024
#: Redirects followed per request (the Hub needs one: resolve -> CDN); more is a loop.
MAX_REDIRECTS = 10


class _LargeReadStream(httpcore2.NetworkStream):
    """A network stream that asks the socket for at least :data:`SOCKET_READ_BYTES` per read."""

    def __init__(self, inner: httpcore2.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max(max_bytes, SOCKET_READ_BYTES), timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore2.NetworkStream:
        return _LargeReadStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _LargeReadBackend(httpcore2.NetworkBackend):
    """httpcore's default synchronous backend, with :class:`_LargeReadStream` streams."""

    def __init__(self) -> None:
        self._inner = httpcore2.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore2.NetworkStream:
        return _LargeReadStream(self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore2.NetworkStream:
        return _LargeReadStream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _LargeReadTransport(httpx2.HTTPTransport):
    """httpx2's transport over a connection pool that uses :class:`_LargeReadBackend`."""

    def __init__(self, limits: httpx2.Limits) -> None:
        super().__init__(limits=limits)
        if not isinstance(getattr(self, "_pool", None), httpcore2.ConnectionPool):
            # httpx2 changed its internals: keep its stock pool (64 KiB reads: slower, still correct).
            logger.debug("httpx2 transport has no _pool ConnectionPool; using its default network backend")
            return
        self._pool = httpcore2.ConnectionPool(
            ssl_context=httpx2.create_ssl_context(), max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_LargeReadBackend())


class CappedStream(httpx2.SyncByteStream):
    """A response body that raises ``on_excess()`` once more than ``limit`` bytes have arrived.

    httpx2 reads a body whole before it is parsed; a body that is larger than anything its endpoint
    should send (or never ends) is cut off as it arrives, not after it has filled memory.
    """

    def __init__(self, inner: httpx2.SyncByteStream, *, limit: int, on_excess: Callable[[], Exception]) -> None:
        self._inner, self._limit, self._on_excess = inner, limit, on_excess

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for chunk in self._inner:
            seen += len(chunk)
            if seen > self._limit:
                raise self._on_excess()
            yield chunk

    def close(self) -> None:
        self._inner.close()


def make_client(headers: dict[str, str], *, connections: int, read_timeout: float,
                connect_timeout: float) -> httpx2.Client:
    """An httpx2 client for streaming file bytes: redirects followed (at most :data:`MAX_REDIRECTS`), no
    compression, large socket reads.

    Args:
        headers: sent with every request (auth, user agent).
        connections: size of the connection pool.
        read_timeout: seconds without a byte before a read fails (the stall timeout).
        connect_timeout: seconds to open a connection.
    """
    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx2.Timeout(read_timeout, connect=connect_timeout, pool=None)
    return httpx2.Client(headers={**headers, "Accept-Encoding": "identity"}, timeout=timeout, follow_redirects=True,
                         max_redirects=MAX_REDIRECTS, transport=_LargeReadTransport(limits))
