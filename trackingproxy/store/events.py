"""The shared store's change messages: a thread subscribed to its events channel.

Every write of a certificate and every change of the domain list is PUBLISHed (by the Lua
scripts and ``RedisStore``); ``Watch`` delivers them to the reactor thread. redis-py's
subscription blocks, so it runs on its own daemon thread with its own connection (never the
store's thread pool). After every (re)subscription ``on_subscribed`` runs: messages may have
been missed meanwhile, so the caller resyncs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis import exceptions as rx
from twisted.logger import Logger
from twisted.python.failure import Failure

from trackingproxy.store.url import password_of, unavailable_cause

__all__ = ["Watch"]

log = Logger(namespace="trackingproxy.store.events")


class Watch:
    """A daemon thread subscribed to the events channel on its own connection; it reconnects
    with a capped backoff (0.5 s doubling to 5 s) and stops within about a second."""

    POLL = 0.25  # seconds per get_message wait: how soon stop() is noticed
    FIRST_DELAY, MAX_DELAY = 0.5, 5.0

    def __init__(
        self,
        client: redis.Redis,
        channel: str,
        description: str,
        on_event: Callable[[str, str], None],
        on_subscribed: Callable[[], None],
        call_in_reactor: Callable[..., None],
    ) -> None:
        self._client = client
        self._channel = channel
        self._description = description
        self._on_event = on_event
        self._on_subscribed = on_subscribed
        self._call = call_in_reactor
        self._secret = password_of(client)
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="trackingproxy-store-events", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop listening (waits up to a couple of seconds for the thread to end)."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        delay = self.FIRST_DELAY
        failing = False
        while not self._stopping.is_set():
            pubsub = self._client.pubsub()
            try:
                for _ in self._listen(pubsub):  # one step per (re)subscription
                    if failing:
                        self._call(log.info, "store {store}: receiving its events again",
                                   store=self._description)
                    delay, failing = self.FIRST_DELAY, False
            except (rx.RedisError, OSError) as e:
                if not failing and not self._stopping.is_set():
                    self._call(
                        log.info, "store {store}: lost its event subscription ({cause}); "
                        "reconnecting", store=self._description,
                        cause=unavailable_cause(e, self._secret) or type(e).__name__,
                    )
                failing = True
            except Exception:
                self._call(log.failure, "store {store}: reading its events failed", Failure(),
                           store=self._description)
                failing = True
            finally:
                with contextlib.suppress(rx.RedisError, OSError):
                    pubsub.close()
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, self.MAX_DELAY)

    def _listen(self, pubsub: Any) -> Iterator[None]:
        """Subscribe and deliver messages until stopped; yields after every subscription
        (redis-py may reconnect and subscribe again by itself)."""
        pubsub.subscribe(self._channel)
        while not self._stopping.is_set():
            message = pubsub.get_message(timeout=self.POLL)
            if message is None:
                continue
            if message["type"] == "subscribe":
                yield
                self._call(self._on_subscribed)
            elif message["type"] == "message":
                data = message["data"]
                text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
                kind, _, arg = text.partition(" ")
                self._call(self._on_event, kind, arg)
