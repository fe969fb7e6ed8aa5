//! The sans-IO broker core: everything the broker decides, nothing it does
//! with sockets.
//!
//! The event loop feeds it "a publisher sent these frames", "subscriber X
//! sent these frames" and "time passed"; the core answers by calling a
//! [`Transport`] it is handed, synchronously, once per frame set to send.
//! Nothing in here blocks or touches a file descriptor, which is what lets the
//! fuzz targets and benches drive the real forwarding path with no network.
//!
//! ```
//! use std::rc::Rc;
//! use std::time::Instant;
//! use zbroker_core::broker::{Broker, SendOutcome, Transport};
//! use zbroker_core::config::BrokerConfig;
//!
//! /// Records what the core sends.
//! #[derive(Default)]
//! struct Log(Vec<(Vec<u8>, u64)>);
//! impl Transport<Rc<[u8]>> for Log {
//!     fn deliver(&mut self, to: &[u8], seq: u64, _: &[u8], _: &mut Rc<[u8]>, _: bool) -> SendOutcome {
//!         self.0.push((to.to_vec(), seq));
//!         SendOutcome::Sent
//!     }
//!     fn reply(&mut self, _: &[u8], _: &[&[u8]]) -> SendOutcome { SendOutcome::Sent }
//! }
//!
//! let now = Instant::now();
//! let mut broker = Broker::new(BrokerConfig::default(), now);
//! let mut out = Log::default();
//! broker.on_command(b"sub-1", None, &[b"SUB", b"prefix", b"net."], 3, now, &mut out);
//! let mut frames: [Rc<[u8]>; 2] = [Rc::from(&b"net.a"[..]), Rc::from(&b"hello"[..])];
//! assert_eq!(broker.on_publish(None, &mut frames, 2, now, &mut out), Ok(1));
//! assert_eq!(out.0, vec![(b"sub-1".to_vec(), 1)]);
//! ```
//!
//! One module per concept, all of them deciding on the one [`Broker`]:
//!
//! - `transport`: [`Payload`], [`Transport`] and [`SendOutcome`], the
//!   boundary with the sockets;
//! - `staging`: deliveries routed and not sent yet, sent one subscriber at
//!   a time;
//! - `queues`: per-subscriber queues and the overflow policies;
//! - `commands`: SUB, UNSUB and PING, the limits on them and the replies;
//! - `rate_limit`: the token buckets that bound commands per second;
//! - `sweep`: expiry, the slow-consumer cut-off, and freeing subscribers;
//! - `xpub_front`: plain ZeroMQ SUB sockets behind an XPUB socket, their
//!   prefixes counted across connections.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;

use crate::acl::Acl;
use crate::config::BrokerConfig;
use crate::counters::{Counters, LogLimiter, Snapshot};
use crate::index::{RoutingIndex, SubId};
use crate::protocol::{self, PublishError};
use crate::subscribers::{Subscriber, SubscriberTable};

mod commands;
mod peers;
mod queues;
mod rate_limit;
mod revoke;
mod staging;
mod sweep;
#[cfg(test)]
mod tests;
mod transport;
mod xpub_front;

pub use peers::PeerInfo;
pub(crate) use peers::PeerRecord;
pub(crate) use rate_limit::TokenBucket;
pub use revoke::Revoked;
pub use staging::{MAX_STAGED_DELIVERIES, MAX_STAGED_MESSAGES};
pub use transport::{Payload, SendOutcome, Transport};
pub use xpub_front::{Notice, NoticeOutcome};

use queues::Queues;
use staging::Staged;
use xpub_front::XpubFront;

