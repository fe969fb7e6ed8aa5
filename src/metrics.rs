//! The Prometheus exporter: renders the core's [`Snapshot`] and serves it
//! over HTTP from one mio thread with bounded connections, headers and time;
//! [`fetch`] is its client.

pub use zbroker_core::counters::{Connections, Counters, PeerFigures, Refusals, Snapshot};

/// Renders a snapshot in the Prometheus/OpenMetrics text format.
///
/// Counters end in `_total`; drops and refusals carry a `reason` label so a
/// dashboard can sum them or split them.
pub fn render(snapshot: &Snapshot) -> String {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::Registry;

    type Labels = Vec<(&'static str, &'static str)>;
    let mut registry = Registry::with_prefix("zbroker");
    let c = &snapshot.counters;
    let counters: [(&str, &str, u64); 9] = [
        (
            "messages_published",
            "Valid messages received from publishers",
            c.published,
        ),
        (
            "published_bytes",
            "Payload bytes of valid published messages",
            c.published_bytes,
        ),
        (
            "messages_unmatched",
            "Published messages no subscriber matched",
            c.unmatched,
        ),
        (
            "messages_routed",
            "Message deliveries routed (each took a seq number)",
            c.routed,
        ),
        (
            "messages_delivered",
            "Routed messages handed to libzmq",
            c.delivered,
        ),
        (
            "delivered_bytes",
            "Payload bytes handed to libzmq",
            c.delivered_bytes,
        ),
        ("commands", "Subscriber commands accepted", c.commands),
        (
            "backpressure_pauses",
            "Times the backpressure policy stopped reading publishers",
            c.backpressure_pauses,
        ),
        (
            "handshake_failures",
            "Failed handshakes (wrong mechanism, bad or unlisted key)",
            snapshot.connections.handshake_failures,
        ),
    ];
    for (name, help, value) in counters {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        registry.register(name, help, counter);
    }
    /// Name, help, label name, then (label value, count) pairs.
    type LabelledCounter = (
        &'static str,
        &'static str,
        &'static str,
        Vec<(&'static str, u64)>,
    );
    let (pubs, subs) = (
        &snapshot.connections.publisher_refusals,
        &snapshot.connections.subscriber_refusals,
    );
    let labelled: [LabelledCounter; 10] = [
        (
            "oversize_disconnects",
            "Peers dropped for a message part over max_message_size, by endpoint",
            "endpoint",
            vec![
                ("publisher", pubs.message_size),
                ("subscriber", subs.message_size),
            ],
        ),
        (
            "multipart_disconnects",
            "Peers dropped for a message of too many parts, by endpoint",
            "endpoint",
            vec![
                ("publisher", pubs.message_parts),
                ("subscriber", subs.message_parts),
            ],
        ),
        (
            "connections_refused",
            "Connections closed at once, over max_connections, by endpoint",
            "endpoint",
            vec![
                ("publisher", pubs.connections),
                ("subscriber", subs.connections),
            ],
        ),
        (
            "accept_failures",
            "Failed accepts (mostly: out of descriptors), by endpoint",
            "endpoint",
            vec![
                ("publisher", pubs.accept_failures),
                ("subscriber", subs.accept_failures),
            ],
        ),
        (
            "messages_dropped",
            "Routed or published messages dropped, by reason",
            "reason",
            vec![
                ("queue_full", c.dropped_queue_full),
                ("subscriber_gone", c.dropped_subscriber_gone),
                ("unauthorized", c.unauthorized_publishes),
            ],
        ),
        (
            "malformed",
            "Malformed messages refused, by endpoint",
            "endpoint",
            vec![
                ("publisher", c.malformed_publishes),
                ("subscriber", c.malformed_commands),
            ],
        ),
        (
            "commands_refused",
            "Well-formed subscriber commands refused, by reason",
            "reason",
            vec![
                ("limit", c.refused_limit),
                ("rate", c.refused_rate),
                ("unauthorized", c.refused_unauthorized),
            ],
        ),
        (
            "xpub_messages",
            "Messages for the XPUB front's SUB sockets (sent once for all), by outcome",
            "outcome",
            vec![("sent", c.xpub_delivered), ("dropped", c.xpub_dropped)],
        ),
        (
            "xpub_notices",
            "Subscription notices from the XPUB front's SUB sockets, by outcome",
            "outcome",
            vec![
                ("subscribe", c.xpub_subscribes),
                ("unsubscribe", c.xpub_unsubscribes),
                ("unknown_unsubscribe", c.xpub_unknown_unsubscribes),
                ("refused", c.xpub_refused_notices),
                ("malformed", c.xpub_malformed_notices),
            ],
        ),
        (
            "subscribers_removed",
            "Subscribers the broker forgot, by reason",
            "reason",
            vec![
                ("expired", c.expired_subscribers),
                ("unreachable", c.unreachable_subscribers),
                ("slow_consumer", c.slow_disconnects),
            ],
        ),
    ];
    for (name, help, label, values) in labelled {
        let family = Family::<Labels, Counter<u64>>::default();
        for (value_name, value) in values {
            family
                .get_or_create(&vec![(label, value_name)])
                .inc_by(value);
        }
        registry.register(name, help, family);
    }
    let replies = Counter::<u64>::default();
    replies.inc_by(c.dropped_replies);
    registry.register(
        "replies_dropped",
        "Replies dropped because a subscriber did not read",
        replies,
    );
    let sub_drops = Counter::<u64>::default();
    sub_drops.inc_by(snapshot.xpub_sub_drops);
    registry.register(
        "xpub_sub_drops",
        "Messages libzmq dropped for a SUB on the XPUB front whose pipe was full, per message and SUB",
        sub_drops,
    );
    let auth = Counter::<u64>::default();
    auth.inc_by(snapshot.connections.auth_denied);
    registry.register("auth_denied", "CURVE keys the ZAP handler refused", auth);
    let reloads = Family::<Labels, Counter<u64>>::default();
    reloads
        .get_or_create(&vec![("outcome", "installed")])
        .inc_by(snapshot.connections.key_reloads);
    reloads
        .get_or_create(&vec![("outcome", "refused")])
        .inc_by(snapshot.connections.key_reload_failures);
    registry.register(
        "key_reloads",
        "Key-list reloads (SIGHUP): installed, or refused because a list did not load",
        reloads,
    );
    let revoked = Counter::<u64>::default();
    revoked.inc_by(c.revoked_filters);
    registry.register(
        "filters_revoked",
        "Subscriber filters cut because reloaded key lists no longer allow them",
        revoked,
    );

    let gauges: [(&str, &str, u64); 12] = [
        (
            "index_heap_bytes",
            "Heap bytes of the routing index",
            snapshot.index_heap_bytes,
        ),
        (
            "libzmq_queued_bytes",
            "Bytes in libzmq's pipes to subscribers",
            snapshot.libzmq_queued_bytes,
        ),
        ("subscribers", "Subscribers tracked", snapshot.subscribers),
        (
            "subscriptions",
            "Filters held across all subscribers",
            snapshot.subscriptions,
        ),
        (
            "queued_messages",
            "Messages waiting in broker queues",
            snapshot.queued_messages,
        ),
        (
            "queued_bytes",
            "Bytes waiting in broker queues",
            snapshot.queued_bytes,
        ),
        (
            "max_queue_depth",
            "Longest single subscriber queue, in messages",
            snapshot.max_queue_depth,
        ),
        (
            "publishers_paused",
            "1 while the backpressure policy stops reading publishers",
            snapshot.publishers_paused,
        ),
        (
            "publisher_connections",
            "Open publisher connections",
            snapshot.connections.publishers,
        ),
        (
            "subscriber_connections",
            "Open subscriber connections",
            snapshot.connections.subscribers,
        ),
        (
            "xpub_connections",
            "Open SUB connections on the XPUB front",
            snapshot.connections.xpub_subscribers,
        ),
        (
            "xpub_prefixes",
            "Distinct prefixes the XPUB front's SUB sockets hold",
            snapshot.xpub_prefixes,
        ),
    ];
    for (name, help, value) in gauges {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, gauge);
    }
    render_cluster(&mut registry, snapshot);
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// The cluster's series: totals, and per peer broker (label `peer`, its
/// broker id).
fn render_cluster(registry: &mut prometheus_client::registry::Registry, snapshot: &Snapshot) {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;

    let c = &snapshot.counters;
    let totals: [(&str, &str, u64); 8] = [
        (
            "cluster_messages_forwarded",
            "Messages forwarded to peer brokers, once per peer",
            c.peer_forwarded,
        ),
        (
            "cluster_messages_received",
            "Messages received from peer brokers",
            c.peer_received,
        ),
        (
            "cluster_messages_unmatched",
            "Messages from peers no local subscriber matched any more",
            c.peer_unmatched,
        ),
        (
            "cluster_messages_lost",
            "Messages peers dropped for this broker, seen as seq jumps",
            c.peer_lost,
        ),
        (
            "cluster_peer_downs",
            "Times a peer link went silent",
            c.peer_downs,
        ),
        (
            "cluster_peers_expired",
            "Peers forgotten after the peer timeout",
            c.peer_expired,
        ),
        (
            "cluster_interest_changes",
            "Interest changes applied from peers",
            c.peer_interest_changes,
        ),
        (
            "cluster_link_errors",
            "Link messages unreadable or out of place",
            c.peer_malformed,
        ),
    ];
    for (name, help, value) in totals {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        registry.register(name, help, counter);
    }
    let snapshots = Family::<Vec<(&'static str, &'static str)>, Counter<u64>>::default();
    snapshots
        .get_or_create(&vec![("direction", "sent")])
        .inc_by(c.peer_snapshots_sent);
    snapshots
        .get_or_create(&vec![("direction", "received")])
        .inc_by(c.peer_snapshots);
    registry.register(
        "cluster_interest_snapshots",
        "Full interest snapshots sent to and received from peers",
        snapshots,
    );
    let losses = Counter::<u64>::default();
    losses.inc_by(snapshot.membership.registry_losses);
    registry.register(
        "cluster_registry_losses",
        "Times etcd (the member registry) became unreachable",
        losses,
    );
    for (name, help, value) in [
        (
            "cluster_members",
            "Cluster members known, this broker not counted",
            snapshot.membership.members,
        ),
        (
            "cluster_registry_up",
            "1 while the member registry (etcd) answers; 1 with static peers",
            snapshot.membership.registry_up,
        ),
        (
            "cluster_peers_served",
            "Peer links served on the cluster endpoint",
            snapshot.peers,
        ),
        (
            "cluster_interest_filters",
            "Distinct local filters, as told to peers",
            snapshot.interest_filters,
        ),
    ] {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, gauge);
    }
    type Peer = Vec<(&'static str, String)>;
    let up = Family::<Peer, Gauge<i64>>::default();
    let interest = Family::<Peer, Gauge<i64>>::default();
    let queued = Family::<Peer, Gauge<i64>>::default();
    let forwarded = Family::<Peer, Counter<u64>>::default();
    let dropped = Family::<Peer, Counter<u64>>::default();
    let received = Family::<Peer, Counter<u64>>::default();
    let lost = Family::<Peer, Counter<u64>>::default();
    let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for peer in &snapshot.peers_detail {
        let labels = vec![("peer", peer.peer.clone())];
        up.get_or_create(&labels).set(gauge(peer.up));
        interest
            .get_or_create(&labels)
            .set(gauge(peer.interest_entries));
        queued.get_or_create(&labels).set(gauge(peer.queued));
        forwarded.get_or_create(&labels).inc_by(peer.forwarded);
        dropped.get_or_create(&labels).inc_by(peer.dropped);
        received.get_or_create(&labels).inc_by(peer.received);
        lost.get_or_create(&labels).inc_by(peer.lost);
    }
    registry.register(
        "peer_up",
        "1 while this broker's link to the peer is answered",
        up,
    );
    registry.register(
        "peer_interest_entries",
        "Filters of the peer's interest held here",
        interest,
    );
    registry.register(
        "peer_queued_messages",
        "Messages waiting in the peer's queue here",
        queued,
    );
    registry.register(
        "peer_messages_forwarded",
        "Messages forwarded to the peer",
        forwarded,
    );
    registry.register(
        "peer_messages_dropped",
        "Messages for the peer dropped here (queue full, link broke)",
        dropped,
    );
    registry.register(
        "peer_messages_received",
        "Messages received from the peer",
        received,
    );
    registry.register(
        "peer_messages_lost",
        "Messages the peer dropped for this broker (seq jumps)",
        lost,
    );
}

/// Limits the metrics [`Exporter`] holds every peer to. [`Default`] gives
/// the documented defaults; change fields on a default value
/// (`let mut l = ExporterLimits::default(); l.max_connections = 8;`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExporterLimits {
    /// Connections open at once (default 64). A connection accepted over
    /// this gets a best-effort `503 Service Unavailable` and is closed at
    /// once, so a flood of idle connections costs one descriptor for an
    /// instant each and never queues honest scrapers behind it in the
    /// listen backlog. 0 refuses every connection.
    pub max_connections: usize,
    /// Bytes of request line plus headers buffered per connection (default
    /// 8 KiB). A request whose head does not end within this many bytes, or
    /// that has more than 64 headers, gets `431 Request Header Fields Too
    /// Large` and is closed.
    pub max_header_bytes: usize,
    /// The most time one connection may take, from accept to the last byte
    /// of its response (default 5 s): past it the connection is closed
    /// whatever state it is in, so slow senders and readers cannot keep a
    /// slot.
    pub request_timeout: std::time::Duration,
    /// How long the exporter stops accepting after `accept` fails for lack
    /// of resources (`EMFILE`, `ENFILE`, `ENOBUFS`, ...) (default 100 ms).
    /// Connections already open are served meanwhile; pending ones wait in
    /// the kernel's backlog.
    pub accept_backoff: std::time::Duration,
}

