"""DNS rebinding: on a loopback address, only requests for a local host name are answered.

A web page can point its own domain's DNS at 127.0.0.1 once loaded (DNS rebinding);
its requests to that domain then reach the API as same-origin requests, with no
``Origin`` header for `cors.Cors` to refuse, and the browser lets the page read the
answers. What gives them away is the ``Host`` header, which still names the page's
domain. Ollama (server/routes.go, allowedHostsMiddleware) answers such requests with
403 when it listens on a loopback address; vLLama does the same, with the same list of
hosts it takes: no ``Host`` at all, ``localhost`` and ``*.localhost``, ``*.local`` and
``*.internal``, this machine's host name, and IP addresses that are loopback, private,
unspecified (``0.0.0.0``) or one of this machine's, on any port. Listening on any other
address (``server.host: 0.0.0.0`` to serve a team), clients use whatever name reaches
it, and the check is off, as in Ollama: there, API keys (`auth`) guard the API.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

import psutil

from .limits import ASGIApp, Receive, Scope, Send, send_error

log = logging.getLogger("vllama.hosts")

LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
"""Names no public DNS serves, so no other site's page can be served under them (Ollama's list)."""


def is_loopback(host: str) -> bool:
    """Whether the address the API listens on (server.host, --host) is a loopback one."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name or address a ``Host`` header asks for, without its port and an IPv6 address's brackets."""
    if header.startswith("["):
        end = header.find("]")
        return header[1:end] if end > 0 else header
    if header.count(":") == 1:
        return header.partition(":")[0]
    return header  # no port, or a bare IPv6 address


def allowed(name: str) -> bool:
    """Whether a request for host `name` (see `host_name`) may be answered on a loopback address."""
    name = name.lower().rstrip(".")
    if name in ("", "localhost", "127.0.0.1", "::1"):  # nearly every request: no parsing, no syscall
        return True
    if name == socket.gethostname().lower() or name.endswith(LOCAL_SUFFIXES):
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified or name in local_addresses()


def local_addresses() -> set[str]:
    """This machine's IP addresses (read when needed: interfaces come and go)."""
    return {a.address.split("%")[0].lower() for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}


def refused_message(header: str) -> str:
    return (f"host {header!r} is not allowed: vllama listens on a loopback address and answers only "
            f"requests for localhost (DNS rebinding protection)")


def host_check(app: ASGIApp) -> ASGIApp:
    """`app` behind the check: a request for a host `allowed` refuses gets 403 before anything runs."""

    async def checked(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = _host_header(scope)
            if not allowed(host_name(header)):
                log.warning("403 for %s %s: host %r is not a local name (DNS rebinding protection)",
                            scope["method"], scope["path"], header)
                await send_error(send, scope["path"], 403, refused_message(header))
                return
        await app(scope, receive, send)

    return checked


def _host_header(scope: Scope) -> str:
    for key, value in scope.get("headers") or ():
        if key == b"host":
            return value.decode("latin-1")
    return ""