/// The broker's state and decisions; see the module docs.
///
/// Guarantees, whatever the input:
/// - a message goes to each subscriber with a matching filter exactly once,
///   and to no other;
/// - each subscriber's seq grows by exactly one per message routed to it,
///   delivered or dropped, so every drop shows as a gap;
/// - queues stay within [`QueueConfig`](crate::config::QueueConfig)'s bounds and the subscriber and
///   filter counts within [`crate::config::Limits`].
pub struct Broker<P> {
    config: BrokerConfig,
    acl: Option<Arc<Acl>>,
    index: RoutingIndex,
    subs: SubscriberTable<P>,
    queues: Queues,
    counters: Counters,
    /// Scratch buffer reused across calls so routing does not allocate.
    matched: Vec<SubId>,
    /// Messages routed but not sent yet; see [`Broker::route_publish`].
    staged: Staged<P>,
    /// Publishers were held back at the last
    /// [`publishers_paused`](Broker::publishers_paused).
    paused: bool,
    gone: Vec<SubId>,
    next_sweep: Instant,
    publish_log: LogLimiter,
    command_log: LogLimiter,
    /// Under CURVE: filters held per key, for `max_filters_per_key`.
    filters_per_key: HashMap<Box<str>, usize>,
    /// One token bucket for malformed commands from peers the broker does
    /// not track (they have no record, so no bucket of their own): garbage
    /// past it is dropped unanswered, and counted.
    stranger_tokens: TokenBucket,
    /// The XPUB front for plain SUB sockets, once opened.
    xpub: Option<XpubFront>,
    /// The cluster side, once [`enable_cluster`](Broker::enable_cluster)
    /// was called.
    cluster: Option<crate::cluster::Cluster>,
    /// Peer records by broker id.
    peer_ids: peers::PeerIds,
    /// Forgotten peers' last seqs (see `peers::bury_peer`).
    peer_tombstones: peers::PeerTombstones,
    /// The queue bounds of peer links.
    peer_queue: crate::config::QueueConfig,
}

impl<P: Payload> Broker<P> {
    /// A broker with no subscribers.
    pub fn new(config: BrokerConfig, now: Instant) -> Self {
        let stranger_tokens = TokenBucket::new(f64::from(rate_limit::config_rate(&config)), now);
        Broker {
            queues: Queues::new(&config.queue),
            peer_queue: config.cluster.peer_queue(&config.queue),
            config,
            acl: None,
            index: RoutingIndex::new(),
            subs: SubscriberTable::default(),
            counters: Counters::default(),
            matched: Vec::new(),
            staged: Staged::default(),
            paused: false,
            gone: Vec::new(),
            next_sweep: now,
            publish_log: LogLimiter::default(),
            command_log: LogLimiter::default(),
            filters_per_key: HashMap::new(),
            stranger_tokens,
            xpub: None,
            cluster: None,
            peer_ids: Default::default(),
            peer_tombstones: Default::default(),
        }
    }