impl ExporterLimits {
    /// The defaults: 64 connections, 8 KiB of request head, 5 s per
    /// connection, 100 ms pause after an accept error.
    pub const DEFAULT: ExporterLimits = ExporterLimits {
        max_connections: 64,
        max_header_bytes: 8 * 1024,
        request_timeout: std::time::Duration::from_secs(5),
        accept_backoff: std::time::Duration::from_millis(100),
    };
}

impl Default for ExporterLimits {
    /// [`ExporterLimits::DEFAULT`].
    fn default() -> Self {
        ExporterLimits::DEFAULT
    }
}

/// What the exporter has done since it started, read by
/// [`Exporter::stats`]. Every field is a monotonic count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExporterStats {
    /// Connections accepted and kept (under `max_connections`).
    pub connections: u64,
    /// Connections accepted and closed at once because `max_connections`
    /// were open.
    pub refused_at_cap: u64,
    /// Requests answered `431` because their head passed `max_header_bytes`
    /// or had too many headers.
    pub headers_too_large: u64,
    /// Requests answered `400` because they were not HTTP/1.x.
    pub bad_requests: u64,
    /// Connections closed because they passed `request_timeout` before
    /// their response was written.
    pub timed_out: u64,
    /// `accept` calls that failed for any reason other than "no connection
    /// pending": each one either pauses accepting for `accept_backoff`
    /// (resource errors such as `EMFILE`) or drops one aborted connection.
    pub accept_errors: u64,
    /// `GET /metrics` (or `HEAD`) requests answered `200`.
    pub scrapes: u64,
}

