"""CurveZMQ security: keypairs on disk, join tokens, allow-lists, and socket set-up.

Every node and the bootstrap have a Curve25519 keypair, kept in their `--state` (files
`<name>.key` with the public key and `<name>.key_secret` with both, pyzmq's certificate
format). A server only completes the CURVE handshake with clients whose public key is
on its `AllowList` (by default any client that has a keypair); a client must know the
server's public key before it connects. Everything after the handshake is encrypted and
authenticated by libzmq, and every message a secured RpcServer receives carries the
client's public key (`Envelope.peer_key`), which the services check against the node
the request speaks for (docs/RUNTIME.md, identity).

A join token (`JoinToken`) is what a new node needs to enter a swarm: the bootstrap's
public key (so the node can open a CURVE connection to the right server) and a secret
(so the bootstrap admits it). Text form: `atlas1-` + 64 hex digits of the key + 32 hex
digits of the secret, safe to paste into a shell.

Allow-lists are checked by a ZAP handler (ZeroMQ's authentication protocol): one
`zmq.auth.thread.ThreadAuthenticator` per ZeroMQ context, with one ZAP domain per
secured server, so several secured servers can share a process.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

Z85_KEY_LEN = 40  # a Curve25519 key in Z85 text


def _check_key(key: bytes | str, what: str) -> bytes:
    raw = key.encode("ascii") if isinstance(key, str) else key
    if not isinstance(raw, bytes) or len(raw) != Z85_KEY_LEN:
        raise ValueError(f"{what} must be a {Z85_KEY_LEN}-character Z85 Curve key, got {key!r:.60}")
    try:
        zmq.utils.z85.decode(raw)
    except (ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"{what} is not valid Z85: {key!r:.60}") from exc
    return raw


@dataclass(frozen=True, repr=False)
class Keypair:
    """A Curve25519 keypair in Z85 text (40 bytes each). repr hides the secret."""

    public: bytes
    secret: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "public", _check_key(self.public, "Keypair.public"))
        object.__setattr__(self, "secret", _check_key(self.secret, "Keypair.secret"))

    def __repr__(self) -> str:
        return f"Keypair(public={self.public.decode()!r})"

    @classmethod
    def generate(cls) -> Keypair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


TOKEN_PREFIX = "atlas1-"
_TOKEN_SECRET_BYTES = 16


@dataclass(frozen=True, repr=False)
class JoinToken:
    """The bootstrap's public key (Z85) and the swarm's admission secret (hex). repr hides the secret."""

    server_key: bytes
    secret: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "server_key", _check_key(self.server_key, "JoinToken.server_key"))
        if not isinstance(self.secret, str) or len(self.secret) != 2 * _TOKEN_SECRET_BYTES:
            raise ValueError(f"JoinToken.secret must be {2 * _TOKEN_SECRET_BYTES} hex digits")
        try:
            bytes.fromhex(self.secret)
        except ValueError:
            raise ValueError("JoinToken.secret must be hex digits") from None

    def __repr__(self) -> str:
        return f"JoinToken(server_key={self.server_key.decode()!r})"

    @classmethod
    def new(cls, server_key: bytes | str) -> JoinToken:
        return cls(_check_key(server_key, "server key"), secrets.token_hex(_TOKEN_SECRET_BYTES))

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        """The token printed by the bootstrap; ValueError says what is wrong (never echoes the secret)."""
        text = text.strip() if isinstance(text, str) else ""
        body = text[len(TOKEN_PREFIX) :]
        if not text.startswith(TOKEN_PREFIX) or len(body) != 64 + 2 * _TOKEN_SECRET_BYTES:
            raise ValueError(
                f"a join token is '{TOKEN_PREFIX}' and {64 + 2 * _TOKEN_SECRET_BYTES} hex digits "
                f"(as printed by 'atlas-node bootstrap'); got {len(text)} characters"
            )
        try:
            raw_key = bytes.fromhex(body[:64])
            bytes.fromhex(body[64:])
        except ValueError:
            raise ValueError("a join token has hex digits after its prefix") from None
        return cls(zmq.utils.z85.encode(raw_key), body[64:])

    def text(self) -> str:
        return TOKEN_PREFIX + zmq.utils.z85.decode(self.server_key).hex() + self.secret

    def admits(self, secret: str) -> bool:
        """Whether `secret` is this token's (constant-time comparison)."""
        return isinstance(secret, str) and hmac.compare_digest(secret.encode(), self.secret.encode())