    /// Enforces `acl`: publishes and SUBs are checked against the sender's
    /// key, and senders without a listed key may do neither.
    pub fn set_acl(&mut self, acl: Arc<Acl>) {
        self.acl = Some(acl);
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Routes one publisher message and sends it to every subscriber whose
    /// filters match. `frames` holds the first frames received (at most 2
    /// are looked at; a message routed to anyone has them taken with
    /// [`Payload::take`]), `frame_count` how many the message had, and `key` the
    /// publisher's authenticated CURVE key (Z85), if any. Returns how many
    /// subscribers it was routed to, or why it was dropped.
    pub fn on_publish(
        &mut self,
        key: Option<&str>,
        frames: &mut [P],
        frame_count: usize,
        now: Instant,
        out: &mut impl Transport<P>,
    ) -> Result<usize, PublishError> {
        let routed = self.route_publish(key, frames, frame_count, now, out);
        self.send_routed(out);
        routed
    }

    /// [`on_publish`](Self::on_publish) for a batch: routes the message and
    /// stages its deliveries (each takes its seq now); [`send_routed`]
    /// sends what is staged, each subscriber's deliveries in a row. Every
    /// other call that takes a transport sends staged deliveries first, and
    /// so does this one once [`MAX_STAGED_DELIVERIES`] or
    /// [`MAX_STAGED_MESSAGES`] are staged, so nothing waits unboundedly and
    /// the order of everything a subscriber receives is kept.
    ///
    /// [`send_routed`]: Self::send_routed
    pub fn route_publish(
        &mut self,
        key: Option<&str>,
        frames: &mut [P],
        frame_count: usize,
        now: Instant,
        out: &mut impl Transport<P>,
    ) -> Result<usize, PublishError> {
        let checked = match frames {
            [topic, payload] => protocol::check_publish(
                frame_count,
                topic.bytes(),
                self.config.limits.max_topic_len,
            )
            .map(|()| (topic, payload)),
            _ => Err(PublishError::FrameCount(frame_count)),
        };
        let (topic, payload) = match checked {
            Ok(parts) => parts,
            Err(e) => {
                self.counters.malformed_publishes += 1;
                self.publish_log
                    .warn(now, format_args!("dropped a malformed publish: {e}"));
                return Err(e);
            }
        };
        if let Some(acl) = &self.acl
            && !acl.may_publish(key, topic.bytes())
        {
            self.counters.unauthorized_publishes += 1;
            self.publish_log.warn(
                now,
                format_args!("dropped a publish the key {key:?} may not make"),
            );
            return Err(PublishError::Unauthorized);
        }
        let payload_len = payload.bytes().len() as u64;
        self.counters.published += 1;
        self.counters.published_bytes += payload_len;
        self.index.matches(topic.bytes(), &mut self.matched);
        let to_xpub = self.send_to_xpub(topic.bytes(), payload, payload_len, out);
        if self.matched.is_empty() {
            if !to_xpub {
                self.counters.unmatched += 1;
            }
            return Ok(usize::from(to_xpub));
        }
        Ok(self.stage(topic, payload, payload_len, now, out) + usize::from(to_xpub))
    }

    /// Sends the deliveries [`route_publish`](Self::route_publish) staged:
    /// per subscriber, in order, straight to libzmq while it takes them and
    /// into the subscriber's queue from the first it refuses.
    pub fn send_routed(&mut self, out: &mut impl Transport<P>) {
        let Some(now) = self.staged.routed_at.take() else {
            return;
        };
        self.send_staged(now, out);
        self.remove_gone();
    }

    /// Handles one message from a subscriber: `routing_id` is its ROUTER
    /// routing id, `key` its authenticated CURVE key (Z85), if any, `frames`
    /// holds its first frames (at most 3 are looked at), `frame_count` how
    /// many it had. Every command is answered, with `OK`, `PONG` or `ERR`.
    pub fn on_command(
        &mut self,
        routing_id: &[u8],
        key: Option<&str>,
        frames: &[&[u8]],
        frame_count: usize,
        now: Instant,
        out: &mut impl Transport<P>,
    ) {
        self.send_routed(out);
        let (id, reply) = self.decide(routing_id, key, frames, frame_count, now);
        if let Some(reply) = reply {
            self.reply(id, routing_id, reply, now, out);
        }
        self.remove_gone();
        self.flush_interest(out);
    }

    /// Sends what waits in subscriber queues, oldest first, until libzmq
    /// refuses more. Returns whether anything is still queued.
    pub fn flush(&mut self, out: &mut impl Transport<P>) -> bool {
        self.send_routed(out);
        self.send_queued(out);
        self.remove_gone();
        self.flush_interest(out);
        !self.queues.backlog.is_empty()
    }

    /// Lets time pass: forgets subscribers silent for `sub_timeout` and
    /// cuts off slow ones under the `disconnect` and `backpressure` overflow
    /// policies. Returns when it next needs to be called.
    ///
    /// Time is an input like any other: nothing expires between calls, so
    /// the event loop calls this by the deadline it returns.
    ///
    /// ```
    /// use std::rc::Rc;
    /// use std::time::Instant;
    /// use zbroker_core::broker::{Broker, SendOutcome, Transport};
    /// use zbroker_core::config::BrokerConfig;
    ///
    /// /// Records the first frame of every reply.
    /// #[derive(Default)]
    /// struct Replies(Vec<Vec<u8>>);
    /// impl Transport<Rc<[u8]>> for Replies {
    ///     fn deliver(&mut self, _: &[u8], _: u64, _: &[u8], _: &mut Rc<[u8]>, _: bool) -> SendOutcome {
    ///         SendOutcome::Sent
    ///     }
    ///     fn reply(&mut self, _: &[u8], frames: &[&[u8]]) -> SendOutcome {
    ///         self.0.push(frames[0].to_vec());
    ///         SendOutcome::Sent
    ///     }
    /// }
    ///
    /// let start = Instant::now();
    /// let config = BrokerConfig::default();
    /// let timeout = config.sub_timeout;
    /// let mut broker = Broker::new(config, start);
    /// let mut out = Replies::default();
    /// broker.on_command(b"sub-1", None, &[b"PING"], 1, start, &mut out);
    /// assert_eq!(out.0, [b"PONG"]);
    ///
    /// let next = broker.tick(start, &mut out);
    /// assert!(next > start);
    /// assert_eq!(broker.subscriber_count(), 1, "heard from just now");
    ///
    /// broker.tick(start + timeout, &mut out);
    /// assert_eq!(broker.subscriber_count(), 0, "silent for sub_timeout");
    /// assert_eq!(out.0.last().unwrap(), b"ERR", "told it expired");
    /// ```
    pub fn tick(&mut self, now: Instant, out: &mut impl Transport<P>) -> Instant {
        self.send_routed(out);
        let links_due = self.flush_cluster(now, out);
        if now < self.next_sweep {
            return links_due.map_or(self.next_sweep, |due| due.min(self.next_sweep));
        }
        let timeout = self.config.sub_timeout;
        self.expire_silent(now, out);
        self.start_backpressure_clocks(now);
        self.cut_off_slow(now);
        // Sweeping costs one pass over the table, so do it a few times per
        // timeout rather than on every wake-up.
        let interval = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        self.next_sweep = now + interval;
        links_due.map_or(self.next_sweep, |due| due.min(self.next_sweep))
    }

    /// Under [`OverflowPolicy::Backpressure`](crate::config::OverflowPolicy::Backpressure): whether the event loop must
    /// stop reading publishers, because a subscriber's queue (with what is
    /// staged for it) has reached half its bounds or all queues together
    /// half of theirs. Always false under the other policies. Cheap
    /// enough to ask before every publish.
    pub fn publishers_paused(&mut self) -> bool {
        let paused = self.queues.over_mark > 0
            || self.staged.over_mark
            || self.queues.bytes >= self.queues.mark.total_bytes;
        if paused && !self.paused {
            self.counters.backpressure_pauses += 1;
        }
        self.paused = paused;
        paused
    }

    /// Deliveries routed by [`route_publish`](Self::route_publish) and not
    /// sent yet.
    pub fn staged_deliveries(&self) -> usize {
        self.staged.deliveries
    }

    /// Counters and gauges as of now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            counters: self.counters.clone(),
            subscribers: self.subs.len() as u64,
            subscriptions: self.index.len() as u64,
            queued_messages: self.queues.messages as u64,
            queued_bytes: self.queues.bytes as u64,
            connections: Default::default(),
            max_queue_depth: self
                .queues
                .backlog
                .iter()
                .filter_map(|&id| Some(self.subs.get(id)?.queue.len() as u64))
                .max()
                .unwrap_or(0),
            publishers_paused: u64::from(self.paused),
            index_heap_bytes: self.index.heap_bytes() as u64,
            libzmq_queued_bytes: 0,
            xpub_prefixes: self.xpub_prefixes() as u64,
            xpub_sub_drops: 0,
            peers: self.subs.peer_count() as u64,
            interest_filters: self.interest_len() as u64,
            peers_detail: self.peer_figures(),
            membership: Default::default(),
        }
    }

    /// The counters since start.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Number of subscribers tracked.
    pub fn subscriber_count(&self) -> usize {
        self.subs.len()
    }

    /// Number of (filter, subscriber) pairs held.
    pub fn subscription_count(&self) -> usize {
        self.index.len()
    }

    /// Messages waiting in subscriber queues.
    pub fn queued_messages(&self) -> usize {
        self.queues.messages
    }

    /// The subscriber with this routing id, if tracked.
    pub fn subscriber(&self, routing_id: &[u8]) -> Option<&Subscriber<P>> {
        self.subs.get(self.subs.lookup(routing_id)?)
    }

    /// Every tracked subscriber (peer links are [`peers`](Self::peers)).
    pub fn subscribers(&self) -> impl Iterator<Item = &Subscriber<P>> {
        self.subs
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.peer.is_none())
    }

    /// Heap bytes held by the routing index (for memory accounting).
    pub fn index_heap_bytes(&self) -> usize {
        self.index.heap_bytes()
    }
}

/// Routing ids are binary; logs show them as hex.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