/// The exporter's counters, shared between its thread and [`Exporter`].
#[derive(Debug, Default)]
struct SharedStats {
    connections: std::sync::atomic::AtomicU64,
    refused_at_cap: std::sync::atomic::AtomicU64,
    headers_too_large: std::sync::atomic::AtomicU64,
    bad_requests: std::sync::atomic::AtomicU64,
    timed_out: std::sync::atomic::AtomicU64,
    accept_errors: std::sync::atomic::AtomicU64,
    scrapes: std::sync::atomic::AtomicU64,
}

impl SharedStats {
    fn bump(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn read(&self) -> ExporterStats {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        ExporterStats {
            connections: get(&self.connections),
            refused_at_cap: get(&self.refused_at_cap),
            headers_too_large: get(&self.headers_too_large),
            bad_requests: get(&self.bad_requests),
            timed_out: get(&self.timed_out),
            accept_errors: get(&self.accept_errors),
            scrapes: get(&self.scrapes),
        }
    }
}

/// Serves `GET /metrics` over HTTP/1.1 from one background thread, rendering
/// whatever `snapshot` returns at scrape time, with every peer held to
/// [`ExporterLimits`]: at most `max_connections` open, `max_header_bytes`
/// buffered each, `request_timeout` each, one thread whatever the load.
/// A failing `accept` (descriptors exhausted) pauses accepting instead of
/// stopping the exporter. One request per connection (`Connection: close`).
/// Stops, closing its listener and connections, when dropped.
pub struct Exporter {
    shared: std::sync::Arc<Shared>,
    waker: mio::Waker,
    thread: Option<std::thread::JoinHandle<()>>,
    address: String,
}

/// What [`Exporter`] and its thread both see.
#[derive(Debug, Default)]
struct Shared {
    stop: std::sync::atomic::AtomicBool,
    stats: SharedStats,
}

const LISTENER: mio::Token = mio::Token(0);
const WAKER: mio::Token = mio::Token(1);
/// Connection `i` is `Token(i + FIRST_CONNECTION)`.
const FIRST_CONNECTION: usize = 2;
/// Headers per request before `431`.
const MAX_HEADERS: usize = 64;
/// Connections accepted per loop turn before other connections get a turn.
const ACCEPT_BATCH: usize = 64;
/// After its response, a connection is read and discarded for up to this
/// long or [`LINGER_BYTES`], so that closing it with unread input (a request
/// cut short at `431`) does not reset it before the peer read the answer.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Exporter {
    /// Binds `address` (`host:port`; port 0 picks one) and starts serving
    /// with [`ExporterLimits::DEFAULT`]. Errors only if binding or starting
    /// the thread fails.
    pub fn start(
        address: &str,
        snapshot: impl Fn() -> Snapshot + Send + 'static,
    ) -> std::io::Result<Exporter> {
        Exporter::start_with(address, ExporterLimits::DEFAULT, snapshot)
    }

