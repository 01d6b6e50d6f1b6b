"""Where an outgoing webhook may go: the server-side request forgery guard.

A webhook URL is given by a tenant, and the dispatcher runs inside the deployment's network, so a
URL pointing at ``http://169.254.169.254/`` (cloud metadata), ``localhost`` or a private address
would make the dispatcher a proxy into that network. The rules (OWASP's SSRF prevention cheat
sheet, https://cheatsheetseries.owasp.org/cheatsheets/Server_Side_Request_Forgery_Prevention_Cheat_Sheet.html):

- ``https`` only; plain ``http`` only to a loopback address and only when
  ``KMSG_WEBHOOK_ALLOW_HTTP_LOOPBACK`` allows it (local development and tests);
- no user info in the URL;
- every address the host resolves to must be public (not private, loopback, link-local,
  multicast, reserved or unspecified) unless ``KMSG_WEBHOOK_ALLOW_PRIVATE`` says otherwise;
  checked when the endpoint is added and again before every delivery (DNS may change), and the
  delivery connects to the address that was checked (the host name goes in the ``Host`` header and
  the TLS server name), so a second, different DNS answer cannot redirect it (DNS rebinding);
- redirects are never followed, timeouts are short, and only the start of the response is read
  (:mod:`kmsg_worker.webhooks.dispatch`).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from kmsg_worker.errors import ValidationError
from kmsg_worker.settings import WebhookPolicy

__all__ = ["Resolver", "check_destination", "check_url"]

#: host, port -> the addresses it resolves to (``socket.getaddrinfo`` by default; tests pass their own).
Resolver = Callable[[str, int], list[str]]

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _system_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValidationError("url", "resolvable", f"the webhook host {host!r} does not resolve: {exc}") from None
    return [str(info[4][0]) for info in infos]


def _refused(ip: _IP) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _refused(ip.ipv4_mapped)
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def check_url(url: str) -> tuple[str, str, int]:
    """Check a URL's form; returns ``(scheme, host, port)``.

    Raises:
        ValidationError: On the ``url`` field: not http(s), no host, or user info.
    """
    if len(url) > 2000:
        raise ValidationError("url", "max_length", "the webhook URL is longer than 2,000 characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise ValidationError("url", "scheme", "the webhook URL must be https")
    if parts.username or parts.password:
        raise ValidationError("url", "no_userinfo", "the webhook URL must not carry a user name or password")
    host = parts.hostname
    if not host:
        raise ValidationError("url", "host", "the webhook URL has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise ValidationError("url", "port", "the webhook URL's port is invalid") from None
    return scheme, host, port


def check_destination(url: str, policy: WebhookPolicy, resolve: Resolver | None = None) -> str:
    """Refuse a URL the dispatcher must not reach (see the module's rules).

    Returns:
        The address to connect to: the first the host resolved to, all of which were checked.

    Raises:
        ValidationError: On the ``url`` field, naming the rule.
    """
    scheme, host, port = check_url(url)
    addresses = (resolve or _system_resolver)(host.strip("[]"), port)
    if not addresses:
        raise ValidationError("url", "resolvable", f"the webhook host {host!r} does not resolve")
    ips = [ipaddress.ip_address(a.split("%")[0]) for a in addresses]
    loopback = all(ip.is_loopback for ip in ips)
    if scheme == "http" and not (loopback and policy.allow_http_loopback):
        raise ValidationError("url", "scheme", "the webhook URL must be https (http only to loopback, when allowed)")
    if scheme == "https":
        refused = [str(ip) for ip in ips if _refused(ip)]
        if refused and not policy.allow_private:
            raise ValidationError(
                "url",
                "public_address",
                f"the webhook host {host!r} resolves to a private, loopback or link-local address ({refused[0]})",
            )
    # http reaches here only for loopback, explicitly allowed
    return str(ips[0])
