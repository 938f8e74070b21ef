"""`server.listen` parsed once, in config: `127.0.0.1:8787`, `[::1]:8787`, `:8787` (every interface)
become a string that also knows its host and port."""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

_EXPECTED = (
    "expected HOST:PORT, or :PORT for every interface, such as 127.0.0.1:8787, :8787 or [::]:8787"
)


class Listen(str):
    """The listen address as written; `host` is None for every interface."""

    host: str | None
    port: int

    @classmethod
    def parse(cls, value: object) -> Listen:
        if isinstance(value, Listen):
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # `listen: 8787`
            raise ValueError("write the address in quotes as HOST:PORT, such as '127.0.0.1:8787', "
                             "or ':8787' for every interface")  # fmt: skip
        if not isinstance(value, str):
            raise ValueError(_EXPECTED)
        text = value.strip()
        host, sep, port = text.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
        # an IPv6 host is written in brackets, so its colons are not the port's
        if not (sep and port.isdigit() and int(port) <= 65535) or (
            not bracketed and any(c in host for c in ":[]")
        ):
            raise ValueError(_EXPECTED)
        made = cls(text)
        made.host = host.strip("[]") or None
        made.port = int(port)
        return made

    @property
    def everywhere(self) -> bool:
        """Every interface: `:PORT`, `0.0.0.0:PORT` or `[::]:PORT`."""
        return self.host in (None, "0.0.0.0", "::")

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse, serialization=core_schema.to_string_ser_schema()
        )


def is_loopback(host: str | None) -> bool:
    """Whether a listen host keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything
