"""A Dragonflow pub/sub driver over zbroker's native protocol.

Enable it in Dragonflow's configuration::

    [df]
    enable_df_pub_sub = True
    pub_sub_driver = zbroker_pubsub_driver
    # Dragonflow 4.0.0 defaults this to True, which makes neutron-server
    # publish through [df] pub_sub_multiproc_driver instead of this driver
    # (master has no such option, and ignores the line).
    pub_sub_use_multiproc = False

    [zbroker]
    publisher_endpoints = tcp://broker-a:5570,tcp://broker-b:5570
    subscriber_endpoints = tcp://broker-a:5571,tcp://broker-b:5571

``zbroker_pubsub_driver`` is this module's :class:`ZbrokerPubSub`, registered
in the entry-point group ``dragonflow.pubsub_driver``; the dotted path
``zbroker.dragonflow.ZbrokerPubSub`` works too.

- The publisher PUSHes ``[topic, data]`` (what Dragonflow's
  ``PublisherAgentBase.send_event`` packs) to one broker at a time, moving to
  the next of ``[zbroker] publisher_endpoints`` when one is unreachable. An
  update no broker took within 5 s is logged and dropped, as Dragonflow's
  other drivers do (the controllers' periodic sync catches up).
- The subscriber holds every registered topic as an ``exact`` filter and
  calls back ``callback(table, key, action, value, topic)`` for each update.
  Whenever updates may have been lost (the broker dropped messages for it, it
  reconnected, the broker restarted or failed over, or a topic could only be
  subscribed late), it calls ``callback(None, None, 'sync', None, None)``
  once, and Dragonflow re-reads its state from the northbound database.
- Its brokers are ``[zbroker] subscriber_endpoints`` followed by every
  address given to ``register_listen_address``: Dragonflow registers
  ``<[df] publisher_transport>://<each of [df] publishers_ips>:<[df]
  publisher_port>`` (and, on master, the publishers in its ``publisher``
  table), so point those options at the brokers' subscriber port or leave
  them: an address where no broker listens is only tried, for
  ``connect_timeout`` (2 s), when failing over.

Dragonflow's other publisher options (``[df] publisher_bind_address``, and
``[df] publisher_multiproc_socket`` on 4.0.0, ``[df_zmq] ipc_socket`` on
master) do not apply to this driver.

Works with Dragonflow 4.0.0's base classes (``is_daemonize``) and with
master's (``is_running``, false before ``initialize``, as master's
``NbApi`` asks it first); scripts/test-dragonflow tests it through both.
Dragonflow needs msgpack < 1.0. Under eventlet
(Dragonflow's services monkey-patch), every call that may wait on a socket runs
in eventlet's thread pool, so green threads keep running. Importing this
module registers the ``[zbroker]`` options in ``oslo_config.cfg.CONF``.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, TypeVar, Union

from dragonflow.db import pub_sub_api
from oslo_config import cfg
from oslo_log import log as logging

from . import errors
from .publisher import Publisher
from .subscriber import Message, Resync, Subscriber

LOG = logging.getLogger(__name__)

#: The oslo.config group of this driver's options.
GROUP = "zbroker"

#: This driver's options, registered in ``cfg.CONF`` under ``[zbroker]``.
OPTS = [
    cfg.ListOpt(
        "publisher_endpoints",
        default=["tcp://127.0.0.1:5570"],
        help="The brokers' publisher endpoints (zbroker run --pub-bind), for "
        "Dragonflow's publishers: one is used at a time, the next when it "
        "cannot be reached. Replaces [df] publisher_transport, "
        "publisher_bind_address, publisher_port and "
        "publisher_multiproc_socket ([df_zmq] ipc_socket on master) for "
        "publishing.",
    ),
    cfg.ListOpt(
        "subscriber_endpoints",
        default=["tcp://127.0.0.1:5571"],
        help="The brokers' subscriber endpoints (zbroker run --sub-bind), for "
        "Dragonflow's subscribers: one is used at a time, the next when it "
        "cannot be reached or goes silent. The addresses Dragonflow registers "
        "([df] publishers_ips with publisher_transport and publisher_port) "
        "are tried after these.",
    ),
]

cfg.CONF.register_opts(OPTS, group=GROUP)


def list_opts() -> List[Any]:
    """For oslo-config-generator (entry point ``oslo.config.opts``)."""
    return [(GROUP, OPTS)]


# How long the subscriber's thread waits for messages before it looks at
# registrations and close() again (seconds).
_TICK = 0.1
# Most events taken from the client per wakeup.
_BATCH = 64
# How long subscribe and unsubscribe wait for the broker (seconds).
_CONFIRM_TIMEOUT = 2.0
# Longest a 'sync' for a gap waits for the subscriber to catch up.
_GAP_SYNC_DELAY = 2.0
# How long before a topic the broker did not confirm is subscribed again,
# and one it refused (e.g. over its filter limit).
_RETRY = 1.0
_RETRY_REFUSED = 30.0
# The longest close() and register_topic() wait for the subscriber's thread.
_JOIN_TIMEOUT = _CONFIRM_TIMEOUT + 5.0

_T = TypeVar("_T")


def _green() -> bool:
    """Whether eventlet monkey-patched threads (as Dragonflow's services do):
    then ``threading`` makes green threads, and blocking socket waits must
    run in eventlet's thread pool."""
    if "eventlet" not in sys.modules:
        return False
    from eventlet import patcher

    return bool(patcher.is_monkey_patched("thread"))


def _blocking(fn: Callable[..., _T], *args: Any) -> _T:
    """Calls ``fn``, which may wait on sockets: in eventlet's thread pool
    under eventlet (the calling green thread yields meanwhile), else here."""
    if _green():
        from eventlet import tpool

        result: _T = tpool.execute(fn, *args)
        return result
    return fn(*args)


def _topic_bytes(topic: Union[str, bytes]) -> bytes:
    # The publisher's send_event encodes topics as UTF-8.
    return topic if isinstance(topic, bytes) else topic.encode("utf-8")


class ZbrokerPubSub(pub_sub_api.PubSubApi):
    """Dragonflow's ``[df] pub_sub_driver``: a publisher and a subscriber
    over zbroker. Constructing it connects nothing (Dragonflow constructs a
    driver more than once per process)."""

    def __init__(self) -> None:
        super().__init__()
        self.publisher = ZbrokerPublisherAgent()
        self.subscriber = ZbrokerSubscriberAgent()

    def get_publisher(self) -> ZbrokerPublisherAgent:
        return self.publisher

    def get_subscriber(self) -> ZbrokerSubscriberAgent:
        return self.subscriber


class ZbrokerPublisherAgent(pub_sub_api.PublisherAgentBase):
    """PUSHes ``[topic, data]`` to one of ``[zbroker] publisher_endpoints``
    at a time. Connects on ``initialize()``, or on the first event sent."""

    def __init__(self) -> None:
        super().__init__()
        self._publisher: Optional[Publisher] = None
        # Green under eventlet: publishing green threads take turns.
        self._lock = threading.Lock()

    def initialize(self) -> None:
        super().initialize()
        with self._lock:
            self._connect()

    def _connect(self) -> Publisher:
        if self._publisher is None:
            endpoints = list(cfg.CONF.zbroker.publisher_endpoints)
            LOG.debug("zbroker: publishing to %s", endpoints)
            self._publisher = Publisher(endpoints)
        return self._publisher

    def _send_event(self, data: Optional[bytes], topic: bytes) -> None:
        if data is None:
            # pack_message failed and logged why.
            LOG.error("zbroker: not publishing an update that could not be packed")
            return
        with self._lock:
            publisher = self._connect()
            try:
                _blocking(publisher.publish, _topic_bytes(topic), data)
            except errors.Timeout as e:
                # As Dragonflow's other drivers do: the database write that
                # this update reports stands, and the controllers' periodic
                # sync ([df] db_sync_time) brings them up to date.
                LOG.error("zbroker: an update on topic %r was not published: %s", topic, e)

    def close(self) -> None:
        with self._lock:
            publisher, self._publisher = self._publisher, None
            if publisher is not None:
                # Waits up to the publisher's linger for queued messages.
                _blocking(publisher.close)


class _Wakeup:
    """A registration the subscriber's thread has to act on; whoever made it
    may wait until it did."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class ZbrokerSubscriberAgent(pub_sub_api.SubscriberAgentBase):
    """Receives Dragonflow's updates from one broker at a time: topics are
    ``exact`` filters; every possible loss of updates gives one
    ``callback(None, None, 'sync', None, None)``.

    ``initialize(callback)`` then ``daemonize()`` starts its thread (a daemon
    thread; a green thread under eventlet), ``close()`` stops it. Topics and
    brokers may be registered before or while it runs: ``register_topic``
    returns once the broker confirmed the topic (at most a few seconds; if it
    could not, the topic is subscribed as soon as possible, followed by a
    'sync'). A broker registered or unregistered while it runs makes it
    reconnect (one 'sync').
    """

    def __init__(self) -> None:
        super().__init__()
        # Guards topic_list, uri_list and the fields below across threads.
        self._lock = threading.Lock()
        self._wakeups: List[_Wakeup] = []
        self._running = False
        self._stopping = False
        self._thread_ident: Optional[int] = None
        # The subscriber's thread's own: a 'sync' is due (the subscription is
        # back after an incident); when the first gap since the last sync was
        # seen; topics not subscribed yet, with when to try again; those of
        # them the broker refused; a late topic was subscribed since the last
        # sync.
        self._sync_pending = False
        self._gap_since: Optional[float] = None
        self._late: Dict[bytes, float] = {}
        self._refused: Set[bytes] = set()
        self._recovered = False

    # -------------------------------------------------------- Dragonflow API

    def initialize(self, callback: Callable[..., Any]) -> None:
        super().initialize(callback)
        with self._lock:
            self._stopping = False

    def register_topic(self, topic: Union[str, bytes]) -> bool:
        with self._lock:
            is_new = bool(super().register_topic(topic))
        if is_new:
            self._wake(wait=True)
        return is_new

    def unregister_topic(self, topic: Union[str, bytes]) -> None:
        with self._lock:
            if topic not in self.topic_list:
                LOG.debug("zbroker: topic %r was not registered", topic)
                return
            super().unregister_topic(topic)
        self._wake(wait=True)

    def register_listen_address(self, uri: str) -> bool:
        with self._lock:
            is_new = bool(super().register_listen_address(uri))
        if is_new:
            self._wake(wait=True)
        return is_new

    def unregister_listen_address(self, uri: str) -> None:
        with self._lock:
            if uri not in self.uri_list:
                LOG.debug("zbroker: address %s was not registered", uri)
                return
            super().unregister_listen_address(uri)
        self._wake(wait=True)

    @property
    def is_running(self) -> bool:
        """Master's name: the subscriber's thread is alive."""
        daemon = getattr(self, "daemon", None)
        return daemon is not None and bool(daemon.is_alive())

    @property
    def is_daemonize(self) -> bool:
        """Dragonflow 4.0.0's name for :attr:`is_running`."""
        return self.is_running

    def close(self) -> None:
        """Stops the subscriber's thread (waiting for it, boundedly) and
        closes its connection. Idempotent."""
        with self._lock:
            self._stopping = True
        daemon = getattr(self, "daemon", None)
        if daemon is not None and daemon.is_alive() and threading.get_ident() != self._thread_ident:
            daemon.join(_JOIN_TIMEOUT)
            if daemon.is_alive():
                LOG.warning("zbroker: the subscriber's thread did not stop in time")

    # -------------------------------------------------------- the thread

    def run(self) -> None:
        """The subscriber's thread (started by ``daemonize()``)."""
        with self._lock:
            if self._stopping:
                return
            self._running = True
            self._thread_ident = threading.get_ident()
        subscriber: Optional[Subscriber] = None
        try:
            endpoints: List[str] = []
            while True:
                with self._lock:
                    if self._stopping:
                        break
                    wakeups, self._wakeups = self._wakeups, []
                    wanted_endpoints = self._endpoints()
                    wanted = [_topic_bytes(t) for t in self.topic_list]
                if subscriber is None or wanted_endpoints != endpoints:
                    if subscriber is not None:
                        LOG.info("zbroker: brokers changed to %s; reconnecting", wanted_endpoints)
                        _blocking(subscriber.close)
                        # Its filters went with it: a sync once they are back.
                        self._late.update(dict.fromkeys(wanted, 0.0))
                    endpoints = wanted_endpoints
                    subscriber = Subscriber(endpoints, confirm_timeout=_CONFIRM_TIMEOUT)
                    LOG.info("zbroker: subscribing at %s", endpoints)
                self._reconcile(subscriber, wanted, force=bool(wakeups))
                for wakeup in wakeups:
                    wakeup.done.set()
                events = _blocking(_collect, subscriber)
                for event in events:
                    self._dispatch(event)
                self._end_of_round(idle=not events)
        except Exception:
            # A bug: no more updates reach this process (is_running is False).
            LOG.exception("zbroker: the subscriber's thread failed and stopped")
        finally:
            with self._lock:
                self._running = False
                wakeups, self._wakeups = self._wakeups, []
            for wakeup in wakeups:
                wakeup.done.set()
            if subscriber is not None:
                _blocking(subscriber.close)

    def _endpoints(self) -> List[str]:
        """``[zbroker] subscriber_endpoints``, then the registered addresses
        (caller holds the lock)."""
        configured = list(cfg.CONF.zbroker.subscriber_endpoints)
        return list(dict.fromkeys([*configured, *self.uri_list]))

    def _wake(self, wait: bool) -> None:
        """Has the running thread act on a registration; with ``wait``,
        returns once it did (boundedly)."""
        wakeup = _Wakeup()
        with self._lock:
            if not self._running or threading.get_ident() == self._thread_ident:
                # Not running: the thread picks it up when it starts.
                return
            self._wakeups.append(wakeup)
        if wait and not wakeup.done.wait(_JOIN_TIMEOUT):
            LOG.warning("zbroker: the subscriber's thread did not take a registration in time")

    def _reconcile(self, subscriber: Subscriber, wanted: List[bytes], force: bool) -> None:
        """Subscribes the registered topics the broker does not hold and
        unsubscribes the others.

        A topic the broker did not confirm in time is "late": tried again
        every ``_RETRY`` seconds (or at the next registration), and once no
        topic is late any more, one 'sync' covers what they missed. A topic
        the broker refused is tried again every ``_RETRY_REFUSED`` seconds
        and holds back no sync."""
        held = {flt for kind, flt in subscriber.filters if kind == "exact"}
        late, refused = self._late, self._refused
        for topic in set(late).difference(wanted):
            del late[topic]
            refused.discard(topic)
        now = time.monotonic()
        for i, topic in enumerate(wanted):
            if topic in held:
                continue
            if not force and now < late.get(topic, 0.0):
                continue
            try:
                _blocking(subscriber.subscribe, "exact", topic)
            except errors.Timeout as e:
                LOG.warning("zbroker: topics not subscribed yet, will retry: %s", e)
                retry = time.monotonic() + _RETRY
                # The broker is not answering: the rest wait too.
                for other in wanted[i:]:
                    if other not in held:
                        late[other] = retry
                        refused.discard(other)
                break
            except errors.BrokerError as e:
                LOG.error("zbroker: the broker refused topic %r, will retry: %s", topic, e)
                late[topic] = time.monotonic() + _RETRY_REFUSED
                refused.add(topic)
                continue
            if late.pop(topic, None) is not None:
                refused.discard(topic)
                LOG.info("zbroker: topic %r subscribed late: updates may be missing", topic)
                self._recovered = True
        for topic in held.difference(wanted):
            try:
                _blocking(subscriber.unsubscribe, "exact", topic)
            except errors.Error as e:
                LOG.warning("zbroker: could not unsubscribe topic %r: %s", topic, e)
        if self._recovered and not set(late).difference(refused):
            self._recovered = False
            self._sync_pending = True

    def _dispatch(self, event: Union[Message, Resync]) -> None:
        if isinstance(event, Resync):
            LOG.info("zbroker: resubscribed (%s %s); asking for a sync", event.reason, event.detail)
            self._sync_pending = True
            return
        if event.gap and self._gap_since is None:
            LOG.warning("zbroker: the broker dropped updates for this subscriber; a sync follows")
            self._gap_since = time.monotonic()
        # A resubscription's sync goes before the new connection's updates.
        if self._sync_pending:
            self._send_sync()
        try:
            self._handle_incoming_event(event.payload)
        except Exception:
            LOG.exception("zbroker: failed to handle an update on topic %r", event.topic)

    def _end_of_round(self, idle: bool) -> None:
        """Sends the sync due, if any. One for a gap waits until the
        subscriber caught up (a round with nothing to read), at most
        ``_GAP_SYNC_DELAY``: a slow subscriber sees many gaps in one burst
        of drops, and Dragonflow re-reads everything once."""
        gap_due = self._gap_since is not None and (
            idle or time.monotonic() - self._gap_since >= _GAP_SYNC_DELAY
        )
        if self._sync_pending or gap_due:
            self._send_sync()

    def _send_sync(self) -> None:
        """One 'sync' for every incident since the last: Dragonflow re-reads
        its state from the database, after the updates delivered so far."""
        self._sync_pending = False
        self._gap_since = None
        try:
            self.db_changes_callback(None, None, "sync", None, None)
        except Exception:
            LOG.exception("zbroker: the 'sync' callback failed")


def _collect(subscriber: Subscriber) -> List[Union[Message, Resync]]:
    """Waits up to ``_TICK`` for events; returns those ready (at most
    ``_BATCH``)."""
    events: List[Union[Message, Resync]] = []
    event = subscriber.recv(timeout=_TICK)
    while event is not None:
        events.append(event)
        if len(events) >= _BATCH:
            break
        event = subscriber.recv(timeout=0)
    return events