def create_keypair(keys_dir: str | Path, name: str) -> Keypair:
    """Write `<name>.key` / `<name>.key_secret` in keys_dir (created if needed) and return them."""
    directory = Path(keys_dir)
    directory.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(str(directory), name)
    (directory / f"{name}.key_secret").chmod(0o600)
    return load_keypair(directory, name)


def load_keypair(keys_dir: str | Path, name: str) -> Keypair:
    """Read `<name>.key_secret` from keys_dir; ValueError names the missing or bad file."""
    path = Path(keys_dir) / f"{name}.key_secret"
    if not path.is_file():
        raise ValueError(f"no secret key file {path} (create one with create_keypair)")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot read keypair {path}: {exc}") from exc
    if secret is None:
        raise ValueError(f"{path} holds no secret key")
    return Keypair(public, secret)


def load_or_create_keypair(keys_dir: str | Path, name: str) -> Keypair:
    """The keypair `name` in keys_dir, created on first use."""
    path = Path(keys_dir) / f"{name}.key_secret"
    return load_keypair(keys_dir, name) if path.is_file() else create_keypair(keys_dir, name)


def load_public_keys(directory: str | Path) -> set[bytes]:
    """Every public key in the `*.key` files of a directory (an allow-list on disk)."""
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"allow-list directory {path} does not exist")
    return {_check_key(key, f"public key in {path}") for key in zmq.auth.load_certificates(str(path))}


class AllowList:
    """Public keys allowed to connect; safe to change while the authenticator thread reads it."""

    def __init__(self, keys: set[bytes | str] = frozenset(), allow_any: bool = False):
        self._keys = {_check_key(k, "allowed key") for k in keys}
        self._lock = threading.Lock()
        self.allow_any = allow_any

    def add(self, key: bytes | str) -> None:
        with self._lock:
            self._keys.add(_check_key(key, "allowed key"))

    def remove(self, key: bytes | str) -> None:
        with self._lock:
            self._keys.discard(_check_key(key, "allowed key"))

    def __contains__(self, key: bytes | str) -> bool:
        raw = key.encode("ascii") if isinstance(key, str) else key
        with self._lock:
            return raw in self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by pyzmq's authenticator with the client's Z85 public key."""
        return self.allow_any or key in self


_auth_lock = threading.Lock()
_authenticators: dict[int, ThreadAuthenticator] = {}


def _authenticator(context: zmq.Context) -> ThreadAuthenticator:
    """The one ZAP handler of this context, started on first use (it lives as long as the process)."""
    with _auth_lock:
        auth = _authenticators.get(id(context))
        if auth is None:
            auth = ThreadAuthenticator(context)
            auth.start()
            _authenticators[id(context)] = auth
        return auth


def secure_server(sock: zmq.Socket, keypair: Keypair, allow: AllowList) -> str:
    """Make `sock` (before bind) a CURVE server admitting only `allow`; returns its ZAP domain."""
    domain = f"atlas-{secrets.token_hex(6)}"
    _authenticator(sock.context).configure_curve_callback(domain=domain, credentials_provider=allow)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keypair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keypair.secret)
    return domain


def release_server(context: zmq.Context, domain: str) -> None:
    """Forget a stopped server's ZAP domain."""
    with _auth_lock:
        auth = _authenticators.get(id(context))
    if auth is not None:
        auth.credentials_providers.pop(domain, None)


def secure_client(sock: zmq.Socket, keypair: Keypair, server_key: bytes | str) -> None:
    """Make `sock` (before connect) a CURVE client of the server whose public key is `server_key`."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, _check_key(server_key, "server public key"))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keypair.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keypair.secret)
