//! The broker's metrics as an operator scrapes them: Prometheus text parsed
//! into series, and the names of the series the tests read.

use std::collections::BTreeMap;

/// Metrics by Prometheus series name (labels included), e.g.
/// `zbroker_messages_dropped_total{reason="queue_full"}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics(pub BTreeMap<String, u64>);

impl Metrics {
    /// Parses Prometheus (or OpenMetrics) text; comments are skipped.
    pub fn parse(text: &str) -> Metrics {
        let values = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse::<f64>().ok()? as u64))
            })
            .collect();
        Metrics(values)
    }

    /// Scrapes an exporter: `http://HOST:PORT/metrics` or `HOST:PORT`.
    pub fn scrape(url: &str) -> Metrics {
        let text = zbroker::metrics::fetch(url).expect("scrape the broker");
        Metrics::parse(&text)
    }

    /// The value of `name`; fails the test if there is no such series.
    pub fn get(&self, name: &str) -> u64 {
        *self
            .0
            .get(name)
            .unwrap_or_else(|| panic!("the broker exports no {name}: {self:#?}"))
    }

    /// How much `name` grew since `before`; fails the test if it shrank.
    pub fn since(&self, before: &Metrics, name: &str) -> u64 {
        let (now, then) = (self.get(name), before.get(name));
        now.checked_sub(then)
            .unwrap_or_else(|| panic!("{name} went back from {then} to {now}"))
    }

    /// The gauges as they are with only `subscribers` (holding
    /// `subscriptions` filters between them) and `publishers` connected,
    /// each on one connection, and nothing queued.
    pub fn at_baseline(&self, subscribers: u64, subscriptions: u64, publishers: u64) -> bool {
        self.get(SUBSCRIBERS) == subscribers
            && self.get(SUBSCRIPTIONS) == subscriptions
            && self.get(QUEUED_BYTES) == 0
            && self.get(QUEUED_MESSAGES) == 0
            && self.get(SUB_CONNECTIONS) == subscribers
            && self.get(PUB_CONNECTIONS) == publishers
    }
}

/// One sample from Prometheus text; fails the test if there is none.
pub fn metric(text: &str, name: &str) -> u64 {
    Metrics::parse(text)
        .0
        .get(name)
        .copied()
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

pub const SUBSCRIBERS: &str = "zbroker_subscribers";
pub const SUBSCRIPTIONS: &str = "zbroker_subscriptions";
pub const QUEUED_BYTES: &str = "zbroker_queued_bytes";
pub const QUEUED_MESSAGES: &str = "zbroker_queued_messages";
pub const SUB_CONNECTIONS: &str = "zbroker_subscriber_connections";
pub const PUB_CONNECTIONS: &str = "zbroker_publisher_connections";
pub const PUBLISHERS_PAUSED: &str = "zbroker_publishers_paused";
pub const PUBLISHED: &str = "zbroker_messages_published_total";
pub const ROUTED: &str = "zbroker_messages_routed_total";
pub const DELIVERED: &str = "zbroker_messages_delivered_total";
pub const BACKPRESSURE_PAUSES: &str = "zbroker_backpressure_pauses_total";
pub const MALFORMED_PUBLISHES: &str = "zbroker_malformed_total{endpoint=\"publisher\"}";
pub const MALFORMED_COMMANDS: &str = "zbroker_malformed_total{endpoint=\"subscriber\"}";
pub const REFUSED_LIMIT: &str = "zbroker_commands_refused_total{reason=\"limit\"}";
pub const REFUSED_RATE: &str = "zbroker_commands_refused_total{reason=\"rate\"}";
pub const REPLIES_DROPPED: &str = "zbroker_replies_dropped_total";
pub const EXPIRED: &str = "zbroker_subscribers_removed_total{reason=\"expired\"}";
pub const UNREACHABLE: &str = "zbroker_subscribers_removed_total{reason=\"unreachable\"}";
pub const HANDSHAKE_FAILURES: &str = "zbroker_handshake_failures_total";
pub const AUTH_DENIED: &str = "zbroker_auth_denied_total";
pub const DROPPED_QUEUE_FULL: &str = "zbroker_messages_dropped_total{reason=\"queue_full\"}";
pub const OVERSIZE_PUB: &str = "zbroker_oversize_disconnects_total{endpoint=\"publisher\"}";
pub const OVERSIZE_SUB: &str = "zbroker_oversize_disconnects_total{endpoint=\"subscriber\"}";
pub const MULTIPART_PUB: &str = "zbroker_multipart_disconnects_total{endpoint=\"publisher\"}";
pub const MULTIPART_SUB: &str = "zbroker_multipart_disconnects_total{endpoint=\"subscriber\"}";
pub const REFUSED_CONNECTIONS_SUB: &str =
    "zbroker_connections_refused_total{endpoint=\"subscriber\"}";
pub const ACCEPT_FAILURES_SUB: &str = "zbroker_accept_failures_total{endpoint=\"subscriber\"}";
pub const INDEX_HEAP_BYTES: &str = "zbroker_index_heap_bytes";
pub const LIBZMQ_QUEUED_BYTES: &str = "zbroker_libzmq_queued_bytes";
