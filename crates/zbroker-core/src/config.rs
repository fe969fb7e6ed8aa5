//! What the core is configured with: limits on clients, the queue policy
//! for slow subscribers, and the subscriber timeout. The server crate reads
//! these (with its own socket settings) from flags, the environment and a
//! TOML file; every field here has its embedded default.
//!
//! Each setting is defined once, here: the field's name is its TOML key
//! (serde), and with the `clap` feature (which the server enables) also its
//! `zbroker run` flag, with the field's doc comment as the flag's help (the
//! first paragraph for `-h`, all of it for `--help`). The server adds the
//! defaults to the help, from the `Default` impls below, and an environment
//! variable per flag (`zbroker::config::ConfigArgs`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::DEFAULT_MAX_TOPIC_LEN;

/// The core's settings. `BrokerConfig::default()` is what `zbroker run`
/// starts on.
#[derive(Clone, Debug, PartialEq)]
pub struct BrokerConfig {
    /// Hard limits on what clients may ask for.
    pub limits: Limits,
    /// Per-subscriber pending queues for when the transport's pipe is full.
    pub queue: QueueConfig,
    /// A subscriber not heard from for this long is forgotten.
    pub sub_timeout: Duration,
    /// Peer links, when the broker is one of a cluster.
    pub cluster: ClusterConfig,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            limits: Limits::default(),
            queue: QueueConfig::default(),
            sub_timeout: DEFAULT_SUB_TIMEOUT,
            cluster: ClusterConfig::default(),
        }
    }
}

/// The default of [`BrokerConfig::sub_timeout`].
pub const DEFAULT_SUB_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits on clients; a command over a limit gets `[ERR, limit, …]`.
///
/// The `[limits]` table of the config file; each field is also a flag.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Longest topic a publisher may use, in bytes (at most 65536).
    #[cfg_attr(feature = "clap", arg(long, value_name = "BYTES"))]
    pub max_topic_len: usize,
    /// Longest filter a subscriber may hold, in bytes (at most 65536).
    #[cfg_attr(feature = "clap", arg(long, value_name = "BYTES"))]
    pub max_filter_len: usize,
    /// Most subscribers the broker tracks at once.
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    pub max_subscribers: usize,
    /// Most filters one subscriber may hold.
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    pub max_filters_per_subscriber: usize,
    /// Most filters across all subscribers.
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    pub max_filters_total: usize,
    /// Largest message part in bytes, at most 1 GiB (`ZMQ_MAXMSGSIZE`); a
    /// peer that sends a larger one is disconnected by libzmq.
    #[cfg_attr(feature = "clap", arg(long, value_name = "BYTES"))]
    pub max_message_size: i64,
    /// Commands one subscriber may send per second, sustained.
    ///
    /// A burst may add `max_filters_per_subscriber` more (a full
    /// re-subscribe).
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    pub max_commands_per_sec: u32,
    /// Replies (OK, ERR, PONG) queued for a subscriber that does not read.
    ///
    /// Counted beyond a full re-subscribe (`max_filters_per_subscriber`,
    /// always allowed); more are dropped and counted.
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    pub max_queued_replies: usize,
    /// Most `.`-separated segments in a pattern filter, 1 to 1024.
    ///
    /// Matching a topic against patterns visits at most 2^(n+1) trie nodes
    /// for n segments, so this bounds the CPU one publish can cost (README,
    /// "Security").
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    pub max_pattern_segments: usize,
    /// Most heap bytes the routing index may hold; past it, `SUB` is refused.
    ///
    /// The index's running count, as in `zbroker_index_heap_bytes`; a
    /// refused `SUB` gets `[ERR, limit, …]`.
    #[cfg_attr(feature = "clap", arg(long, value_name = "BYTES"))]
    pub max_index_bytes: usize,
    /// Under CURVE: most filters the subscribers of one key may hold
    /// together.
    ///
    /// So that one key cannot take `max_filters_total` from the others.
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    pub max_filters_per_key: usize,
    /// Most live connections per bound endpoint; more are closed at once.
    ///
    /// One more is accepted, closed and counted, which keeps descriptors for
    /// everyone else.
    #[cfg_attr(feature = "clap", arg(long, value_name = "N"))]
    pub max_connections: usize,
}

