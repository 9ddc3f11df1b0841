"""Who may talk to `strongreid serve`: access tokens, the Host allow-list, bounded bodies.

Tokens. `strongreid gallery token --auth-file tokens.txt` draws a random 256-bit token, prints
it once and appends only its SHA-256 to the file (`sha256:<hex> <name>`, one per line). A
token that random needs no salt or key stretching: nobody can guess it, so its hash is enough
to keep a stolen file from being a key. The server compares the hash of what a client sends
with every stored hash in constant time (hmac.compare_digest, no early exit).

A client proves itself with `Authorization: Bearer <token>` (API use) or a session cookie the
page gets once, as Jupyter does: open `/?token=<token>` (the server sets the cookie and
redirects to `/`, so the token leaves the address bar and history) or type it into the page's
login box (POST /api/login). The cookie holds a random session id, never the token;
HttpOnly, SameSite=Strict, Secure behind https; sessions live for SESSION_SECONDS, in memory,
or, when several worker processes serve one port, in a SQLite file they share (a session made
by one worker is known to all, and a logout ends it in all).

Hosts. Every request's Host header must be in the allow-list (loopback names, plus
`--allowed-host`), which stops DNS rebinding: a hostile page whose name resolves to 127.0.0.1
still sends its own name as Host. State-changing requests with an Origin of another host are
refused as well.

Bodies. A body without Content-Length (chunked) is counted while it arrives and refused with
413 at the limit; it is held in memory up to the limit, never spooled.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from strongreid.errors import StrongReIDError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
COOKIE = "strongreid_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000
# Paths a client without a token may fetch: the page shell (no gallery data in it), its
# script and style, and the login step.
PUBLIC_PATHS = ("/", "/static/app.js", "/static/style.css", "/api/login")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY")]

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]],
                   Awaitable[None]]


def hash_token(token: str) -> str:
    """The at-rest form of a token: sha256 hex of its UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(auth_file: str | os.PathLike, name: str = "") -> str:
    """A new random token; its hash is appended to `auth_file` (created 0600). Returns the token."""
    name = name.strip() or time.strftime("token-%Y%m%dT%H%M%S")
    if any(ch.isspace() for ch in name):
        raise StrongReIDError(f"token name {name!r} must not contain spaces")
    token = secrets.token_urlsafe(32)
    path = Path(auth_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"sha256:{hash_token(token)} {name}\n")
    return token


def read_auth_file(auth_file: str | os.PathLike) -> list[tuple[str, str]]:
    """(name, sha256 hex) of every token in the file; '#' starts a comment."""
    path = Path(auth_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise StrongReIDError(f"cannot read the token file {path}: {exc.strerror}; create it with "
                              f"`strongreid gallery token --auth-file {path}`") from None
    out = []
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        digest, _, name = line.partition(" ")
        hexd = digest.removeprefix("sha256:")
        if not digest.startswith("sha256:") or len(hexd) != 64 or \
                any(c not in "0123456789abcdef" for c in hexd):
            raise StrongReIDError(f"{path} line {n}: expected 'sha256:<64 hex digits> name' as "
                                  "`strongreid gallery token` writes it (never a plain token)")
        out.append((name.strip() or f"line {n}", hexd))
    if not out:
        raise StrongReIDError(f"{path} holds no token: add one with "
                              f"`strongreid gallery token --auth-file {path}`")
    return out


class MemorySessions:
    """Session hashes and their expiry, in one process's memory (at most MAX_SESSIONS, the
    oldest dropped first)."""

    def __init__(self) -> None:
        self._expiry: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: str) -> None:
        with self._lock:
            self._expiry[key] = time.monotonic() + SESSION_SECONDS
            while len(self._expiry) > MAX_SESSIONS:
                self._expiry.popitem(last=False)

    def remove(self, key: str) -> None:
        with self._lock:
            self._expiry.pop(key, None)

    def valid(self, key: str) -> bool:
        with self._lock:
            expiry = self._expiry.get(key)
            if expiry is not None and expiry < time.monotonic():
                del self._expiry[key]
                expiry = None
        return expiry is not None


