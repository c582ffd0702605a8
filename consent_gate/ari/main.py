"""consent-gate-ari: the long-running ARI service.

    consent-gate-ari --config /etc/consent-gate/consent-gate.toml

Secrets come from the environment (CONSENT_GATE_ARI_PASSWORD, CONSENT_GATE_HMAC_KEY, or their
*_FILE variants); see deploy/consent-gate.toml for every setting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import sys

import asyncpg
import structlog

from consent_gate.ari.ami import AmiClient, AmiConfig, AmiError
from consent_gate.ari.app import ConsentGateApp
from consent_gate.ari.metrics import ServiceMetrics, start_exporter
from consent_gate.ari.transport import AriClient, AriConfig, AriError
from consent_gate.config import ConfigError, Settings, load_settings
from consent_gate.core.dialog import GateContext
from consent_gate.ledger.cluster import ClusterMismatch, check_node
from consent_gate.ledger.journal import Journal
from consent_gate.ledger.store import Ledger
from consent_gate.log import configure_logging
from consent_gate.prompts.catalog import PromptCatalog, PromptError
from consent_gate.service import (
    add_service_arguments,
    check_journal_writable,
    check_prompts,
    check_recordings_dir,
    run_until_signalled,
)

log = structlog.get_logger(__name__)


async def check_ami_login(settings: Settings) -> None:
    """Log in to AMI once (mid-call withdrawal depends on it); the error never shows the secret."""
    ami = AmiClient(AmiConfig(settings.ami_host, settings.ami_port, settings.ami_user, settings.ami_secret or ""))
    try:
        await ami.action("Ping")
    except AmiError as error:
        raise ConfigError(f"ami: cannot log in to {settings.ami_host}:{settings.ami_port} as "
                          f"{settings.ami_user!r}: {error}") from None
    finally:
        await ami.close()


async def read_node_identity(settings: Settings) -> tuple[str, str]:
    """This node's Asterisk (systemname, entity id), read over ARI (the login is checked too)."""
    config = AriConfig(base_url=settings.ari_url, username=settings.ari_user,
                       password=settings.ari_password, app=settings.ari_app)
    try:
        async with AriClient(config) as client:
            return await client.node_identity()
    except AriError as error:
        raise ConfigError(f"ari: cannot read Asterisk's settings at {settings.ari_url} as "
                          f"{settings.ari_user!r}: {error}") from None


async def check_cluster(settings: Settings, catalog: PromptCatalog) -> None:
    """Several nodes share one ledger: this node's HMAC key and prompt set must be the ones the
    ledger already knows (the first node to check records its own), and its Asterisk's
    systemname must be its own (channel uniqueids, the ledger's call ids, carry it)."""
    system_name, entity_id = await read_node_identity(settings)
    node = f"Asterisk {entity_id or 'without entity id'} on {socket.gethostname()}"
    try:
        await check_node(settings.database_dsn, hmac_key=settings.hmac_key, prompts=catalog.inventory(),
                         system_name=system_name, node=node)
    except ClusterMismatch as error:
        raise ConfigError(f"cluster: {error}") from None
    except asyncpg.UndefinedTableError:
        raise ConfigError("ledger: not migrated to this version (run `consent-gate db migrate`)") from None
    except (TimeoutError, OSError, asyncpg.PostgresError) as error:
        raise ConfigError(f"ledger: cannot compare this node with the ledger: {type(error).__name__}: "
                          f"{error}") from None


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    catalog = PromptCatalog.load(settings.prompts_dir)
    check_prompts(settings, catalog)
    ledger = Ledger(settings.database_dsn, Journal(settings.journal_dir),
                    write_timeout=settings.ledger_write_timeout)
    await ledger.start()
    try:
        ari = AriConfig(base_url=settings.ari_url, username=settings.ari_user,
                        password=settings.ari_password, app=settings.ari_app)
        ami = AmiClient(AmiConfig(settings.ami_host, settings.ami_port, settings.ami_user, settings.ami_secret or ""))
        async with AriClient(ari) as client:
            metrics = ServiceMetrics()
            app = ConsentGateApp(client, GateContext(settings, catalog, ledger), ami=ami, metrics=metrics)
            exporter = await start_exporter(metrics, app, ledger)
            runner = asyncio.create_task(app.run(), name="ari-app")
            log.info("consent_gate.started", ari=settings.ari_url, app=settings.ari_app,
                     purposes=sorted(settings.purposes))
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if runner not in done:
                runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            await exporter.close()
    finally:
        await ami.close()
        await ledger.close()
        log.info("consent_gate.stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="consent-gate-ari",
        description="Asterisk ARI service that asks callers for recording consent. "
        "Secrets: CONSENT_GATE_ARI_PASSWORD and CONSENT_GATE_HMAC_KEY (or *_FILE).",
    )
    add_service_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_format, getattr(logging, args.log_level.upper()))
    try:
        settings = load_settings(args.config)
        if not settings.ami_secret:
            # Withdrawal must be as easy as consent: without AMI the service could not stop a recording.
            raise ConfigError("ami.secret: mid-call withdrawal needs AMI; set CONSENT_GATE_AMI_SECRET or *_FILE")
        check_recordings_dir(settings)
        if args.check_config:
            catalog = PromptCatalog.load(settings.prompts_dir)
            check_prompts(settings, catalog)
            check_journal_writable(settings.journal_dir)
            asyncio.run(check_ami_login(settings))
            asyncio.run(check_cluster(settings, catalog))
            print("configuration ok")
            return 0
    except (ConfigError, PromptError) as error:
        print(f"consent-gate-ari: {error}", file=sys.stderr)
        return 2

    return run_until_signalled(serve, settings, "consent-gate-ari")


if __name__ == "__main__":
    sys.exit(main())
