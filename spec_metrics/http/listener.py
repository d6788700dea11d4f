"""The listening side of the /metrics server: threads, deadlines, TLS, a connection bound.

The accept loop only accepts: the TLS handshake, the request and the response happen on one
thread per connection, each connection has a deadline (its socket is shut down past it, which
wakes whatever blocks on it), and past `max_connections` open at once new ones are closed
unanswered. So an idle or slow client costs one thread for at most `timeout` seconds; the
hooks never wait on the server at all.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from spec_metrics._support.log import logger

__all__ = ["make_tls_context", "DEFAULT_TIMEOUT", "DEFAULT_MAX_CONNECTIONS"]

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 16


def _no_key_password() -> bytes:
    # Called only for an encrypted key; without it OpenSSL would prompt on the terminal.
    raise ValueError("TLS: the private key is encrypted; give an unencrypted PEM key "
                     "(openssl pkey -in key.pem -out plain.pem) readable only by this process")


def make_tls_context(certfile: str | os.PathLike[str],
                     keyfile: str | os.PathLike[str] | None = None,
                     client_cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A server context: TLS 1.2 at least, the certificate chain of `certfile` (and its key,
    unless `certfile` holds it), client certificates required when `client_cafile` is set."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_key_password)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"TLS: cannot load certfile={os.fspath(certfile)!r} "
                         f"keyfile={keyfile and os.fspath(keyfile)!r}: {exc}; pass a PEM "
                         "certificate chain and its unencrypted PEM private key") from exc
    if client_cafile is not None:
        try:
            context.load_verify_locations(cafile=client_cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"TLS: cannot load client_cafile={os.fspath(client_cafile)!r}: "
                             f"{exc}; pass PEM CA certificates") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _NullErrors:
    """wsgi.errors: wsgiref prints a traceback there when a client stalls or goes away."""

    def write(self, text: str) -> None:
        logger.debug("metrics server: %s", text.rstrip())

    def flush(self) -> None:
        pass


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def get_stderr(self) -> Any:
        return _NullErrors()


class _Connection:
    """One accepted socket and its deadline: past it the socket is shut down, which wakes
    the thread blocked on it. The lock keeps the timer off a closed (maybe reused) fd."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.open = True
        self.expired = False
        self.timer = threading.Timer(timeout, self._expire)
        self.timer.daemon = True
        self.timer.start()

    def _expire(self) -> None:
        with self.lock:
            if self.open:
                self.expired = True
                try:
                    socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.timer.cancel()
        with self.lock:
            self.open = False
            try:
                if not self.expired:  # FIN after the response, as socketserver does
                    socket.socket.shutdown(self.sock, socket.SHUT_WR)
            except OSError:
                pass
            self.sock.close()


class ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper must never keep the engine process alive
    block_on_close = False
    ssl_context: ssl.SSLContext | None = None
    timeout_s = DEFAULT_TIMEOUT
    max_connections = DEFAULT_MAX_CONNECTIONS

    def server_activate(self) -> None:
        super().server_activate()
        self.slots = threading.BoundedSemaphore(self.max_connections)
        self.counts = dict.fromkeys(
            ("accepted", "refused_busy", "timed_out", "tls_failed", "errors"), 0)
        self.counts_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Reached only from the accept loop (e.g. no thread could be started).
        self.count("errors")
        logger.warning("metrics server: connection from %s dropped", client_address,
                       exc_info=True)

    def count(self, what: str) -> None:
        with self.counts_lock:
            self.counts[what] += 1

    def process_request(self, request: Any, client_address: Any) -> None:
        # The accept loop: never blocks on a client. Over the bound, close at once.
        if not self.slots.acquire(blocking=False):
            self.count("refused_busy")
            self.shutdown_request(request)
            return
        self.count("accepted")
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # Per-connection thread: the TLS handshake happens here, not in the accept loop.
        connection = _Connection(request, self.timeout_s)
        outcome = None
        try:
            request.settimeout(self.timeout_s)
            if self.ssl_context is not None:
                request = self.ssl_context.wrap_socket(
                    request, server_side=True, do_handshake_on_connect=False)
                connection.sock = request
                request.do_handshake()
            self.finish_request(request, client_address)
        except Exception as exc:  # one client's failure, never the server's
            outcome = ("timed_out" if isinstance(exc, TimeoutError)
                       else "tls_failed" if isinstance(exc, ssl.SSLError) else "errors")
            logger.debug("metrics server: connection from %s: %r", client_address, exc)
        finally:
            connection.close()
            if connection.expired:
                outcome = "timed_out"  # whatever error the shutdown caused on the way
            if outcome:
                self.count(outcome)
            self.slots.release()


class ThreadingServer6(ThreadingServer):
    address_family = socket.AF_INET6