/// Upper bound of `max_topic_len` and `max_filter_len`: every structure
/// that walks a topic or filter stays within fixed stack and time.
pub const MAX_LENGTH_SETTING: usize = 64 << 10;
/// Upper bound of `max_pattern_segments`.
pub const MAX_PATTERN_SEGMENTS_SETTING: usize = 1024;
/// Upper bound of `max_message_size`: 1 GiB.
pub const MAX_MESSAGE_SIZE_SETTING: i64 = 1 << 30;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_topic_len: DEFAULT_MAX_TOPIC_LEN,
            max_filter_len: DEFAULT_MAX_TOPIC_LEN,
            max_subscribers: 100_000,
            max_filters_per_subscriber: 10_000,
            max_filters_total: 1_000_000,
            max_message_size: 16 << 20,
            max_commands_per_sec: 5_000,
            max_queued_replies: 1_024,
            max_pattern_segments: 16,
            max_index_bytes: 1 << 30,
            max_filters_per_key: 100_000,
            max_connections: 100_000,
        }
    }
}

/// What happens to a message for a subscriber whose queue is full.
///
/// Written `drop-new`, `drop-old`, `disconnect` or `backpressure` in the
/// config file and on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// Drop the new message (the subscriber sees a seq gap).
    DropNew,
    /// Drop the oldest queued message to make room.
    DropOld,
    /// Drop the new message; once the queue has stayed full for
    /// `disconnect_after`, drop the subscriber's filters and queue.
    ///
    /// The subscriber is told with `[ERR, limit, …]`
    /// ([`QueueConfig::disconnect_after`]).
    Disconnect,
    /// Pause publishers while a subscriber's queue is half full, losing
    /// nothing to a slow consumer.
    ///
    /// While any subscriber's queue, counting what is routed to it and not
    /// sent yet, is half full (half of `max_messages` messages or of
    /// `max_bytes` bytes, replies' bytes included), or all queues together
    /// hold half of [`QueueConfig::max_total_bytes`], stop reading
    /// publishers, so libzmq's PUSH high-water mark slows them down. Every
    /// publisher then runs at the pace of the slowest matching subscriber.
    /// A subscriber holding publishers back that takes nothing for
    /// [`QueueConfig::disconnect_after`] (give or take one sweep of the
    /// broker's timer) is cut off as with `Disconnect`, so a stuck one
    /// cannot stall publishers for longer. A message that does not fit in
    /// the half left (larger than it) is still dropped and counted.
    Backpressure,
}

impl OverflowPolicy {
    /// Parses `drop-new`, `drop-old`, `disconnect` or `backpressure`.
    pub fn parse(word: &str) -> Option<OverflowPolicy> {
        match word {
            "drop-new" => Some(OverflowPolicy::DropNew),
            "drop-old" => Some(OverflowPolicy::DropOld),
            "disconnect" => Some(OverflowPolicy::Disconnect),
            "backpressure" => Some(OverflowPolicy::Backpressure),
            _ => None,
        }
    }
}

/// Bounds of the broker-side queue each subscriber gets once libzmq's pipe
/// to it is full.
///
/// The `[queue]` table of the config file; each field is also a flag.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    /// Most messages queued in the broker for one slow subscriber.
    #[cfg_attr(feature = "clap", arg(long = "queue-max-messages", value_name = "N"))]
    pub max_messages: usize,
    /// Most topic + payload bytes queued in the broker for one slow
    /// subscriber.
    #[cfg_attr(feature = "clap", arg(long = "queue-max-bytes", value_name = "BYTES"))]
    pub max_bytes: usize,
    /// Most bytes queued in the broker across all subscribers.
    #[cfg_attr(
        feature = "clap",
        arg(long = "queue-max-total-bytes", value_name = "BYTES")
    )]
    pub max_total_bytes: usize,
    /// What to do with a message for a subscriber whose queue is full.
    #[cfg_attr(feature = "clap", arg(long = "overflow", value_name = "POLICY"))]
    pub policy: OverflowPolicy,
    /// With `disconnect`: how long a queue may stay full; with
    /// `backpressure`: how long a subscriber holding publishers back may
    /// take nothing.
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)
    )]
    #[serde(with = "humantime_serde")]
    pub disconnect_after: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_messages: 10_000,
            max_bytes: 16 << 20,
            max_total_bytes: 512 << 20,
            policy: OverflowPolicy::DropNew,
            disconnect_after: Duration::from_secs(5),
        }
    }
}