    /// [`Exporter::start`] with explicit limits.
    pub fn start_with(
        address: &str,
        limits: ExporterLimits,
        snapshot: impl Fn() -> Snapshot + Send + 'static,
    ) -> std::io::Result<Exporter> {
        let listener = std::net::TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        let bound = listener.local_addr()?.to_string();
        let mut listener = mio::net::TcpListener::from_std(listener);
        let poll = mio::Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, mio::Interest::READABLE)?;
        let waker = mio::Waker::new(poll.registry(), WAKER)?;
        let shared = std::sync::Arc::new(Shared::default());
        let mut server = Server {
            poll,
            listener,
            limits,
            snapshot,
            shared: std::sync::Arc::clone(&shared),
            connections: (0..limits.max_connections).map(|_| None).collect(),
            accept_paused_until: None,
            accept_pending: true,
        };
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || server.run())?;
        Ok(Exporter {
            shared,
            waker,
            thread: Some(thread),
            address: bound,
        })
    }

    /// The address it listens on, port resolved (`127.0.0.1:9100`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Counts of what the exporter accepted, refused and served so far.
    pub fn stats(&self) -> ExporterStats {
        self.shared.stats.read()
    }
}

impl Drop for Exporter {
    /// Stops the thread (woken at once, not at its next timeout), closing
    /// the listener and every connection, and waits for it.
    fn drop(&mut self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Only fails if the eventfd counter overflows, which needs 2^64
        // wakes; the stop flag is still seen at the thread's next turn.
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The exporter thread's state.
struct Server<F> {
    poll: mio::Poll,
    listener: mio::net::TcpListener,
    limits: ExporterLimits,
    snapshot: F,
    shared: std::sync::Arc<Shared>,
    /// `max_connections` slots; a connection's token names its slot.
    connections: Vec<Option<Connection>>,
    /// Set after a resource error from `accept`: no accepting until then.
    accept_paused_until: Option<std::time::Instant>,
    /// `accept` may have more to give (edge-triggered: no new event will
    /// say so).
    accept_pending: bool,
}

impl<F: Fn() -> Snapshot> Server<F> {
    fn run(&mut self) {
        let mut events = mio::Events::with_capacity(128);
        loop {
            if self.shared.stop.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let now = std::time::Instant::now();
            if self.accept_paused_until.is_some_and(|until| now >= until) {
                self.accept_paused_until = None;
                self.accept_pending = true;
            }
            if self.accept_pending && self.accept_paused_until.is_none() {
                self.accept(now);
            }
            let timeout = self.timeout(std::time::Instant::now());
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // Polling itself failed (out of memory): back off rather
                // than spin, and try again.
                Err(_) => {
                    std::thread::sleep(
                        self.limits
                            .accept_backoff
                            .max(std::time::Duration::from_millis(10)),
                    );
                    continue;
                }
            }
            let now = std::time::Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_pending = true,
                    WAKER => {}
                    mio::Token(token) => {
                        self.drive(token.wrapping_sub(FIRST_CONNECTION), now);
                    }
                }
            }
            self.expire(std::time::Instant::now());
        }
    }

    /// How long the next poll may wait: until the earliest connection
    /// deadline or the end of an accept pause; no wait if `accept` has
    /// more pending.
    fn timeout(&self, now: std::time::Instant) -> Option<std::time::Duration> {
        if self.accept_pending && self.accept_paused_until.is_none() {
            return Some(std::time::Duration::ZERO);
        }
        self.connections
            .iter()
            .flatten()
            .map(|c| c.deadline)
            .chain(self.accept_paused_until)
            .min()
            .map(|at| at.saturating_duration_since(now))
    }

    fn accept(&mut self, now: std::time::Instant) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.accept_pending = false;
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // The peer gave up between SYN and accept: that connection
                // is gone, the next may not be.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    SharedStats::bump(&self.shared.stats.accept_errors);
                    continue;
                }
                // EMFILE, ENFILE, ENOBUFS, ENOMEM or anything unforeseen:
                // stop accepting for a while instead of retrying at once
                // (the error would repeat, and the loop would spin).
                Err(_) => {
                    SharedStats::bump(&self.shared.stats.accept_errors);
                    self.accept_paused_until = Some(now + self.limits.accept_backoff);
                    return;
                }
            };
            self.admit(stream, now);
        }
        // A full batch: more may be pending; `timeout` polls without
        // waiting so connections already open get their turn first.
        self.accept_pending = true;
    }

    fn admit(&mut self, mut stream: mio::net::TcpStream, now: std::time::Instant) {
        let Some(slot) = self.connections.iter().position(Option::is_none) else {
            SharedStats::bump(&self.shared.stats.refused_at_cap);
            // Best effort on a fresh socket (its send buffer is empty);
            // whatever happens, it is closed when dropped here.
            let _ = std::io::Write::write(
                &mut stream,
                response(503, "Service Unavailable", "", "text/plain", b"busy\n").as_slice(),
            );
            return;
        };
        let registered = self.poll.registry().register(
            &mut stream,
            mio::Token(slot + FIRST_CONNECTION),
            mio::Interest::READABLE | mio::Interest::WRITABLE,
        );
        if registered.is_err() {
            // Out of kernel memory: drop this one, keep the others.
            return;
        }
        SharedStats::bump(&self.shared.stats.connections);
        self.connections[slot] = Some(Connection {
            stream,
            state: State::Reading(Vec::new()),
            deadline: now + self.limits.request_timeout,
        });
        // Edge-triggered: the request may already be there.
        self.drive(slot, now);
    }

    /// Moves connection `slot` on as far as its socket allows, closing it
    /// when done or broken.
    fn drive(&mut self, slot: usize, now: std::time::Instant) {
        let Some(Some(connection)) = self.connections.get_mut(slot) else {
            return;
        };
        let keep = connection.drive(&self.limits, &self.shared.stats, &self.snapshot, now);
        if !keep {
            self.close(slot);
        }
    }

    fn expire(&mut self, now: std::time::Instant) {
        for slot in 0..self.connections.len() {
            let Some(connection) = &self.connections[slot] else {
                continue;
            };
            if connection.deadline <= now {
                if !matches!(connection.state, State::Lingering { .. }) {
                    SharedStats::bump(&self.shared.stats.timed_out);
                }
                self.close(slot);
            }
        }
    }

    fn close(&mut self, slot: usize) {
        if let Some(mut connection) = self.connections[slot].take() {
            let _ = self.poll.registry().deregister(&mut connection.stream);
        }
    }
}

