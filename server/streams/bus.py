"""The bus configuration (``--bus``) and its errors, without the NATS client: the local default
imports nothing more (server.streams.jetstream is imported only for a nats:// bus)."""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from server.secret_files import SecretFileError, read_secret_file

__all__ = ["ENV", "BusConfig", "BusError", "FencedError", "read_credentials"]

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ENV = {"url": "MONOLITH_BUS", "credentials": "MONOLITH_BUS_CREDENTIALS", "tls_ca": "MONOLITH_BUS_TLS_CA",
       "tls_cert": "MONOLITH_BUS_TLS_CERT", "tls_key": "MONOLITH_BUS_TLS_KEY", "replica": "MONOLITH_REPLICA_ID"}


class BusError(RuntimeError):
    """The bus cannot be used as configured (unreachable, refused, misconfigured)."""


class FencedError(BusError):
    """Another writer has published to the delta stream since this one last did: this one must stop."""


@dataclass(frozen=True)
class BusConfig:
    """Where the streams live: ``url`` "local" (segment files) or NATS servers
    ("nats://h1:4222,h2:4222"); credentials and TLS files (paths only: never secrets on argv);
    ``replica`` names this serving host in subjects and metrics."""

    url: str = "local"
    credentials: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    replica: str = "r0"

    def __post_init__(self):
        if not NAME.match(self.replica):
            raise ValueError(f"replica id requires 1-64 of [A-Za-z0-9_-], got {self.replica!r}")
        if not self.local:
            for server in self.servers:
                if not re.match(r"^(nats|tls)://[^\s,/]+:\d+$", server):
                    raise ValueError(f"--bus requires 'local' or nats://host:port[,nats://host:port...], "
                                     f"got {server!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--bus-tls-cert and --bus-tls-key require each other")

    @property
    def local(self) -> bool:
        return self.url == "local"

    @property
    def servers(self) -> list[str]:
        return [] if self.local else [s.strip() for s in self.url.split(",") if s.strip()]

    @classmethod
    def from_env(cls, environ=os.environ) -> "BusConfig":
        values = {key: environ.get(name) for key, name in ENV.items()}
        return cls(url=values["url"] or "local", credentials=values["credentials"], tls_ca=values["tls_ca"],
                   tls_cert=values["tls_cert"], tls_key=values["tls_key"], replica=values["replica"] or "r0")

    def to_env(self) -> dict[str, str]:
        """The environment that makes ``from_env`` (in Triton's model processes) return this config."""
        env = {ENV["url"]: self.url, ENV["replica"]: self.replica}
        for key in ("credentials", "tls_ca", "tls_cert", "tls_key"):
            if getattr(self, key):
                env[ENV[key]] = str(getattr(self, key))
        return env

    def connect_options(self) -> dict:
        """nats.connect's options; reads every file named, raising BusError on the first bad one."""
        options: dict = {}
        if self.credentials:
            options.update(read_credentials(self.credentials))
        if self.tls_cert:
            try:
                read_secret_file(self.tls_key, "bus TLS key file")
            except SecretFileError as exc:
                raise BusError(str(exc)) from None
        if self.tls_ca or self.tls_cert:
            try:
                context = ssl.create_default_context(cafile=self.tls_ca)
                if self.tls_cert:
                    context.load_cert_chain(self.tls_cert, self.tls_key)
            except OSError as exc:  # ssl.SSLError too
                raise BusError(f"bus TLS files (--bus-tls-ca {self.tls_ca}, --bus-tls-cert {self.tls_cert}, "
                               f"--bus-tls-key {self.tls_key}) cannot be loaded: {exc}") from None
            options["tls"] = context
        return options


def read_credentials(path: str | os.PathLike) -> dict:
    """nats.connect options from a credentials file: a NATS .creds file (JWT + nkey seed), or
    two lines "user" and "password". The file must be private (server.secret_files)."""
    path = Path(path)
    try:
        text = read_secret_file(path, "bus credentials file").decode(errors="replace")
    except SecretFileError as exc:
        raise BusError(str(exc)) from None
    if "BEGIN NATS USER JWT" in text:
        try:
            import nkeys  # noqa: F401  (nats-py signs the server's nonce with it)
        except ImportError:
            raise BusError(f"bus credentials file {path} is a NATS .creds file, which requires the nkeys package "
                           "(not installed); use a user+password file (two lines) instead") from None
        return {"user_credentials": str(path)}
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 2:
        raise BusError(f"bus credentials file {path} requires a .creds file or two lines (user, password), "
                       f"got {len(lines)} non-empty lines")
    return {"user": lines[0], "password": lines[1]}
