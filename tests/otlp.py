"""Test plumbing shared by the span-export tests: free loopback ports, a real OTLP/HTTP
receiver (oteltap) running on its own event-loop thread, and process clean-up; and a real
OTLP/HTTP metrics receiver that keeps each push whole (`MetricsReceiver`)."""

from __future__ import annotations

import asyncio
import http.server
import socket
import subprocess
import threading
import time
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def span_trace_id(span: Any) -> str:
    value = span.trace_id
    return value.hex() if isinstance(value, (bytes, bytearray)) else str(value)


def span_id_hex(span: Any) -> str:
    value = span.span_id
    return value.hex() if isinstance(value, (bytes, bytearray)) else str(value)


class OtlpReceiver:
    """oteltap's OTLP/HTTP receiver on 127.0.0.1:`port` (a free one by default), collecting
    every span it receives in `.spans`; `reemit_to` also forwards each raw export request
    there (oteltap's stream gives bare spans: the resource is only in the raw request)."""

    def __init__(self, port: int | None = None, reemit_to: str | None = None) -> None:
        from oteltap import OtelTapHttpProtobufReceiver, OtelTapHttpProtobufReceiverSettings

        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.endpoint}/v1/traces"
        self.spans: list[Any] = []
        options: dict[str, Any] = {"http_port": self.port}
        if reemit_to:
            options["reemit_traces_to_url"] = reemit_to
        self._receiver = OtelTapHttpProtobufReceiver(OtelTapHttpProtobufReceiverSettings(**options))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)

    async def _start(self) -> None:
        await self._receiver.start()
        self._collecting = asyncio.ensure_future(self._collect())
        await asyncio.sleep(0)  # subscribed before anything is sent

    async def _collect(self) -> None:
        async for span in self._receiver.stream_traces():
            self.spans.append(span)

    def span_keys(self) -> set[tuple[str, str]]:
        """(trace_id, span_id) in hex of every span received so far."""
        return {(span_trace_id(span), span_id_hex(span)) for span in list(self.spans)}

    def wait_for_spans(self, keys: set[tuple[str, str]], seconds: float = 20.0) -> bool:
        """Whether every (trace_id, span_id) in `keys` arrived within `seconds`."""
        deadline = time.monotonic() + seconds
        while not keys <= self.span_keys():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def trace_ids(self) -> set[str]:
        return {span_trace_id(span) for span in list(self.spans)}

    def wait_for(self, count: int, seconds: float = 20.0) -> list[Any]:
        """The spans once `count` arrived (or the time is up); waits a little more so that
        anything beyond `count` (a duplicate) would be there too."""
        deadline = time.monotonic() + seconds
        while len(self.spans) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        return list(self.spans)

    def wait_for_traces(self, trace_ids: set[str], seconds: float = 20.0) -> bool:
        deadline = time.monotonic() + seconds
        while not trace_ids <= self.trace_ids():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._receiver.stop(), self._loop).result(30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


def stop_process(process: subprocess.Popen) -> None:
    """Terminate, then kill if it does not go within 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class MetricsReceiver:
    """A real OTLP/HTTP metrics receiver on 127.0.0.1: POST /v1/metrics, protobuf decoded
    and kept per request (path and headers too). `hang`: read the request, never answer."""

    def __init__(self, hang: bool = False) -> None:
        self.requests: list[Any] = []  # ExportMetricsServiceRequest, one per push
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.release = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if hang:
                    receiver.release.wait(120)
                    return
                request = _metrics_request()
                request.ParseFromString(body)
                receiver.paths.append(self.path)
                receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                receiver.requests.append(request)
                answer = _metrics_response()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, count: int, seconds: float = 30.0) -> bool:
        deadline = time.monotonic() + seconds
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


def _metrics_request() -> Any:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    return ExportMetricsServiceRequest()


def _metrics_response() -> bytes:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceResponse,
    )

    return ExportMetricsServiceResponse().SerializeToString()
