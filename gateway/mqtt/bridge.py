"""The MQTT bridge: broker -> the shared ingest path, acknowledging only what is committed.

It runs as the lifespan's task "mqtt-bridge":

- `_reconnect_loop`: connect (MQTT 5, persistent session, ReceiveMaximum), subscribe at QoS 1 to
  `[$share/<group>/][<prefix>/]devices/+/telemetry`, run `_receive_loop` until the connection
  drops, then back off (exponential, with jitter) and connect again. /readyz shows the state.
- `_receive_loop`: waits for a message, takes every message already received with it as one batch
  and hands it to a batch task. At most `_BATCHES_IN_FLIGHT` batches run at once, so the next
  batch grows while the previous one commits: per-batch work, not per-message work.
- a batch task: `BatchHandler.handle` (parse, store with `wait=True`, dead letters), then the
  PUBACKs, in the order the messages arrived (MQTT 5 section 4.6).

When the database refuses a batch, `_handle` asks `database_outage.record` (`is_unavailable`)
whether a later try can succeed:
- transient (down, restarting, locked, out of connections): the batch is retried with capped
  exponential backoff, its messages unacknowledged (nothing is lost; the broker holds the rest);
  the outage is logged in a few lines by `gateway.outage`, not once per retry.
  A batch retrying longer than `FIELDGATE_MQTT_STUCK_BATCH_S` makes /readyz answer 503.
- permanent (this message can never be stored): the batch is stored in halves, and a half that
  fails again in halves, down to the culprit, which is kept as a dead letter with reason
  `unstorable` and acknowledged; the rest are stored and acknowledged as usual. If even that
  dead letter is refused for good, the message is logged, counted
  (`fieldgate_mqtt_messages_dropped_total`) and acknowledged: it could never be stored, and
  holding it would stall every message behind it.

Backpressure: when the writer's queue is full, `store(wait=True)` waits, batches stop finishing,
unacknowledged messages reach ReceiveMaximum and the broker stops sending: it holds the rest.
Nothing is dropped here. Shutdown (`stop`): stop reading, let the batches in flight commit and
acknowledge them, disconnect; the session and what it holds stay on the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiomqtt
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception,
    retry_if_exception_type,
    wait_exponential,
    wait_random_exponential,
)
from tenacity.wait import wait_base

from gateway import metrics
from gateway.ingest import Ingestor
from gateway.mqtt.client import BrokerAddress, BrokerClient, SubscriptionRefused
from gateway.mqtt.service import BatchHandler, Incoming, Topics
from gateway.outage import database_outage
from gateway.settings import Settings
from gateway.store.dead_letters import Letter
from gateway.timespec import format_ts, now_us
from gateway.writer import WriterStopped

log = logging.getLogger("fieldgate.mqtt")

_BATCHES_IN_FLIGHT = 3
_MAX_BATCH_MESSAGES = 5_000
_DRAIN_TIMEOUT_S = 15.0
_PROBE_EVERY_S = 1.0
_STABLE_S = 30.0  # a connection that lasted this long resets the reconnect backoff
_CLASH_DROPS = 3  # connections dropped soon after connecting that suggest a client id clash
_STOP_TIMEOUT_S = 20.0
_RETRY_MIN_S = 0.2
_RETRY_MAX_S = 5.0
_GRANT_IT = (
    "let the gateway's broker identity subscribe to it (`fieldgate broker sync` does, for a "
    "broker made by `fieldgate broker init`)"
)
_RESUBSCRIBE_EVERY_S = 30.0
_SESSION_LOST = (
    "the broker did not keep this gateway's session (CONNACK session-present false): messages "
    "published while it was away may be lost. Give the broker persistence and queues sized for "
    "outages (see README, 'Sizing the broker's queues')."
)


def backoff(low_s: float, high_s: float) -> wait_base:
    """Exponential backoff with jitter, from tenacity's parts: before the n-th retry, between
    half and all of min(high, low * 2**(n - 1)) (half fixed, half random: reconnecting gateways
    do not stampede, and none retries at once)."""
    half_low, half_high = low_s / 2, high_s / 2
    return wait_exponential(multiplier=half_low, max=half_high) + wait_random_exponential(
        multiplier=half_low, max=half_high
    )


def _failure(retry_state: RetryCallState) -> BaseException | None:
    """The exception of the try that failed (tenacity calls its hooks after a failed try)."""
    return retry_state.outcome.exception() if retry_state.outcome is not None else None


class _Disconnected(Exception):
    """The connection to the broker ended (its state is recorded): connect again."""


class MqttBridge:
    def __init__(
        self, settings: Settings, ingestor: Ingestor, components: dict[str, dict[str, Any]]
    ) -> None:
        self.settings = settings
        self.address = BrokerAddress.from_url(
            settings.mqtt_url,
            ca_file=settings.mqtt_ca_file,
            client_certfile=settings.mqtt_client_certfile,
            client_keyfile=settings.mqtt_client_keyfile,
        )
        self.topics = Topics.with_prefix(settings.mqtt_topic_prefix)
        self.subscription = self.topics.subscription(settings.mqtt_shared_group)
        self.subscriptions = self.topics.subscriptions(settings.mqtt_shared_group)
        self.handler = BatchHandler(
            ingestor,
            self.topics,
            max_payload_bytes=settings.max_body_bytes,
            dead_letter_payload_bytes=settings.mqtt_dead_letter_payload_bytes,
            device_cache_ttl_s=settings.mqtt_device_cache_ttl_s,
            dead_letter_max_rows=settings.dead_letter_max_rows,
        )
        self.state: dict[str, Any] = {
            "ok": False,
            "state": "starting",
            "broker": str(self.address),
            "client_id": settings.mqtt_client_id,
            "subscription": self.subscription,
            "subscriptions": list(self.subscriptions),
            "refused_subscriptions": [],  # those the broker refused (see `_subscribe`)
            "session_present": None,
            "connected_since": None,
            "connects": 0,
            "last_error": None,
            "warning": None,
            # Set when the broker gives this session to another client with the same id.
            "client_id_clash": None,
            "sessions_taken_over": 0,
            "in_flight_messages": 0,
            "rejected_messages": {},
            # Batches the database refused for now, retried; since when the oldest has waited
            # (/readyz turns `retrying_since_us` into `stuck_batch_s`).
            "retrying_batches": 0,
            "retrying_since": None,
            "retrying_since_us": None,
        }
        components["mqtt"] = self.state
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._received = 0
        self._acked = 0
        self._quick_drops = 0  # connections in a row the broker closed soon after they were made
        self._retrying: dict[object, int] = {}  # a retrying `_handle` call -> since (epoch us)

    async def run(self) -> None:
        """Keep a connection to the broker and ingest from it until `stop`."""
        self._task = asyncio.current_task()
        try:
            await self._reconnect_loop()
        finally:
            self._set_state("stopped", ok=False)
            self._finished.set()
            log.info(
                "MQTT bridge stopped: %d messages received, %d committed and acknowledged "
                "(the broker keeps the rest for this session)",
                self._received,
                self._acked,
            )

    async def stop(self) -> None:
        """Stop reading, commit and acknowledge what is in flight, disconnect."""
        self._stopping.set()
        try:
            await asyncio.wait_for(self._finished.wait(), _STOP_TIMEOUT_S)
        except TimeoutError:
            log.error("the MQTT bridge did not stop within %.0f s; cancelling it", _STOP_TIMEOUT_S)
            if self._task is not None:
                self._task.cancel()

    async def _reconnect_loop(self) -> None:
        """Connect again, with backoff and jitter, whenever the connection ends, until `stop`.

        tenacity's AsyncRetrying drives it; its `sleep` is `_sleep`, which `stop` cuts short
        (`stamina` would fit the rest, but sleeps with a plain asyncio.sleep: a SIGTERM would
        wait out up to `mqtt_reconnect_max_s`)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Disconnected),
            wait=backoff(self.settings.mqtt_reconnect_min_s, self.settings.mqtt_reconnect_max_s),
            stop=lambda _: self._stopping.is_set(),
            sleep=self._sleep,
            before_sleep=self._show_next_attempt,
        )
        with contextlib.suppress(RetryError):  # raised when stopping after a lost connection
            async for attempt in retrying:
                with attempt:
                    if not self._stopping.is_set():  # (woken early from the backoff by `stop`)
                        await self._connection(attempt.retry_state)

    async def _connection(self, retry_state: RetryCallState) -> None:
        """One connection: connect, subscribe, receive until `stop` (returns) or until the
        connection ends (raises _Disconnected)."""
        client = BrokerClient(
            self.address,
            client_id=self.settings.mqtt_client_id,
            session_expiry_s=self.settings.mqtt_session_expiry_s,
            receive_maximum=self.settings.mqtt_receive_maximum,
            keepalive_s=self.settings.mqtt_keepalive_s,
        )
        client.on_held = self._show_held
        self._show_held(0)
        self._set_state("connecting", ok=False)
        connected_at: float | None = None
        try:
            async with client:
                connected_at = time.monotonic()
                self._on_connected(client)
                # A resumed session delivers its backlog at once: read it while subscribing.
                subscribing = asyncio.create_task(self._subscribe(client), name="mqtt-sub")
                try:
                    await self._receive_loop(client, subscribing)
                finally:
                    subscribing.cancel()
                    if subscribing.done() and not subscribing.cancelled():
                        subscribing.exception()  # seen (raised above, or not needed)
        except aiomqtt.MqttError as exc:
            reason = client.disconnect_reason
            error = f"{exc}" + (f" ({reason})" if reason and reason != "Success" else "")
            error = self._client_id_clash(client, connected_at) or error
        except Exception as exc:
            log.exception("the MQTT bridge failed; reconnecting")
            error = f"{type(exc).__name__}: {exc}"
        else:
            if self._stopping.is_set():
                return
            error = "the connection ended"
        self._on_disconnected(error)
        if connected_at is not None and time.monotonic() - connected_at > _STABLE_S:
            # It was up a good while: start the backoff over (the next wait is the first one's).
            retry_state.attempt_number = 1
        raise _Disconnected(error)

    async def _sleep(self, seconds: float) -> None:
        """tenacity's sleep between tries, cut short by `stop`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _show_next_attempt(self, retry_state: RetryCallState) -> None:
        self.state["next_attempt_in_s"] = round(retry_state.upcoming_sleep, 2)

    async def _subscribe(self, client: BrokerClient) -> None:
        """Subscribe to the native telemetry (required: a refusal ends the connection), then to
        the other formats' topics. A broker whose access control predates those (a dynamic
        security store written by an older `fieldgate broker init`, before the broker sync adds
        them) may refuse them: that is logged, shown in /readyz (`refused_subscriptions`) and
        asked again every `_RESUBSCRIBE_EVERY_S` while connected; native telemetry flows on."""
        pending = list(self.subscriptions)
        while True:
            refused: list[str] = []
            for topic in pending:
                try:
                    granted = await client.subscribe(topic, self.settings.mqtt_qos)
                except SubscriptionRefused as exc:
                    if topic == self.subscription:
                        raise
                    if topic not in self.state["refused_subscriptions"]:
                        log.warning("%s: messages on it are not ingested; %s", exc, _GRANT_IT)
                    refused.append(topic)
                else:
                    log.info("subscribed to %s (%s)", topic, granted)
            self.state["refused_subscriptions"] = refused
            if not refused:
                return
            pending = refused
            await asyncio.sleep(_RESUBSCRIBE_EVERY_S)

    async def _receive_loop(self, client: BrokerClient, subscribing: asyncio.Task[None]) -> None:
        slots = asyncio.Semaphore(_BATCHES_IN_FLIGHT)
        previous: asyncio.Future[None] | None = None
        batches: set[asyncio.Task[None]] = set()
        stop = asyncio.create_task(self._stopping.wait(), name="mqtt-stop-signal")
        loop = asyncio.get_running_loop()
        receive: asyncio.Task[aiomqtt.Message] | None = None
        try:
            while True:
                await slots.acquire()
                receive = asyncio.create_task(client.next_message(), name="mqtt-receive")
                while not (receive.done() or stop.done()):
                    waiting = (
                        {receive, stop} if subscribing.done() else {receive, stop, subscribing}
                    )
                    done_, _ = await asyncio.wait(
                        waiting, timeout=_PROBE_EVERY_S, return_when=asyncio.FIRST_COMPLETED
                    )
                    if not done_:
                        client.probe()  # quiet for a while: is the connection still there?
                    if subscribing.done():
                        subscribing.result()  # raises if the broker refused the subscription
                if not receive.done():
                    return  # stopping
                first = receive.result()  # raises MqttError when the connection dropped
                batch = [first, *client.take_ready(_MAX_BATCH_MESSAGES - 1)]
                self._received += len(batch)
                metrics.MQTT_MESSAGES_RECEIVED.inc(len(batch))
                done: asyncio.Future[None] = loop.create_future()
                task = asyncio.create_task(
                    self._run_batch(client, batch, previous, done), name="mqtt-batch"
                )
                batches.add(task)
                task.add_done_callback(batches.discard)
                task.add_done_callback(lambda _: slots.release())
                previous = done
        finally:
            stop.cancel()
            if receive is not None:
                receive.cancel()  # a message taken but not handled stays unacknowledged
            if batches:  # commit (and, still connected, acknowledge) what is in flight
                _, late = await asyncio.wait(batches, timeout=_DRAIN_TIMEOUT_S)
                for task in late:  # not acknowledged: the broker delivers them again
                    task.cancel()
            if self._stopping.is_set() and client.connected and not await client.flush():
                log.warning("the broker did not confirm the last acknowledgements")

    async def _run_batch(
        self,
        client: BrokerClient,
        batch: list[aiomqtt.Message],
        previous: asyncio.Future[None] | None,
        done: asyncio.Future[None],
    ) -> None:
        try:
            incoming = [Incoming(m.topic.value, m.payload) for m in batch]
            letters = await self._handle(client, incoming)
            if letters is None:
                return  # not committed: left unacknowledged, the broker delivers them again
            self._publish_errors(client, letters)
            if previous is not None:
                await previous  # acknowledge in the order the messages arrived
            for message in batch:
                client.ack(message)
            self._acked += len(batch)
        finally:
            if not done.done():
                done.set_result(None)
            client.settled(len(batch))

    async def _handle(self, client: BrokerClient, batch: list[Incoming]) -> list[Letter] | None:
        """The batch's dead letters once all of it is committed or put aside; None if it could
        not be (the bridge is stopping or lost the connection: left unacknowledged)."""
        key = object()
        try:
            async for attempt in self._store_tries(client, key, len(batch)):
                with attempt:
                    letters = await self.handler.handle(batch)
        except (WriterStopped, RetryError):
            return None
        except Exception as exc:  # permanent: not a transient database failure
            self._retry_ended(key)
            return await self._isolate(client, batch, exc)
        finally:
            self._retry_ended(key)
        if letters:
            self.state["rejected_messages"] = dict(self.handler.rejected_by_reason)
        return letters

    async def _isolate(
        self, client: BrokerClient, batch: list[Incoming], error: Exception
    ) -> list[Letter] | None:
        """After a permanent failure (anything but a transient database failure, a bug included):
        the message that causes it is put aside, the rest stored."""
        metrics.MQTT_STORE_PERMANENT_FAILURES.inc()
        if len(batch) == 1:
            return await self._put_aside(client, batch[0], error)
        log.warning(
            "storing a batch of %d MQTT messages failed, not for a transient database failure "
            "(%s: %s); storing it in halves to find the message that cannot be stored",
            len(batch),
            type(error).__name__,
            error,
        )
        # Halves, not one message at a time: one culprit in 5,000 messages costs ~26 commits.
        middle = len(batch) // 2
        letters: list[Letter] = []
        for part in (batch[:middle], batch[middle:]):
            stored = await self._handle(client, part)
            if stored is None:
                return None
            letters += stored
        return letters

    async def _put_aside(
        self, client: BrokerClient, message: Incoming, error: Exception
    ) -> list[Letter] | None:
        """Keep a message that can never be stored as an `unstorable` dead letter (then it is
        acknowledged); if even that is refused for good, log, count and let it go."""
        key = object()
        try:
            async for attempt in self._store_tries(client, key, 1):
                with attempt:
                    letter = await self.handler.put_aside(message, error)
        except RetryError:
            return None
        except Exception as exc:
            metrics.MQTT_MESSAGES_DROPPED.inc()
            log.error(
                "a message on %s can never be stored (%s: %s), and neither can its dead "
                "letter (%s: %s): acknowledged without keeping it (payload %d bytes: %r)",
                message.topic[:200],
                type(error).__name__,
                error,
                type(exc).__name__,
                exc,
                len(message.payload),
                message.payload[:200],
            )
            return []
        finally:
            self._retry_ended(key)
        self.state["rejected_messages"] = dict(self.handler.rejected_by_reason)
        return [letter]

    def _store_tries(self, client: BrokerClient, key: object, messages: int) -> AsyncRetrying:
        """Tries of a store until it is done, retrying (with backoff) only what the database
        could not take now (`database_outage.record`, which also logs the outage in a few
        lines). Anything else is raised at once; so is RetryError when the bridge is stopping
        or lost the connection (give up: the broker delivers the messages again)."""

        def before_sleep(retry_state: RetryCallState) -> None:
            if key not in self._retrying:
                self._retrying[key] = now_us()
                self._show_retrying()
            metrics.MQTT_STORE_RETRIES.inc()
            error = _failure(retry_state)
            log.debug(
                "storing %d MQTT messages failed (%s: %s); retrying in %.1f s",
                messages,
                type(error).__name__,
                error,
                retry_state.upcoming_sleep,
            )

        def give_up(retry_state: RetryCallState) -> bool:
            if self._stopping.is_set() or not client.connected:
                log.warning("gave up a batch of %d messages: %s", messages, _failure(retry_state))
                return True
            return False

        return AsyncRetrying(
            retry=retry_if_exception(database_outage.record),
            wait=backoff(_RETRY_MIN_S, _RETRY_MAX_S),
            stop=give_up,
            sleep=self._sleep,
            before_sleep=before_sleep,
        )

    def _retry_ended(self, key: object) -> None:
        if self._retrying.pop(key, None) is not None:
            self._show_retrying()

    def _show_retrying(self) -> None:
        since = min(self._retrying.values(), default=None)
        self.state.update(
            retrying_batches=len(self._retrying),
            retrying_since=format_ts(since) if since is not None else None,
            retrying_since_us=since,
        )
        metrics.MQTT_RETRYING_BATCHES.set(len(self._retrying))

    def _publish_errors(self, client: BrokerClient, letters: list[Letter]) -> None:
        """Tell devices what was wrong with what they sent (QoS 0, best effort: a failure is
        logged and never keeps the batch from being acknowledged)."""
        for letter in letters:
            if letter.device_id is None:
                continue
            body = {
                "topic": letter.topic,
                "reason": letter.reason,
                "message": letter.message,
                "details": letter.details,
                "received_at": format_ts(letter.received_us),
            }
            try:
                client.publish_nowait(self.topics.errors(letter.device_id), orjson.dumps(body))
            except Exception:
                log.exception("could not publish a rejection to %s", letter.device_id)

    def _on_connected(self, client: BrokerClient) -> None:
        present = bool(client.session_present)
        first = self.state["connects"] == 0
        metrics.MQTT_CONNECTED.set(1)
        metrics.MQTT_CONNECTS.labels(str(present).lower()).inc()
        self.state.update(
            session_present=present,
            connected_since=format_ts(now_us()),
            connects=self.state["connects"] + 1,
            last_error=None,
        )
        self.state.pop("next_attempt_in_s", None)
        self._set_state("connected", ok=True)
        if present:
            log.info(
                "connected to %s as %s (session resumed)",
                self.address,
                self.settings.mqtt_client_id,
            )
        elif first:
            log.info(
                "connected to %s as %s with a new session (expected on a first start; if this "
                "gateway ran before with this client id, the broker did not keep its session)",
                self.address,
                self.settings.mqtt_client_id,
            )
        else:
            log.warning("reconnected to %s: %s", self.address, _SESSION_LOST)
            self.state["warning"] = f"{format_ts(now_us())}: {_SESSION_LOST}"

    def _client_id_clash(self, client: BrokerClient, connected_at: float | None) -> str | None:
        """Whether a dropped connection says another client uses this client id (two gateways
        with one id take the session, and its messages, from each other in turn): certain when
        the broker says so (MQTT 5 reason 0x8E), likely when it closed `_CLASH_DROPS` connections
        in a row, each soon after it was made, without a word. The message, or None. /readyz
        shows it (`client_id_clash`) for a while after the last one (gateway/api/health.py)."""
        quick = connected_at is not None and time.monotonic() - connected_at < _STABLE_S
        if connected_at is not None:
            self._quick_drops = self._quick_drops + 1 if quick and client.dropped else 0
        if client.taken_over:
            how = "took this gateway's session (MQTT reason 0x8E, session taken over)"
        elif self._quick_drops >= _CLASH_DROPS and not self._stopping.is_set():
            how = (
                f"closed {self._quick_drops} connections in a row soon after they were made, "
                "which is what it does when another client connects with the same client id"
            )
        else:
            return None
        clash = (
            f"the broker {self.address} {how}: is another gateway running with the client id "
            f"{self.settings.mqtt_client_id!r}? Give each instance its own "
            "FIELDGATE_MQTT_CLIENT_ID."
        )
        log.error("%s", clash)
        self.state.update(
            client_id_clash=clash,
            taken_over_us=now_us(),
            sessions_taken_over=self.state["sessions_taken_over"] + 1,
        )
        return clash

    def _on_disconnected(self, error: str) -> None:
        metrics.MQTT_CONNECTED.set(0)
        was_connected = self.state["state"] == "connected"
        self.state.update(last_error=error, connected_since=None)
        self._set_state("disconnected", ok=False)
        if was_connected:
            log.warning("lost the connection to %s: %s; reconnecting", self.address, error)
        else:
            log.warning("cannot connect to %s: %s", self.address, error)

    def _set_state(self, state: str, *, ok: bool) -> None:
        self.state["state"] = state
        self.state["ok"] = ok

    def _show_held(self, held: int) -> None:
        self.state["in_flight_messages"] = held
        metrics.MQTT_IN_FLIGHT.set(held)
