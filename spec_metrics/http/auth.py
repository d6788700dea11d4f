"""HTTP basic auth for /metrics, with hashed secrets so no plaintext password sits in config.

A credential is `user:secret`, one per line in a file (blank lines and `#` comments skipped),
where `secret` is one of

    pbkdf2_sha256:<iterations>:<salt hex>:<hash hex>   salted, slow: for human passwords
    sha256:<hash hex>                                  fast: for long random scrape tokens
    plain:<password>                                   plaintext, when nothing else fits

`python -m spec_metrics.http.auth USER` reads a password and prints a `pbkdf2_sha256` line.
Checks compare digests in constant time, and an unknown user is checked against the first
user's secret, so it costs what a wrong password for that user costs. Successful checks are
remembered (by a digest of the header, a few entries): a scraper that sends the same header
every 15 s pays the slow hash once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import sys
import threading
from pathlib import Path
from typing import Mapping

__all__ = ["BasicAuth", "hash_password", "CHALLENGE"]

CHALLENGE = 'Basic realm="spec_metrics", charset="UTF-8"'
DEFAULT_ITERATIONS = 200_000
_CACHE_SIZE = 8


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS,
                  salt: bytes | None = None) -> str:
    """A `pbkdf2_sha256:...` secret for `password`, to put after `user:` in the auth file."""
    salt = os.urandom(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256:{iterations}:{salt.hex()}:{digest.hex()}"


class _Secret:
    """One parsed secret; `matches` hashes the candidate the same way and compares digests."""

    def __init__(self, spec: str, where: str) -> None:
        scheme, _, rest = spec.partition(":")
        self.iterations = 0
        self.salt = b""
        try:
            if scheme == "pbkdf2_sha256":
                iterations, salt, digest = rest.split(":")
                self.iterations, self.salt = int(iterations), bytes.fromhex(salt)
                self.digest = bytes.fromhex(digest)
                ok = self.iterations >= 1 and len(self.digest) == 32
            elif scheme == "sha256":
                self.digest = bytes.fromhex(rest)
                ok = len(self.digest) == 32
            elif scheme == "plain":
                self.digest = hashlib.sha256(rest.encode()).digest()
                ok = bool(rest)
            else:
                ok = False
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{where}: unreadable secret; use pbkdf2_sha256:<iterations>:<salt hex>:<hash hex>"
                " (python -m spec_metrics.http.auth USER prints one), sha256:<64 hex digits> or "
                "plain:<password>")

    def matches(self, password: bytes) -> bool:
        if self.iterations:
            candidate = hashlib.pbkdf2_hmac("sha256", password, self.salt, self.iterations)
        else:
            candidate = hashlib.sha256(password).digest()
        return hmac.compare_digest(candidate, self.digest)


class BasicAuth:
    """Users allowed to read /metrics: `BasicAuth({"prometheus": "sha256:..."})` or
    `BasicAuth.from_file(path)`. `check(authorization_header)` says whether to answer."""

    def __init__(self, users: Mapping[str, str]) -> None:
        if not users:
            raise ValueError("basic auth needs at least one user:secret")
        self._users: dict[str, _Secret] = {}
        for user, spec in users.items():
            if not user or ":" in user:
                raise ValueError(f"basic auth user {user!r}: must be non-empty, without ':'")
            self._users[user] = _Secret(spec, f"basic auth user {user!r}")
        # Hashed in place of a real secret when the user is unknown: same cost, same answer.
        self._decoy = next(iter(self._users.values()))
        self._verified: dict[bytes, None] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "BasicAuth":
        """Lines `user:secret`; blank lines and lines starting with `#` are skipped."""
        users: dict[str, str] = {}
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, spec = line.partition(":")
            if not sep:
                raise ValueError(f"{path}:{number}: expected user:secret")
            if user in users:
                raise ValueError(f"{path}:{number}: user {user!r} listed twice")
            users[user] = spec
        if not users:
            raise ValueError(f"{path}: no user:secret line")
        return cls(users)

    @property
    def users(self) -> tuple[str, ...]:
        return tuple(self._users)

    def check(self, authorization: str | None) -> bool:
        """True when the `Authorization` header names a known user with the right password."""
        if not authorization:
            return False
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        key = hashlib.sha256(authorization.encode("utf-8", "surrogateescape")).digest()
        with self._lock:
            if key in self._verified:
                return True
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        if not sep:
            return False
        secret = self._users.get(user.decode("utf-8", "replace"))
        ok = (secret or self._decoy).matches(password) and secret is not None
        if ok:
            with self._lock:
                if len(self._verified) >= _CACHE_SIZE:
                    self._verified.pop(next(iter(self._verified)))
                self._verified[key] = None
        return ok


def _main(argv: list[str]) -> int:
    import getpass

    if len(argv) != 1 or ":" in argv[0]:
        print("usage: python -m spec_metrics.http.auth USER  (prints USER:pbkdf2_sha256:...)",
              file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("empty password", file=sys.stderr)
        return 2
    print(f"{argv[0]}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
