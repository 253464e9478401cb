"""twistd entry point: ``Options`` and ``makeService``. Real defaults (reactor, clock) are
chosen only here; everything else receives them."""

from __future__ import annotations

import datetime

from twisted.application.service import IService

from trackingproxy import fastwrite
from trackingproxy.config import config_from_options
from trackingproxy.errors import ConfigError, exit_with
from trackingproxy.options import Options

__all__ = ["Options", "makeService"]


def makeService(options: Options) -> IService:
    """Validate the options and build the service tree; bad input exits with one line."""
    from twisted.internet import reactor

    from trackingproxy.service import build_service

    if options.get("check"):
        from trackingproxy.check import run_from_twistd

        run_from_twistd(options)  # runs the checks, then raises SystemExit(0 or 1)
    try:
        config = config_from_options(
            options, datetime.datetime.fromtimestamp(reactor.seconds(), datetime.UTC)
        )
        fastwrite.install()
        if config.workers > 1:
            from trackingproxy.workers import build_with_workers

            service = build_with_workers(config, dict(options.items()), reactor)
        else:
            service = build_service(config, reactor)
        service.install_signals = True
        return service
    except ConfigError as e:
        exit_with(e.message)
        raise  # unreachable: exit_with raises SystemExit
