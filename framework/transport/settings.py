"""Connection settings from the environment, so the same code runs locally and in prod.

Secrets are read here and handed to nats-py; they are never logged or put in repr.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConnectionFailed

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_URL",
    "ConnectSettings",
    "check_url",
    "connect_timeout_from_env",
    "redact_url",
    "split_urls",
]

DEFAULT_URL = "nats://127.0.0.1:4222"
DEFAULT_CONNECT_TIMEOUT = 5.0
SCHEMES = ("nats", "tls", "ws", "wss")


def split_urls(url: str | Sequence[str] | None) -> list[str]:
    """`NATS_URL` may list several servers, comma separated, for a cluster."""
    if url is None:
        url = os.environ.get("NATS_URL") or DEFAULT_URL
    if isinstance(url, str):
        return [u.strip() for u in url.split(",") if u.strip()]
    return list(url)


def check_url(url: str) -> str:
    """Refuse what is not a NATS URL (`http://...`) with that reason, before connecting;
    a bare `host:port` is fine (nats-py reads it as `nats://`)."""
    scheme, sep, _ = url.partition("://")
    if sep and scheme.lower() not in SCHEMES:
        raise ConnectionFailed(
            f"wrong scheme {scheme + '://'!r} in {redact_url(url)}: a NATS URL starts with "
            f"{', '.join(s + '://' for s in SCHEMES)} (check NATS_URL or the URL passed)"
        )
    return url


def connect_timeout_from_env(env: Mapping[str, str] | None = None) -> float:
    """`NATS_CONNECT_TIMEOUT` in seconds, else `DEFAULT_CONNECT_TIMEOUT`."""
    raw = (os.environ if env is None else env).get("NATS_CONNECT_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_CONNECT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConnectionFailed(f"NATS_CONNECT_TIMEOUT={raw!r} is not a positive number of seconds")
    return value


def redact_url(url: str) -> str:
    """nats://user:pass@host:4222 -> nats://***@host:4222 (tokens too)."""
    scheme, sep, rest = url.rpartition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


@dataclass(frozen=True)
class ConnectSettings:
    """Where and how to connect; `from_env` reads the `NATS_*` variables."""

    servers: list[str] = field(repr=False)
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkey_seed_file: str | None = None
    nkey_seed: str | None = field(default=None, repr=False)
    creds_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # the first connection, in seconds
    url_from_env: bool = True  # the servers came from NATS_URL (or its default), not a caller

    @classmethod
    def from_env(
        cls, url: str | Sequence[str] | None = None, env: Mapping[str, str] | None = None
    ) -> ConnectSettings:
        env = os.environ if env is None else env
        servers = split_urls(url if url is not None else env.get("NATS_URL") or DEFAULT_URL)
        return cls(
            servers=[check_url(server) for server in servers],
            user=env.get("NATS_USER") or None,
            password=env.get("NATS_PASSWORD") or None,
            token=env.get("NATS_TOKEN") or None,
            nkey_seed_file=env.get("NATS_NKEY_SEED_FILE") or None,
            nkey_seed=env.get("NATS_NKEY_SEED") or None,
            creds_file=env.get("NATS_CREDS") or None,
            tls_ca=env.get("NATS_TLS_CA") or None,
            tls_cert=env.get("NATS_TLS_CERT") or None,
            tls_key=env.get("NATS_TLS_KEY") or None,
            connect_timeout=connect_timeout_from_env(env),
            url_from_env=url is None,
        )

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name in (
                "nkey_seed_file",
                "creds_file",
                "tls_ca",
                "tls_cert",
                "tls_key",
                "connect_timeout",
            )
        )
        servers = [redact_url(u) for u in self.servers]
        return f"ConnectSettings(servers={servers!r}, {shown})"

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        context = ssl.create_default_context(cafile=self.tls_ca)
        if self.tls_cert:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def nats_options(self) -> dict[str, Any]:
        """Keyword arguments for `nats.connect`, with only what is set."""
        options: dict[str, Any] = {"servers": self.servers}
        if self.user:
            options["user"] = self.user
            options["password"] = self.password or ""
        if self.token:
            options["token"] = self.token
        if self.nkey_seed_file:
            options["nkeys_seed"] = self.nkey_seed_file
        if self.nkey_seed:
            options["nkeys_seed_str"] = self.nkey_seed
        if self.creds_file:
            options["user_credentials"] = self.creds_file
        tls = self.tls_context()
        if tls is not None:
            options["tls"] = tls
        return options