/// A cluster of brokers: where this one listens for peers, how it finds
/// them, and how it treats their links (docs/CLUSTERING.md).
///
/// The `[cluster]` table of the config file; each field is also a flag.
/// The broker is clustered when `bind` is set.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The endpoint peers connect to (e.g. tcp://10.0.0.1:5570); turns
    /// clustering on.
    #[cfg_attr(feature = "clap", arg(long = "cluster-bind", value_name = "ENDPOINT"))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    /// The endpoint peers are told to connect to, when it differs from
    /// `bind` (a wildcard or a NAT'd address); defaults to `bind`.
    #[cfg_attr(
        feature = "clap",
        arg(long = "cluster-advertise", value_name = "ENDPOINT")
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Static membership: every peer's cluster endpoint (this broker's own
    /// may be listed too, so all brokers can share one list).
    #[cfg_attr(
        feature = "clap",
        arg(
            long = "cluster-peers",
            value_name = "ENDPOINT,...",
            value_delimiter = ','
        )
    )]
    pub peers: Vec<String>,
    /// Membership from etcd v3: its client URLs (e.g.
    /// http://127.0.0.1:2379); replaces `peers`.
    #[cfg_attr(
        feature = "clap",
        arg(long = "cluster-etcd", value_name = "URL,...", value_delimiter = ',')
    )]
    pub etcd: Vec<String>,
    /// The cluster's name: members register under
    /// `/zbroker/<name>/members/` in etcd.
    #[cfg_attr(feature = "clap", arg(long = "cluster-name", value_name = "NAME"))]
    pub name: String,
    /// This broker's id in the cluster, unique among its members; a random
    /// one is chosen at start when unset.
    #[cfg_attr(feature = "clap", arg(long = "cluster-id", value_name = "ID"))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// How often a broker pings each peer.
    #[cfg_attr(
        feature = "clap",
        arg(long = "cluster-ping-interval", value_name = "DURATION", value_parser = humantime::parse_duration)
    )]
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A peer silent for this long is down: its interest is forgotten.
    #[cfg_attr(
        feature = "clap",
        arg(long = "cluster-peer-timeout", value_name = "DURATION", value_parser = humantime::parse_duration)
    )]
    #[serde(with = "humantime_serde")]
    pub peer_timeout: Duration,
    /// The etcd lease on this broker's membership key: a broker silent
    /// for this long leaves the member list.
    #[cfg_attr(
        feature = "clap",
        arg(long = "cluster-lease-ttl", value_name = "DURATION", value_parser = humantime::parse_duration)
    )]
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Most messages queued in the broker for one slow peer link; more are
    /// dropped, counted per peer, and seen as a gap on the other side.
    #[cfg_attr(
        feature = "clap",
        arg(long = "cluster-queue-max-messages", value_name = "N")
    )]
    pub queue_max_messages: usize,
    /// Most topic + payload bytes queued for one slow peer link.
    #[cfg_attr(
        feature = "clap",
        arg(long = "cluster-queue-max-bytes", value_name = "BYTES")
    )]
    pub queue_max_bytes: usize,
    /// Most filters one peer's interest may hold here; past it, its new
    /// filters are refused, counted and logged.
    #[cfg_attr(
        feature = "clap",
        arg(long = "cluster-max-peer-filters", value_name = "N")
    )]
    pub max_peer_filters: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            bind: None,
            advertise: None,
            peers: Vec::new(),
            etcd: Vec::new(),
            name: "zbroker".into(),
            id: None,
            ping_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(5),
            queue_max_messages: 100_000,
            queue_max_bytes: 64 << 20,
            max_peer_filters: 1_000_000,
        }
    }
}

impl ClusterConfig {
    /// The queue bounds of a peer link: `drop-new`, so a slow peer never
    /// holds local publishers back or gets cut off; its losses show as a
    /// gap on the other side.
    pub fn peer_queue(&self, queue: &QueueConfig) -> QueueConfig {
        QueueConfig {
            max_messages: self.queue_max_messages,
            max_bytes: self.queue_max_bytes,
            max_total_bytes: queue.max_total_bytes,
            policy: OverflowPolicy::DropNew,
            disconnect_after: queue.disconnect_after,
        }
    }
}