class SharedSessions:
    """Session hashes and their expiry (wall-clock seconds) in a SQLite file that several
    server processes share: what MemorySessions keeps for one process."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS sessions (hash TEXT PRIMARY KEY, expiry REAL)")

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # One short connection per call, closed at its end (sqlite3's own context manager only
        # commits): safe from any thread, and every process sees each commit at once.
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            yield db
        finally:
            db.close()

    def add(self, key: str) -> None:
        now = time.time()
        with self._db() as db:
            db.execute("DELETE FROM sessions WHERE expiry < ?", (now,))
            db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?)", (key, now + SESSION_SECONDS))
            # The oldest beyond MAX_SESSIONS go first (rowids grow with each insert).
            db.execute("DELETE FROM sessions WHERE rowid IN (SELECT rowid FROM sessions ORDER BY "
                       "rowid DESC LIMIT -1 OFFSET ?)", (MAX_SESSIONS,))

    def remove(self, key: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM sessions WHERE hash = ?", (key,))

    def valid(self, key: str) -> bool:
        with self._db() as db:
            row = db.execute("SELECT expiry FROM sessions WHERE hash = ?", (key,)).fetchone()
        return row is not None and row[0] >= time.time()


class TokenAuth:
    """Token hashes and the page's login sessions (in memory, or `SharedSessions`)."""

    def __init__(self, hashes: Iterable[tuple[str, str]],
                 shared: SharedSessions | None = None) -> None:
        self.hashes = list(hashes)
        self.sessions: MemorySessions | SharedSessions = shared or MemorySessions()

    @classmethod
    def from_file(cls, auth_file: str | os.PathLike,
                  shared: SharedSessions | None = None) -> TokenAuth:
        return cls(read_auth_file(auth_file), shared)

    def check_token(self, token: str) -> str | None:
        """The name of the token, or None; every stored hash is compared (constant time)."""
        digest = hash_token(token)
        found = None
        for name, stored in self.hashes:
            if hmac.compare_digest(digest, stored) and found is None:
                found = name
        return found

    def new_session(self) -> str:
        """A session id for the cookie; only its hash is kept."""
        sid = secrets.token_urlsafe(32)
        self.sessions.add(hash_token(sid))
        return sid

    def end_session(self, sid: str) -> None:
        self.sessions.remove(hash_token(sid))

    def check_session(self, sid: str) -> bool:
        # Looked up by the hash of a 256-bit random id: the lookup's timing says nothing useful.
        return self.sessions.valid(hash_token(sid))

    def authorized(self, headers: dict[bytes, bytes]) -> bool:
        """A valid bearer token or session cookie in the request headers."""
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return self.check_token(token.strip()) is not None
        sid = session_cookie(headers)
        return bool(sid) and self.check_session(sid)


def session_cookie(headers: dict[bytes, bytes]) -> str:
    raw = headers.get(b"cookie", b"").decode("latin-1")
    try:
        morsel = SimpleCookie(raw).get(COOKIE)
    except Exception:  # a malformed Cookie header is no session
        return ""
    return morsel.value if morsel else ""


def cookie_header(sid: str, secure: bool, max_age: int = SESSION_SECONDS) -> tuple[bytes, bytes]:
    """Set-Cookie for a session id (an empty id with max_age 0 clears it)."""
    parts = [f"{COOKIE}={sid}", "Path=/", "HttpOnly", "SameSite=Strict", f"Max-Age={max_age}"]
    if secure:
        parts.append("Secure")
    return b"set-cookie", "; ".join(parts).encode()


