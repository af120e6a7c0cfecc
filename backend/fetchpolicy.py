"""Where image downloads may go: the host allow-list, the address guard, and pinned connections.

Light (httpx only); :mod:`backend.imagefetch` applies it to every hop of an image download.

- :class:`FetchPolicy` says which hosts besides Label Studio's own may serve images.
- :func:`blocked_address` says why an address may not be connected to. Cloud metadata services
  (169.254.169.254, fd00:ec2::254, 100.100.100.200) are refused in every spelling (IPv4-mapped,
  IPv4-compatible, 6to4, Teredo, NAT64) whatever ``allow_private`` says; so are link-local,
  unspecified and multicast addresses.
- :func:`resolve_checked` resolves a host once and checks every address it resolves to;
  :class:`PinnedTransport` then connects to the address that was checked (the URL's host is
  replaced by it, TLS still verifies the name), so a name that answers differently on a second
  lookup (DNS rebinding) is never looked up again between the check and the connection.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import httpx

from backend.errors import ConfigError

ENV_ALLOWED_HOSTS = "IMAGE_ALLOWED_HOSTS"
ENV_MAX_BYTES = "IMAGE_MAX_BYTES"
ENV_ALLOW_PRIVATE = "IMAGE_ALLOW_PRIVATE"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance metadata services (AWS, GCP and Azure use 169.254.169.254, inside link-local;
# AWS's IPv6 endpoint; Alibaba Cloud's, inside the 100.64.0.0/10 shared range).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254",
                                                                 "100.100.100.200"))
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# Why an address is refused, and whether IMAGE_ALLOW_PRIVATE can lift it.
PRIVATE_REASONS = ("private", "loopback", "reserved", "not globally routable")


class AddressRefused(Exception):
    """The host resolves to an address the policy refuses (message says which and why)."""


class ResolveFailed(Exception):
    """The host does not resolve; ``transient`` when the resolver asked to try again."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class FetchPolicy:
    """What :meth:`backend.imagefetch.ImageFetcher.fetch` may download.

    allowed_hosts: hosts besides Label Studio's own that images may come from: exact names
        ("cdn.example.com", "10.1.2.3"), wildcards ("*.example.com", subdomains only), optionally
        with a port ("images.local:8082" = that port only). The Label Studio token is never sent
        to them.
    max_bytes: largest body accepted.
    timeout: seconds for connecting, for each read/write, and for a whole response.
    allow_private: let allow-listed hosts resolve to private/loopback addresses (an image server on
        the internal network). Metadata services, link-local, unspecified and multicast addresses
        stay refused. Label Studio's own host is always allowed, wherever it is.
    """

    allowed_hosts: tuple[str, ...] = ()
    max_bytes: int = 50 * 2**20
    timeout: float = 30.0
    allow_private: bool = False

    def __post_init__(self):
        if isinstance(self.allowed_hosts, str):  # a comma-separated string from the environment
            hosts = tuple(h.strip() for h in self.allowed_hosts.replace(" ", ",").split(",") if h.strip())
            object.__setattr__(self, "allowed_hosts", hosts)
        else:
            object.__setattr__(self, "allowed_hosts", tuple(self.allowed_hosts))
        if self.max_bytes <= 0:
            raise ConfigError(f"{ENV_MAX_BYTES} must be positive, got {self.max_bytes}")
        if self.timeout <= 0:
            raise ConfigError(f"the image fetch timeout must be positive, got {self.timeout}")

    @classmethod
    def from_settings(cls, s) -> "FetchPolicy":
        """The operator's policy (a ``backend.config.ServeSettings``), for workers and prelabel alike."""
        return cls(allowed_hosts=s.allowed_hosts, max_bytes=s.image_max_bytes, allow_private=s.image_allow_private,
                   timeout=s.image_fetch_timeout)

    def allows_host(self, host: str, port: int | None) -> bool:
        host = norm_host(host)
        for entry in self.allowed_hosts:
            pattern, entry_port = _parse_host_entry(entry)
            if not pattern or (entry_port is not None and entry_port != port):
                continue
            if _same_address(host, pattern):  # one address, two spellings (::ffff:a9fe:a9fe)
                return True
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                    return True
            elif host == pattern:
                return True
        return False


