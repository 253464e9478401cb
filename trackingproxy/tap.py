"""twistd entry point: ``Options`` and ``makeService``. Real defaults (reactor, clock) are
chosen only here; everything else receives them."""

from __future__ import annotations

import datetime

from twisted.application.service import IService
from twisted.logger import Logger

from trackingproxy.config import config_from_options
from trackingproxy.errors import ConfigError, exit_with
from trackingproxy.ops import tcpwrite
from trackingproxy.options import Options

__all__ = ["Options", "makeService"]

log = Logger(namespace="trackingproxy.tap")


def makeService(options: Options) -> IService:
    """Validate the options and build the service tree; bad input exits with one line."""
    from twisted.internet import reactor

    from trackingproxy.service import build_service

    if options.get("check"):
        from trackingproxy.checks.cli import run_from_twistd

        run_from_twistd(options)  # runs the checks, then raises SystemExit(0 or 1)
    try:
        config = config_from_options(
            options, datetime.datetime.fromtimestamp(reactor.seconds(), datetime.UTC)
        )
        tcpwrite.install()
        log.info("TCP writes: sent at once when nothing is buffered (trackingproxy.ops.tcpwrite)")
        if config.workers > 1:
            from trackingproxy.service import build_with_workers

            service = build_with_workers(config, dict(options.items()), reactor)
        else:
            service = build_service(config, reactor)
        service.install_signals = True
        return service
    except ConfigError as e:
        exit_with(e.message)
        raise  # unreachable: exit_with raises SystemExit