def is_loopback(host: str) -> bool:
    """`host` (a name or address to bind) only reaches this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str | None:
    """The name part of a Host header value (no port, lower case), or None when malformed."""
    value = value.strip().lower()
    if not value or any(ch in value for ch in "/\\@ ?#"):
        return None
    if value.startswith("["):  # [::1]:8000
        end = value.find("]")
        after = value[end + 1:] if end > 0 else "?"
        if after and not after.startswith(":"):
            return None
        name, rest = value[1:end], after[1:]
    elif value.count(":") > 1:  # a bare IPv6 address is not a Host value
        return None
    else:
        name, _, rest = value.partition(":")
    if rest and not rest.isdigit():
        return None
    return name.rstrip(".") or None


def allowed_hosts(extra: Iterable[str] = (), bind: str = "") -> frozenset[str]:
    """Loopback names, `--allowed-host` values and a specific bind address ('*': any host)."""
    names = {*LOOPBACK_HOSTS, *(h.strip().lower().strip("[]").rstrip(".") for h in extra)}
    if bind and bind not in ("0.0.0.0", "::", ""):
        names.add(bind.lower().strip("[]"))
    return frozenset(n for n in names if n)


class Guard:
    """ASGI middleware around the app: Host check, authentication, body limit, headers."""

    def __init__(self, app: ASGIApp, *, auth: TokenAuth | None, hosts: frozenset[str],
                 max_body: int) -> None:
        self.app, self.auth, self.hosts, self.max_body = app, auth, hosts, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *(h for h in SECURITY_HEADERS if h[0] not in names)]
            await send(message)

        headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.lower(), v)
        name = host_name(headers.get(b"host", b"").decode("latin-1"))
        if name is None:
            return await _json(send_with_headers, 400, "the request has no valid Host header")
        if "*" not in self.hosts and name not in self.hosts:
            return await _json(send_with_headers, 403, f"host {name!r} is not allowed: start "
                               f"the server with --allowed-host {name} if that is its name")
        method = scope["method"]
        origin = headers.get(b"origin")
        if origin is not None and method not in ("GET", "HEAD", "OPTIONS"):
            # Names only: a proxy may drop a non-default port from Host ($host in nginx).
            if host_name(urlsplit(origin.decode("latin-1")).netloc) != name:
                return await _json(send_with_headers, 403, "cross-origin requests are refused")
        path = scope["path"]
        if self.auth is not None:
            if path == "/" and method == "GET" and scope.get("query_string"):
                token = parse_qs(scope["query_string"].decode("latin-1")).get("token", [""])[0]
                if token:  # Jupyter's ?token=: one visit sets the cookie, then a clean URL
                    return await self._login_redirect(scope, token, send_with_headers)
            if path not in PUBLIC_PATHS and not self.auth.authorized(headers):
                return await _json(send_with_headers, 401, "authentication required: send "
                                   "'Authorization: Bearer <token>' or log in on the page",
                                   [(b"www-authenticate", b'Bearer realm="strongreid"')])
        length = headers.get(b"content-length")
        if length is not None:
            text = length.decode("latin-1")
            if not text.isdigit() or int(text) > self.max_body:
                return await _json(send_with_headers, 413, "the request is larger than the "
                                   f"{self.max_body}-byte limit")
        elif method in ("POST", "PUT", "PATCH"):
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body:
                    return await _json(send_with_headers, 413, "the request is larger than the "
                                       f"{self.max_body}-byte limit",
                                       [(b"connection", b"close")])
            receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send_with_headers)

    async def _login_redirect(self, scope: dict, token: str, send: Callable) -> None:
        headers = [(b"location", b"/"), (b"cache-control", b"no-store")]
        if self.auth.check_token(token) is not None:
            headers.append(cookie_header(self.auth.new_session(), scope.get("scheme") == "https"))
            status = 303
        else:
            return await _json(send, 401, "that token is not valid")
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


async def _json(send: Callable, status: int, detail: str,
                extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})


def login_response(auth: TokenAuth, token: str, secure: bool) -> tuple[int, list, dict[str, Any]]:
    """POST /api/login: (status, headers, body) for a typed-in token."""
    name = auth.check_token(token.strip())
    if name is None:
        return 401, [], {"detail": "that token is not valid"}
    return 200, [cookie_header(auth.new_session(), secure)], {"ok": True, "token_name": name}
