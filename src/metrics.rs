//! Counters the broker keeps about itself. The core updates plain integers
//! (it is single-threaded); exporters read a [`Snapshot`].

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
    /// Commands refused by a limit.
    pub refused_limit: u64,
    /// Subscriber commands accepted.
    pub commands: u64,
    /// Subscribers forgotten after `sub_timeout` of silence.
    pub expired_subscribers: u64,
    /// Subscribers forgotten because libzmq no longer knew them.
    pub unreachable_subscribers: u64,
    /// Subscribers cut off by the `disconnect` overflow policy.
    pub slow_disconnects: u64,
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
    /// Bytes waiting in broker-side queues now.
    pub queued_bytes: u64,
    /// The longest single subscriber queue now, in messages.
    pub max_queue_depth: u64,
}
