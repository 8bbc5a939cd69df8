"""The egress proxy process (`python -m enclave.egress`): mitmproxy and our addon.

Start-up checks everything a request would need and fails loudly before
listening: the settings, the database and Redis, every service binding's
value, the resolver overrides, and the CA (created on the first start, see
`enclave.egress.authority`). Then it listens on `ENCLAVE_EGRESS_PROXY_ADDRESS`
as a regular HTTP proxy until SIGTERM or SIGINT.

Only the addons the proxy needs are loaded; mitmproxy's defaults include
features (an onboarding site, replays, header rewriting) that have no place
in front of sandboxes. Connections open lazily, so that a CONNECT is answered
from the policy alone and nothing is dialed before its checks; TLS towards
the hosts is verified against the public roots plus
`ENCLAVE_EGRESS_EXTRA_CA_FILE`; bodies larger than 256 KiB are streamed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

from enclave.config import Settings
from enclave.connections import redis_client
from enclave.db import configure_database
from enclave.egress.addon import EgressAddon
from enclave.egress.authority import prepare_authority, upstream_bundle_path
from enclave.egress.bindings import BindingConfig
from enclave.egress.bridge import parse_address
from enclave.egress.resolver import Resolver, parse_overrides
from enclave.errors import ConfigurationError
from enclave.logs import configure_logging

logger = logging.getLogger(__name__)

# Threads deciding attempts: each holds a Redis call, a lookup and a database
# write at most, so a few go a long way.
DECISION_THREADS = 8
STREAM_BODIES_OVER = "256k"
# Libraries' loggers: mitmproxy's notes every connection at INFO, HTTP/2 and
# hpack dump whole headers at DEBUG, passlib (imported by mitmproxy) probes
# its backends noisily at start-up.
QUIET_LOGGERS = {
    "mitmproxy": logging.WARNING,
    "h2": logging.WARNING,
    "hpack": logging.WARNING,
    "passlib": logging.WARNING,
    "asyncio": logging.INFO,
}


def main() -> None:
    try:
        settings = Settings.load()
    except ConfigurationError as exc:
        sys.exit(f"enclave egress: {exc}")
    configure_logging(settings)
    for name, level in QUIET_LOGGERS.items():
        if logging.getLogger().level < level:
            logging.getLogger(name).setLevel(level)

    try:
        bindings = BindingConfig.load(settings)
        bindings.check_values()
        resolver = Resolver(parse_overrides(settings.egress_resolve_overrides))
        address = parse_address(settings.egress_proxy_address)
        confdir = prepare_authority(settings)
    except (ConfigurationError, ValueError) as exc:
        sys.exit(f"enclave egress: {exc}")

    configure_database(settings.database_url, max_connections=DECISION_THREADS + 2)
    client = redis_client(settings)
    executor = ThreadPoolExecutor(
        max_workers=DECISION_THREADS, thread_name_prefix="egress-decide"
    )
    addon = EgressAddon(
        client=client, bindings=bindings, resolver=resolver, executor=executor
    )
    try:
        asyncio.run(_serve(settings, address, str(confdir), addon))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        client.close()


def build_master(settings, address: tuple[str, int], confdir: str, addon):
    """The mitmproxy master, not yet running; call it on the loop it will run on."""
    # Imported here so that the rest of the package (the worker's side) does
    # not need mitmproxy installed.
    from mitmproxy import options
    from mitmproxy.addons import core, next_layer, proxyserver, tlsconfig
    from mitmproxy.master import Master

    opts = options.Options(
        listen_host=address[0], listen_port=address[1], confdir=confdir
    )
    master = Master(opts)
    master.addons.add(
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        addon,
    )
    opts.update(
        connection_strategy="lazy",
        stream_large_bodies=STREAM_BODIES_OVER,
        ssl_verify_upstream_trusted_ca=str(upstream_bundle_path(settings)),
    )
    return master


async def _serve(settings, address: tuple[str, int], confdir: str, addon) -> None:
    master = build_master(settings, address, confdir, addon)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, master.shutdown)

    logger.info(
        "egress proxy listening address=%s:%s bindings=%s",
        address[0],
        address[1],
        len(addon.bindings.all()),
    )
    await master.run()
    logger.info("egress proxy stopped")
