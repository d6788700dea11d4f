"""Serving /metrics: the loopback server and the WSGI/ASGI apps (server.py), the threaded
listener with deadlines and TLS (listener.py), basic auth (auth.py;
`python -m spec_metrics.http.auth USER` prints a secret line)."""