def norm_host(host: str) -> str:
    return host.strip().lower().rstrip(".").strip("[]")


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def _parse_host_entry(entry: str) -> tuple[str, int | None]:
    """'host', '*.domain', 'host:port', '[v6]:port' or a URL -> (host pattern, port or None)."""
    entry = entry.strip()
    if "://" in entry:
        try:
            url = httpx.URL(entry)
        except Exception:
            return "", None
        return norm_host(url.host), url.port
    if entry.startswith("["):  # [v6] or [v6]:port
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return norm_host(host), int(port) if port.isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return norm_host(host), int(port)
    return norm_host(entry), None  # a bare IPv6 address has several colons: no port


def embedded_ipv4(ip: Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (mapped, compatible, 6to4, Teredo client, NAT64):
    connecting to it may reach them."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.append(ip.teredo[1])
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if any(ip in net for net in _NAT64) or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        found.append(low32)
    return found


def blocked_address(ip: Address, allow_private: bool) -> str | None:
    """Why this address may not be connected to, or None. Reasons in PRIVATE_REASONS are lifted
    by ``allow_private``; the others never are."""
    for candidate in (ip, *embedded_ipv4(ip)):
        if candidate in METADATA_ADDRESSES:
            return "cloud metadata service"
        if candidate.is_link_local:
            return "link-local (cloud metadata service range)"
        if candidate.is_unspecified:
            return "unspecified"
        if candidate.is_multicast:
            return "multicast"
    if allow_private:
        return None
    for candidate in (*embedded_ipv4(ip), ip):
        if candidate.is_loopback:
            return "loopback"
        if candidate.is_private:
            return "private"
        if candidate.is_reserved:
            return "reserved"
        if not candidate.is_global:
            return "not globally routable"
    return None


def resolve_checked(host: str, port: int, allow_private: bool) -> str:
    """Resolve ``host`` once and return the address to connect to, after checking every address
    it resolves to (one refused address refuses the host: a resolver may rotate them)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ResolveFailed(f"it does not resolve ({exc.strerror})", transient=exc.errno == socket.EAI_AGAIN) from None
    except (UnicodeError, OSError) as exc:
        raise ResolveFailed(f"it does not resolve ({exc})") from None
    addresses = []
    for info in infos:
        address = info[4][0].split("%", 1)[0]
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise AddressRefused("it resolves to an unreadable address") from None
        why = blocked_address(ip, allow_private)
        if why:
            hint = (f"; set {ENV_ALLOW_PRIVATE}=true if images really are served on your internal network"
                    if why in PRIVATE_REASONS else "")
            raise AddressRefused(f"it resolves to {address}, a {why} address{hint}")
        addresses.append(address)
    if not addresses:
        raise ResolveFailed("it resolves to no address")
    return addresses[0]


PIN_EXTENSION = "hybridgl_connect_to"  # request extension: the checked address to connect to


class PinnedTransport(httpx.BaseTransport):
    """Sends a request that carries the ``hybridgl_connect_to`` extension to that address instead
    of resolving its host again: the URL's host becomes the address, the Host header and TLS (SNI
    and certificate check) keep the name. Such connections are not kept alive, so that a TLS
    connection made for one name is never reused for another name on the same address."""

    def __init__(self, inner: httpx.BaseTransport):
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        address = request.extensions.get(PIN_EXTENSION)
        if address is None:
            return self.inner.handle_request(request)
        host = request.url.host
        headers = httpx.Headers(request.headers)
        headers["Host"] = request.headers.get("Host") or host
        headers["Connection"] = "close"
        extensions = {k: v for k, v in request.extensions.items() if k != PIN_EXTENSION}
        extensions.setdefault("sni_hostname", host)
        pinned = httpx.Request(request.method, request.url.copy_with(host=address), headers=headers,
                               stream=request.stream, extensions=extensions)
        return self.inner.handle_request(pinned)

    def close(self) -> None:
        self.inner.close()
