//! Counters the broker keeps about itself. The core updates plain integers
//! (it is single-threaded); exporters read a [`Snapshot`].

/// Logs at most once a second, counting what it held back, so a flood of bad
/// input (malformed frames, failed handshakes) cannot turn into a flood of
/// log lines.
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    next: Option<std::time::Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// Logs `what` as a warning unless one was logged less than a second ago.
    pub(crate) fn warn(&mut self, now: std::time::Instant, what: std::fmt::Arguments<'_>) {
        if self.next.is_some_and(|next| now < next) {
            self.suppressed += 1;
            return;
        }
        self.next = Some(now + std::time::Duration::from_secs(1));
        let suppressed = std::mem::take(&mut self.suppressed);
        tracing::warn!(suppressed, "{what}");
    }
}

/// Monotonic counters since start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Valid messages received from publishers.
    pub published: u64,
    /// Payload bytes of valid published messages.
    pub published_bytes: u64,
    /// Published messages that matched no subscriber.
    pub unmatched: u64,
    /// (message, subscriber) pairs routed: each took one seq number.
    pub routed: u64,
    /// Routed messages handed to libzmq.
    pub delivered: u64,
    /// Payload bytes of delivered messages.
    pub delivered_bytes: u64,
    /// Routed messages dropped because a queue was full (seen as a gap).
    pub dropped_queue_full: u64,
    /// Queued messages dropped because their subscriber went away.
    pub dropped_subscriber_gone: u64,
    /// Replies (OK, ERR, PONG) dropped because a queue was full.
    pub dropped_replies: u64,
    /// Publisher messages refused as malformed.
    pub malformed_publishes: u64,
    /// Subscriber commands refused as malformed.
    pub malformed_commands: u64,
    /// Commands refused by a limit (subscribers, filters).
    pub refused_limit: u64,
    /// Commands refused by the per-subscriber command rate limit.
    pub refused_rate: u64,
    /// SUB commands refused by the key's ACL.
    pub refused_unauthorized: u64,
    /// Published messages dropped by the publisher key's ACL.
    pub unauthorized_publishes: u64,
    /// Subscriber commands accepted.
    pub commands: u64,
    /// Subscribers forgotten after `sub_timeout` of silence.
    pub expired_subscribers: u64,
    /// Subscribers forgotten because libzmq no longer knew them.
    pub unreachable_subscribers: u64,
    /// Subscribers cut off by the `disconnect` or `backpressure` overflow
    /// policy.
    pub slow_disconnects: u64,
    /// Times the `backpressure` policy stopped reading publishers.
    pub backpressure_pauses: u64,
}

/// Counters plus the current gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Counters since start.
    pub counters: Counters,
    /// Subscribers tracked now.
    pub subscribers: u64,
    /// (filter, subscriber) pairs held now.
    pub subscriptions: u64,
    /// Messages waiting in broker-side queues now.
    pub queued_messages: u64,
    /// Bytes of the deliveries waiting in broker-side queues now, each
    /// counted as if copied (payloads are shared, so real memory is less).
    pub queued_bytes: u64,
    /// The longest single subscriber queue now, in messages.
    pub max_queue_depth: u64,
    /// 1 while the `backpressure` policy holds publishers back, else 0.
    pub publishers_paused: u64,
    /// Connection-level figures the event loop adds (zero in the bare core).
    pub connections: Connections,
}

/// What the event loop sees of connections, from libzmq's socket monitors
/// and the ZAP handler.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connections {
    /// Publisher connections open now.
    pub publishers: u64,
    /// Subscriber connections open now (a subscriber is counted in
    /// `Snapshot::subscribers` once it has sent a command).
    pub subscribers: u64,
    /// Handshakes that failed: wrong mechanism (plaintext against CURVE),
    /// bad keys, or keys the ZAP handler refused.
    pub handshake_failures: u64,
    /// CURVE keys the ZAP handler refused.
    pub auth_denied: u64,
}

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
    let labelled: [LabelledCounter; 4] = [
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
    let auth = Counter::<u64>::default();
    auth.inc_by(snapshot.connections.auth_denied);
    registry.register("auth_denied", "CURVE keys the ZAP handler refused", auth);

    let gauges: [(&str, &str, u64); 8] = [
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
    ];
    for (name, help, value) in gauges {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, gauge);
    }
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// Serves `GET /metrics` over HTTP from a background thread, rendering
/// whatever `snapshot` returns at scrape time. Stops when dropped.
pub struct Exporter {
    server: std::sync::Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    address: String,
}

impl Exporter {
    /// Binds `address` (`host:port`) and starts serving.
    pub fn start(
        address: &str,
        snapshot: impl Fn() -> Snapshot + Send + 'static,
    ) -> std::io::Result<Exporter> {
        let server = tiny_http::Server::http(address).map_err(std::io::Error::other)?;
        let bound = server
            .server_addr()
            .to_ip()
            .map_or_else(|| address.to_string(), |a| a.to_string());
        let server = std::sync::Arc::new(server);
        let serving = std::sync::Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    let response = if request.url() == "/metrics" {
                        let content_type = tiny_http::Header::from_bytes(
                            &b"Content-Type"[..],
                            &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                        )
                        .expect("a valid static header");
                        tiny_http::Response::from_string(render(&snapshot()))
                            .with_header(content_type)
                    } else {
                        tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                    };
                    // A client that hung up is not our problem.
                    let _ = request.respond(response);
                }
            })?;
        Ok(Exporter {
            server,
            thread: Some(thread),
            address: bound,
        })
    }

    /// The address it listens on (port resolved).
    pub fn address(&self) -> &str {
        &self.address
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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
