"""The egress proxy's mitmproxy addon: one decision per attempt, reported first.

Lifecycle of a connection from a sandbox (through its relay and the host
bridge; the proxy sees only TCP from 127.0.0.1):

1. `CONNECT host:port` (https, and http from Node) or an absolute-form
   request such as `GET http://host/` (http from Python and curl) is an
   attempt. `_decide` runs off the event loop, in a thread of `executor`:
   it authenticates the session from `Proxy-Authorization` (the session id
   and the token whose hash the policy in Redis holds; unknown, wrong or
   ended → 407), refuses IP literals, hosts off the allow-list and ports
   other than 443 and 80, resolves the name once and refuses non-public
   answers, pins the checked address for the name (see
   `enclave.egress.resolver`), and stores the `egress` event (plus an
   `egress.denied` audit row for a refusal) before it returns. Only then is
   the answer given: 403 with the reason in `X-Enclave-Egress-Reason`, or the
   tunnel (`200`) / the forwarded request. A checked (host, port) joins the
   destinations this client connection may dial.
2. Inside a tunnel, a TLS ClientHello whose SNI names another host than the
   CONNECT is refused. Hosts with a service binding of the session are
   intercepted: TLS is terminated with a certificate of the deployment's
   CA. Every other TLS connection passes through untouched (certificate
   pinning keeps working). Plain HTTP in a tunnel is parsed, so that its
   Host header can be held to the CONNECT host.
3. Every request the proxy forwards loses its `Proxy-Authorization`; on an
   intercepted connection it gets the binding's header, overwriting what the
   sandbox sent. Bindings are applied over TLS only, never sent in clear.
4. `server_connect` is the last gate: a connection to anything but a checked
   destination of the same client connection is refused there, whatever
   layer asked for it.

Per-connection state lives on the event loop and is dropped when the client
disconnects; everything blocking (Redis, DNS, the database) runs in the
executor.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import redis
from mitmproxy import http

from enclave.egress import hosts
from enclave.egress.bindings import Binding, BindingConfig
from enclave.egress.policy import Policy, load_policy
from enclave.egress.resolver import Pins, Resolver, install_pinned_resolver
from enclave.events.sink import SessionSink

logger = logging.getLogger(__name__)

REASON_HEADER = "X-Enclave-Egress-Reason"
REALM = 'Basic realm="enclave egress"'

# Why an attempt was refused, as events, audit rows and the 403 report it.
IP_LITERAL = "ip_literal"
INVALID_HOST = "invalid_host"
HOST_NOT_ALLOWED = "host_not_allowed"
PORT_NOT_ALLOWED = "port_not_allowed"
HOST_MISMATCH = "host_mismatch"
SNI_MISMATCH = "sni_mismatch"

_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Decision:
    """The outcome of one attempt; `policy` is None when authentication failed."""

    policy: Policy | None
    host: str
    port: int
    reason: str | None = None
    binding: Binding | None = None
    # The attempt could not be judged (Redis or the database failed).
    unavailable: bool = False

    @property
    def allowed(self) -> bool:
        return self.policy is not None and self.reason is None and not self.unavailable


@dataclass
class _Client:
    """What the proxy knows about one client connection."""

    tunnel: Decision | None = None
    destinations: set[tuple[str, int]] = field(default_factory=set)
    refused: str | None = None


class EgressAddon:
    def __init__(
        self,
        *,
        client: redis.Redis,
        bindings: BindingConfig,
        resolver: Resolver,
        executor: Executor,
        pins: Pins | None = None,
    ) -> None:
        self.redis = client
        self.bindings = bindings
        self.resolver = resolver
        self.executor = executor
        self.pins = pins or Pins()
        self._clients: dict[str, _Client] = {}

    # -- mitmproxy hooks ----------------------------------------------------------

    def running(self) -> None:
        install_pinned_resolver(asyncio.get_running_loop(), self.pins)

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        state = self._client(flow.client_conn.id)
        decision = await self._run(
            self._decide,
            flow.request.headers.get("Proxy-Authorization"),
            flow.request.host,
            flow.request.port,
            None,
        )
        response = _refusal(decision)
        if response is not None:
            flow.response = response
            return
        state.tunnel = decision
        state.destinations.add((decision.host, decision.port))

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = self._client(flow.client_conn.id)
        request = flow.request
        credentials = request.headers.pop("Proxy-Authorization", None)

        if state.tunnel is not None:
            tunnel = state.tunnel
            target = hosts.split_authority(request.host_header or "", tunnel.port)
            if target != (tunnel.host, tunnel.port):
                shown = target[0] if target else (request.host_header or "")
                _refuse(flow, _forbidden(HOST_MISMATCH))
                await self._run(self._report_refusal, tunnel, shown, HOST_MISMATCH)
                return
            decision = tunnel
        else:
            decision = await self._run(
                self._decide,
                credentials,
                request.host,
                request.port,
                request.host_header,
            )
            response = _refusal(decision)
            if response is not None:
                _refuse(flow, response)
                return
            state.destinations.add((decision.host, decision.port))

        if decision.binding is not None and request.scheme == "https":
            request.headers[decision.binding.header] = decision.binding.header_value()

    async def tls_clienthello(self, data) -> None:
        state = self._client(data.context.client.id)
        tunnel = state.tunnel
        if tunnel is None:
            # TLS spoken to the proxy itself, outside any tunnel: nothing was
            # checked, so the connection goes nowhere (see server_connect).
            state.refused = "tls outside a tunnel"
            data.ignore_connection = True
            return

        sni = data.client_hello.sni
        if sni is not None and hosts.canonical_host(sni) != tunnel.host:
            state.refused = SNI_MISMATCH
            data.ignore_connection = True
            await self._run(
                self._report_refusal, tunnel, hosts.canonical_host(sni), SNI_MISMATCH
            )
            return
        # Only a bound host is worth opening; anything else passes through.
        if tunnel.binding is None or tunnel.port != 443:
            data.ignore_connection = True

    def server_connect(self, data) -> None:
        state = self._clients.get(data.client.id)
        address = data.server.address
        destination = (
            (hosts.canonical_host(str(address[0])), int(address[1]))
            if address
            else None
        )
        if state is None or state.refused or destination not in state.destinations:
            data.server.error = "the destination was not allowed by the egress policy"

    def client_disconnected(self, client) -> None:
        self._clients.pop(client.id, None)

    # -- decisions, off the event loop ---------------------------------------------

    def _decide(
        self,
        credentials: str | None,
        host: str,
        port: int,
        host_header: str | None,
    ) -> Decision:
        host = hosts.canonical_host(host)
        try:
            policy = self._authenticate(credentials)
        except redis.RedisError:
            logger.exception("egress policy unreadable")
            return Decision(None, host, port, unavailable=True)
        if policy is None:
            return Decision(None, host, port)

        reason = None
        if host_header is not None:
            target = hosts.split_authority(host_header, port)
            if target != (host, port):
                reason = HOST_MISMATCH
        if reason is None:
            reason = self._refusal_reason(policy, host, port)
        binding = None
        if reason is None:
            binding = self._binding(policy, host)

        decision = Decision(policy, host, port, reason=reason, binding=binding)
        try:
            self._report(policy, host, decision.allowed, reason)
        except Exception:
            # Whatever failed (the database, Redis), an attempt that is not in
            # the session's log must not go ahead.
            logger.exception(
                "egress attempt not reported, refused session_id=%s",
                policy.session_id,
            )
            return Decision(policy, host, port, unavailable=True)
        return decision

    def _authenticate(self, credentials: str | None) -> Policy | None:
        session_id, token = _basic_credentials(credentials)
        if session_id is None or not _SESSION_ID.match(session_id):
            logger.info("egress attempt without usable proxy credentials")
            return None
        policy = load_policy(self.redis, session_id)
        if policy is None or not policy.accepts(token):
            logger.info(
                "egress attempt refused: no such running session or a wrong "
                "token session_id=%s",
                session_id,
            )
            return None
        return policy

    def _refusal_reason(self, policy: Policy, host: str, port: int) -> str | None:
        if hosts.is_ip_literal(host):
            return IP_LITERAL
        if not hosts.is_valid_name(host):
            return INVALID_HOST
        if not hosts.host_allowed(host, policy.allow):
            return HOST_NOT_ALLOWED
        if port not in hosts.ALLOWED_PORTS:
            return PORT_NOT_ALLOWED
        verdict = self.resolver.check(host)
        if verdict.reason is not None:
            return verdict.reason
        self.pins.pin(host, verdict.address)
        return None

    def _binding(self, policy: Policy, host: str) -> Binding | None:
        for name in policy.bindings:
            binding = self.bindings.get(policy.org_id, name)
            if binding is not None and binding.host == host:
                return binding
        return None

    def _report(
        self, policy: Policy, host: str, allowed: bool, reason: str | None
    ) -> None:
        started = time.monotonic()
        sink = SessionSink(
            self.redis,
            policy.reporting_session,
            org_id=policy.org_id,
            output_bytes=0,
            actor="egress-proxy",
        )
        sink.egress(host, allowed, reason)
        duration_ms = int((time.monotonic() - started) * 1000)
        if allowed:
            logger.debug(
                "egress allowed session_id=%s host=%s report_ms=%s",
                policy.session_id,
                host,
                duration_ms,
            )
        else:
            logger.info(
                "egress denied session_id=%s org_id=%s host=%s reason=%s report_ms=%s",
                policy.session_id,
                policy.org_id,
                host,
                reason,
                duration_ms,
            )

    def _report_refusal(self, tunnel: Decision, host: str, reason: str) -> None:
        """Report a refusal inside a tunnel; it stands whether or not this works."""
        try:
            self._report(tunnel.policy, host[:253], False, reason)
        except Exception:
            # The connection is refused already; only the record is missing.
            logger.exception(
                "egress refusal not reported session_id=%s reason=%s",
                tunnel.policy.session_id,
                reason,
            )

    # -- helpers ---------------------------------------------------------------------

    def _client(self, client_id: str) -> _Client:
        state = self._clients.get(client_id)
        if state is None:
            state = self._clients[client_id] = _Client()
        return state

    async def _run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, function, *args
        )


def _basic_credentials(header: str | None) -> tuple[str | None, str]:
    """(session id, token) from a `Basic` Proxy-Authorization header."""
    if not header:
        return None, ""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None, ""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None, ""
    session_id, separator, token = decoded.partition(":")
    if not separator:
        return None, ""
    return session_id, token


def _refusal(decision: Decision) -> http.Response | None:
    if decision.unavailable:
        return http.Response.make(
            503,
            b"egress is unavailable right now\n",
            {"Content-Type": "text/plain", REASON_HEADER: "unavailable"},
        )
    if decision.policy is None:
        return http.Response.make(
            407,
            b"proxy authentication required\n",
            {"Content-Type": "text/plain", "Proxy-Authenticate": REALM},
        )
    if decision.reason is not None:
        return _forbidden(decision.reason)
    return None


def _forbidden(reason: str) -> http.Response:
    return http.Response.make(
        403,
        f"egress refused: {reason}\n".encode(),
        {"Content-Type": "text/plain", REASON_HEADER: reason},
    )


def _refuse(flow: http.HTTPFlow, response: http.Response) -> None:
    """Answer a refused request, or cut it when mitmproxy cannot answer it.

    mitmproxy can only answer once it has the whole body, and not at all a
    request it has begun to stream; a refused request that carries a body
    is therefore cut off, which never lets it reach anyone either.
    """
    request = flow.request
    has_body = request.headers.get("content-length", "0").strip() not in ("", "0")
    if has_body or "transfer-encoding" in request.headers or request.stream:
        flow.kill()
        return
    flow.response = response
