//! Broker configuration: endpoints, limits, queue policy and timeouts, with
//! the embedded defaults `zbroker run` starts on.

use std::time::Duration;

use crate::protocol::DEFAULT_MAX_TOPIC_LEN;

/// Default publisher (PULL) endpoint.
pub const DEFAULT_PUB_BIND: &str = "tcp://127.0.0.1:5570";
/// Default subscriber (ROUTER) endpoint.
pub const DEFAULT_SUB_BIND: &str = "tcp://127.0.0.1:5571";

/// Everything the broker needs to start. `Config::default()` is the embedded
/// default configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Endpoint the PULL socket binds for publishers.
    pub pub_bind: String,
    /// Endpoint the ROUTER socket binds for subscribers.
    pub sub_bind: String,
    /// Hard limits on what clients may ask for.
    pub limits: Limits,
    /// Per-subscriber pending queues for when libzmq's pipe is full.
    pub queue: QueueConfig,
    /// A subscriber not heard from for this long is forgotten.
    pub sub_timeout: Duration,
    /// ZMTP heartbeat interval on both sockets (dead TCP peers are noticed
    /// after `3 ×` this).
    pub zmtp_heartbeat: Duration,
    /// libzmq's per-peer high-water mark in messages (`ZMQ_SNDHWM` on the
    /// ROUTER, `ZMQ_RCVHWM` on the PULL).
    pub hwm: i32,
    /// On shutdown, how long to keep flushing queued messages to connected
    /// subscribers before exiting.
    pub linger: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pub_bind: DEFAULT_PUB_BIND.to_string(),
            sub_bind: DEFAULT_SUB_BIND.to_string(),
            limits: Limits::default(),
            queue: QueueConfig::default(),
            sub_timeout: Duration::from_secs(10),
            zmtp_heartbeat: Duration::from_secs(1),
            hwm: 1000,
            linger: Duration::from_secs(2),
        }
    }
}

/// Limits on clients; a command over a limit gets `[ERR, limit, …]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest topic a publisher may use, in bytes.
    pub max_topic_len: usize,
    /// Longest filter a subscriber may hold, in bytes.
    pub max_filter_len: usize,
    /// Most subscribers the broker tracks at once.
    pub max_subscribers: usize,
    /// Most filters one subscriber may hold.
    pub max_filters_per_subscriber: usize,
    /// Most filters across all subscribers.
    pub max_filters_total: usize,
    /// Largest message part libzmq accepts (`ZMQ_MAXMSGSIZE`); a peer that
    /// sends a larger one is disconnected by libzmq. `-1`: no limit.
    pub max_message_size: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_topic_len: DEFAULT_MAX_TOPIC_LEN,
            max_filter_len: DEFAULT_MAX_TOPIC_LEN,
            max_subscribers: 100_000,
            max_filters_per_subscriber: 10_000,
            max_filters_total: 1_000_000,
            max_message_size: 16 << 20,
        }
    }
}

/// What happens to a message for a subscriber whose queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverflowPolicy {
    /// Drop the new message (the subscriber sees a seq gap).
    DropNew,
    /// Drop the oldest queued message to make room.
    DropOld,
    /// Drop the new message, and once the queue has stayed full for
    /// [`QueueConfig::disconnect_after`], drop the subscriber's filters and
    /// queue and tell it with `[ERR, limit, …]`.
    Disconnect,
}

impl OverflowPolicy {
    /// Parses `drop-new`, `drop-old` or `disconnect`.
    pub fn parse(word: &str) -> Option<OverflowPolicy> {
        match word {
            "drop-new" => Some(OverflowPolicy::DropNew),
            "drop-old" => Some(OverflowPolicy::DropOld),
            "disconnect" => Some(OverflowPolicy::Disconnect),
            _ => None,
        }
    }
}

/// Bounds of the broker-side queue each subscriber gets once libzmq's pipe
/// to it is full.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Most messages queued for one subscriber.
    pub max_messages: usize,
    /// Most payload + topic bytes queued for one subscriber.
    pub max_bytes: usize,
    /// Most bytes queued across all subscribers.
    pub max_total_bytes: usize,
    /// What to do when a queue is full.
    pub policy: OverflowPolicy,
    /// With [`OverflowPolicy::Disconnect`]: how long a queue may stay full.
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