/// One accepted connection.
struct Connection {
    stream: mio::net::TcpStream,
    state: State,
    /// Closed at this instant whatever its state.
    deadline: std::time::Instant,
}

enum State {
    /// Reading the request head (never more than `max_header_bytes`).
    Reading(Vec<u8>),
    /// Writing the response; `written` bytes of it are out.
    Writing { response: Vec<u8>, written: usize },
    /// Response out and write side shut: discarding input until the peer
    /// closes.
    Lingering { discarded: usize },
}

impl Connection {
    /// Returns whether to keep the connection open.
    fn drive(
        &mut self,
        limits: &ExporterLimits,
        stats: &SharedStats,
        snapshot: &impl Fn() -> Snapshot,
        now: std::time::Instant,
    ) -> bool {
        use std::io::{Read, Write};
        loop {
            match &mut self.state {
                State::Reading(head) => {
                    let mut chunk = [0u8; 4096];
                    let room = limits.max_header_bytes.saturating_sub(head.len());
                    let answer = if room == 0 {
                        Some(too_large(stats))
                    } else {
                        let want = room.min(chunk.len());
                        match self.stream.read(&mut chunk[..want]) {
                            Ok(0) => return false,
                            Ok(n) => {
                                let scan_from = head.len().saturating_sub(3);
                                head.extend_from_slice(&chunk[..n]);
                                answer(head, scan_from, limits, stats, snapshot)
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
                            Err(_) => return false,
                        }
                    };
                    if let Some(response) = answer {
                        self.state = State::Writing {
                            response,
                            written: 0,
                        };
                    }
                }
                State::Writing { response, written } => {
                    if *written == response.len() {
                        let _ = self.stream.shutdown(std::net::Shutdown::Write);
                        self.deadline = self.deadline.min(now + LINGER);
                        self.state = State::Lingering { discarded: 0 };
                        continue;
                    }
                    match self.stream.write(&response[*written..]) {
                        Ok(0) => return false,
                        Ok(n) => *written += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => return false,
                    }
                }
                State::Lingering { discarded } => {
                    let mut chunk = [0u8; 4096];
                    match self.stream.read(&mut chunk) {
                        Ok(0) => return false,
                        Ok(n) => {
                            *discarded += n;
                            if *discarded > LINGER_BYTES {
                                return false;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => return false,
                    }
                }
            }
        }
    }
}

fn too_large(stats: &SharedStats) -> Vec<u8> {
    SharedStats::bump(&stats.headers_too_large);
    response(
        431,
        "Request Header Fields Too Large",
        "",
        "text/plain",
        b"request header too large\n",
    )
}

/// The response to the request head in `head` if it is complete (or cannot
/// be), else `None`. `scan_from` is where new bytes may complete the head.
fn answer(
    head: &[u8],
    scan_from: usize,
    limits: &ExporterLimits,
    stats: &SharedStats,
    snapshot: &impl Fn() -> Snapshot,
) -> Option<Vec<u8>> {
    let tail = head.get(scan_from..).unwrap_or_default();
    // Parse only once the head can have ended, so a peer sending one byte
    // at a time costs linear, not quadratic, work.
    let ended = tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n");
    if !ended {
        return (head.len() >= limits.max_header_bytes).then(|| too_large(stats));
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return (head.len() >= limits.max_header_bytes).then(|| too_large(stats));
        }
        Err(httparse::Error::TooManyHeaders) => return Some(too_large(stats)),
        Err(_) => {
            SharedStats::bump(&stats.bad_requests);
            return Some(response(
                400,
                "Bad Request",
                "",
                "text/plain",
                b"bad request\n",
            ));
        }
    }
    let path = request.path.unwrap_or_default();
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if path != "/metrics" {
        return Some(response(
            404,
            "Not Found",
            "",
            "text/plain",
            b"see /metrics\n",
        ));
    }
    let head_only = match request.method {
        Some("GET") => false,
        Some("HEAD") => true,
        _ => {
            return Some(response(
                405,
                "Method Not Allowed",
                "Allow: GET, HEAD\r\n",
                "text/plain",
                b"use GET\n",
            ));
        }
    };
    SharedStats::bump(&stats.scrapes);
    let body = render(&snapshot());
    let mut full = response(200, "OK", "", OPENMETRICS, body.as_bytes());
    if head_only {
        full.truncate(full.len() - body.len());
    }
    Some(full)
}

/// A complete `Connection: close` response.
fn response(code: u16, reason: &str, extra: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// Fetches and returns the metrics text from a broker's `--metrics-bind`
/// endpoint (`zbroker stats`).
pub fn fetch(url: &str) -> Result<String, String> {
    let url = if url.starts_with("http://") {
        url.to_string()
    } else {
        format!("http://{url}/metrics")
    };
    ureq::get(&url)
        .call()
        .map_err(|e| {
            format!("cannot reach {url}: {e}; is the broker running with --metrics-bind?")
        })?
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("reading {url}: {e}"))
}
