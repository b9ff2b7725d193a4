"""Which webhook URLs may be called: http(s) to public addresses only, unless configured otherwise.

A URL is checked when a channel is saved and again, against the addresses its name resolves to, before
every request; the request then goes to the very address that was checked (a name that resolves to a
public address at the check and to a private one a moment later cannot redirect it: DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class UrlRefused(ValueError):
    """The URL may not be called (its reason is the message); ``permanent`` unless a name did not resolve
    (which may pass)."""

    def __init__(self, reason: str, permanent: bool = True) -> None:
        super().__init__(reason)
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    #: Loopback, link-local, private and other non-public addresses are allowed (tests, internal receivers).
    allow_private: bool = False
    #: Non-public networks allowed anyway.
    networks: Sequence[Network] = field(default_factory=tuple)

    @classmethod
    def of(cls, allow_private: bool, networks: Sequence[str]) -> UrlPolicy:
        return cls(allow_private, tuple(ipaddress.ip_network(n, strict=False) for n in networks))

    def allows(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_unspecified or address.is_multicast:
            return False
        if address.is_global or self.allow_private:
            return True
        return any(address in n for n in self.networks if n.version == address.version)


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int


def parse_url(url: str) -> Target:
    """The URL's parts, or :class:`UrlRefused` for anything but a plain absolute http(s) URL."""
    if len(url) > 2048:
        raise UrlRefused("is longer than 2048 characters")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise UrlRefused("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("must be an http:// or https:// URL")
    if not parts.hostname:
        raise UrlRefused("has no host")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("must not contain a user name or password (send credentials in customHeaders)")
    if parts.fragment:
        raise UrlRefused("must not have a fragment (#...)")
    if literal(parts.hostname) is None:
        try:
            parts.hostname.encode("idna")
        except UnicodeError:
            raise UrlRefused(f"has a host name that is not valid ({parts.hostname})") from None
    return Target(url, parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80))


def literal(host: str) -> IPAddress | None:
    """The address a host written as one names: standard forms, and the shorthand IPv4 forms resolvers also
    take (``127.1``, ``2130706433``, ``0x7f.0.0.1``)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host.isascii() and all(c.isalnum() or c == "." for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def check_saved(url: str, policy: UrlPolicy) -> None:
    """The check when a channel is saved: syntax, and an address written in the URL (names are resolved at
    each request, where the check that matters is made)."""
    target = parse_url(url)
    address = literal(target.host)
    if target.host.lower().rstrip(".") in ("localhost", "localhost.localdomain") and not policy.allow_private:
        raise UrlRefused("must not target this machine (localhost)")
    if address is not None and not policy.allows(address):
        raise UrlRefused(f"must not target a loopback, link-local or private address ({address})")


async def resolve(target: Target, policy: UrlPolicy) -> IPAddress:
    """The address to connect to: the first the host resolves to, if every one of them is allowed."""
    address = literal(target.host)
    if address is not None:
        found = [address]
    else:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise UrlRefused(f"{target.host} does not resolve ({exc})", permanent=False) from None
        found = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    refused = [a for a in found if not policy.allows(a)]
    if refused or not found:
        raise UrlRefused(
            f"{target.host} resolves to an address that may not be called ({refused[0] if refused else 'none'})"
        )
    return found[0]
