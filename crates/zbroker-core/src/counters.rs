//! Counters the broker keeps about itself. The core updates plain integers
//! (it is single-threaded); exporters read a [`Snapshot`], which the server
//! crate renders for Prometheus.

/// Logs at most once a second, counting what it held back, so a flood of bad
/// input (malformed frames, failed handshakes) cannot turn into a flood of
/// log lines.
#[derive(Debug, Default)]
pub struct LogLimiter {
    next: Option<std::time::Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// Logs `what` as a warning unless one was logged less than a second ago.
    pub fn warn(&mut self, now: std::time::Instant, what: std::fmt::Arguments<'_>) {
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
    /// Messages sent to the XPUB front (once each, for all its SUBs).
    pub xpub_delivered: u64,
    /// Messages for the XPUB front that its socket refused.
    pub xpub_dropped: u64,
    /// SUB subscribe notices counted.
    pub xpub_subscribes: u64,
    /// SUB unsubscribe notices counted.
    pub xpub_unsubscribes: u64,
    /// SUB unsubscribe notices for a prefix no SUB held.
    pub xpub_unknown_unsubscribes: u64,
    /// SUB subscribe notices refused by a limit.
    pub xpub_refused_notices: u64,
    /// Messages from the XPUB socket that were not subscription notices.
    pub xpub_malformed_notices: u64,
    /// Subscriber filters cut because reloaded key lists no longer allow
    /// them.
    pub revoked_filters: u64,
    /// Messages forwarded to peer brokers (once per peer).
    pub peer_forwarded: u64,
    /// Messages received from peer brokers.
    pub peer_received: u64,
    /// Messages from peers that no local subscriber matched any more.
    pub peer_unmatched: u64,
    /// Messages peers dropped for this broker, seen as seq jumps on their
    /// links (every local subscriber was shown a gap).
    pub peer_lost: u64,
    /// Peer links that said HELLO for the first time (or after being
    /// forgotten).
    pub peer_hellos: u64,
    /// Peers forgotten after `peer_timeout` of silence.
    pub peer_expired: u64,
    /// Times an outgoing link's peer went silent.
    pub peer_downs: u64,
    /// Interest changes applied from peers.
    pub peer_interest_changes: u64,
    /// Interest snapshots applied from peers.
    pub peer_snapshots: u64,
    /// HELLOs with a full interest snapshot sent to peers.
    pub peer_snapshots_sent: u64,
    /// Peer links told to start over (RESET) after an inconsistency.
    pub peer_resets: u64,
    /// Link messages that could not be read or came out of place.
    pub peer_malformed: u64,
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
    /// Heap bytes of the routing index (what `max_index_bytes` bounds).
    pub index_heap_bytes: u64,
    /// Bytes in libzmq's pipes to subscribers now (what `sub_hwm_bytes`
    /// bounds per subscriber), shared payloads counted per subscriber.
    pub libzmq_queued_bytes: u64,
    /// Distinct prefixes the XPUB front's SUB sockets hold now.
    pub xpub_prefixes: u64,
    /// Messages libzmq's XPUB dropped for a SUB whose pipe was full, one
    /// per message and SUB, since start (zero in the bare core).
    pub xpub_sub_drops: u64,
    /// Peer links served now.
    pub peers: u64,
    /// Distinct filters of the local interest (what peers are told).
    pub interest_filters: u64,
    /// Connection-level figures the event loop adds (zero in the bare core).
    pub connections: Connections,
    /// One entry per peer broker, both directions of its link merged.
    pub peers_detail: Vec<PeerFigures>,
    /// Membership as the event loop sees it (zero in the bare core).
    pub membership: MembershipFigures,
}

/// Where the cluster's member list comes from, and how that source fares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembershipFigures {
    /// Members known, this broker not counted.
    pub members: u64,
    /// 1 while the registry (etcd) answers, 0 while it does not; 1 with
    /// static membership.
    pub registry_up: u64,
    /// Times the registry became unreachable.
    pub registry_losses: u64,
}

/// What one peer broker's links carried, as seen from this broker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerFigures {
    /// The peer's broker id, or its endpoint until it answered.
    pub peer: String,
    /// The endpoint this broker's link connects to (empty for a peer
    /// whose link is only served here).
    pub endpoint: String,
    /// This broker's link to it is answered (1) or not (0).
    pub up: u64,
    /// Filters of the peer's interest held here.
    pub interest_entries: u64,
    /// Messages forwarded to it.
    pub forwarded: u64,
    /// Messages for it dropped here (its queue was full, or its link
    /// broke).
    pub dropped: u64,
    /// Messages waiting in its queue.
    pub queued: u64,
    /// Messages received from it.
    pub received: u64,
    /// Messages it dropped for this broker, seen as seq jumps.
    pub lost: u64,
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
    /// Plain SUB connections open now on the XPUB front.
    pub xpub_subscribers: u64,
    /// Handshakes that failed: wrong mechanism (plaintext against CURVE),
    /// bad keys, or keys the ZAP handler refused.
    pub handshake_failures: u64,
    /// CURVE keys the ZAP handler refused.
    pub auth_denied: u64,
    /// Key-list reloads installed (SIGHUP).
    pub key_reloads: u64,
    /// Key-list reloads refused: a list did not load, the old ones stayed.
    pub key_reload_failures: u64,
    /// Peers libzmq dropped or refused on the publisher endpoint.
    pub publisher_refusals: Refusals,
    /// Peers libzmq dropped or refused on the subscriber endpoint.
    pub subscriber_refusals: Refusals,
}

/// Peers one endpoint's libzmq socket dropped or refused, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    /// Dropped for a message part over `max_message_size`.
    pub message_size: u64,
    /// Dropped for a message of more parts than any protocol v1 message.
    pub message_parts: u64,
    /// Connections closed at once, over `max_connections`.
    pub connections: u64,
    /// `accept` calls that failed (mostly: out of descriptors).
    pub accept_failures: u64,
}
