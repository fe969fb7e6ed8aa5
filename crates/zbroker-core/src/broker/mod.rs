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

use std::fmt;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;

use crate::acl::Acl;
use crate::config::{BrokerConfig, Limits, OverflowPolicy, QueueConfig};
use crate::counters::{Counters, LogLimiter, Snapshot};
use crate::filter::Filter;
use crate::index::{RoutingIndex, SubId};
use crate::protocol::{self, Command, CommandError, ErrorCode, PublishError};
use crate::subscribers::{Queued, Reply, Subscriber, SubscriberTable};

/// A message part the core can hold on to and fan out.
///
/// `share` must be cheap: it is called once per subscriber whose delivery has
/// to wait in a queue, so it must not copy large payloads.
pub trait Payload: Sized {
    /// The part's bytes.
    fn bytes(&self) -> &[u8];
    /// Another handle on the same bytes.
    fn share(&mut self) -> Self;
    /// The part itself, moved out; `self` is left empty (or, where moving
    /// costs more than sharing, still holding the bytes) and is not read
    /// again until it is refilled.
    fn take(&mut self) -> Self {
        self.share()
    }
}

impl Payload for Rc<[u8]> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn share(&mut self) -> Self {
        Rc::clone(self)
    }
}

impl Payload for Arc<[u8]> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn share(&mut self) -> Self {
        Arc::clone(self)
    }
}

/// What became of one attempted send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// libzmq took the whole message.
    Sent,
    /// The peer's pipe is full (`EAGAIN`); nothing was sent, try later.
    WouldBlock,
    /// The peer is gone (`EHOSTUNREACH`); it will never take anything.
    Unreachable,
}

/// Where the core's output goes. Implementations must never block.
pub trait Transport<P> {
    /// Sends the two-part delivery `[MSG|seq|topic, payload]` to the
    /// subscriber with `routing_id`. It sends a [`Payload::share`] of
    /// `payload`, or, when `last_use` says no later delivery needs it,
    /// may send `payload` itself ([`Payload::take`]); on
    /// [`SendOutcome::WouldBlock`] it must leave `payload` as it was.
    fn deliver(
        &mut self,
        routing_id: &[u8],
        seq: u64,
        topic: &[u8],
        payload: &mut P,
        last_use: bool,
    ) -> SendOutcome;
    /// Sends a reply, one frame per slice, to `routing_id`.
    fn reply(&mut self, routing_id: &[u8], frames: &[&[u8]]) -> SendOutcome;
}

fn send_reply<P>(out: &mut impl Transport<P>, to: &[u8], reply: &Reply) -> SendOutcome {
    match reply {
        Reply::Ok { subscribe, filter } => {
            let verb = if *subscribe {
                protocol::SUB
            } else {
                protocol::UNSUB
            };
            out.reply(
                to,
                &[protocol::OK, verb, filter.kind().as_bytes(), filter.text()],
            )
        }
        Reply::Err(code, text) => out.reply(to, &[protocol::ERR, code.as_bytes(), text.as_bytes()]),
        Reply::Pong => out.reply(to, &[protocol::PONG]),
    }
}

fn queued_size<P: Payload>(item: &Queued<P>) -> usize {
    match item {
        Queued::Message { topic, payload, .. } => topic.bytes().len() + payload.bytes().len(),
        Queued::Reply(Reply::Ok { filter, .. }) => 16 + filter.text().len(),
        Queued::Reply(Reply::Err(_, text)) => 32 + text.len(),
        Queued::Reply(Reply::Pong) => 4,
    }
}

/// Totals over all subscriber queues, and which subscribers have one.
#[derive(Debug)]
struct Queues {
    bytes: usize,
    messages: usize,
    /// Subscribers whose queue is not empty, each once.
    backlog: Vec<SubId>,
    /// The backpressure marks: half of each bound under
    /// [`OverflowPolicy::Backpressure`], unreachable under the other
    /// policies.
    mark: Mark,
    /// Subscribers whose queue is past the mark.
    over_mark: usize,
}

#[derive(Clone, Copy, Debug)]
struct Mark {
    messages: usize,
    bytes: usize,
    total_bytes: usize,
}

impl Mark {
    /// Whether one subscriber holding `messages` messages of `bytes` bytes
    /// (queued, and staged where they count) has reached it.
    fn reached(&self, messages: usize, bytes: usize) -> bool {
        messages >= self.messages || bytes >= self.bytes
    }
}

impl Queues {
    fn new(config: &QueueConfig) -> Self {
        let mark = if config.policy == OverflowPolicy::Backpressure {
            // At least 1: an empty queue never holds publishers back.
            let half = |bound: usize| bound.div_ceil(2).max(1);
            Mark {
                messages: half(config.max_messages),
                bytes: half(config.max_bytes),
                total_bytes: half(config.max_total_bytes),
            }
        } else {
            Mark {
                messages: usize::MAX,
                bytes: usize::MAX,
                total_bytes: usize::MAX,
            }
        };
        Queues {
            bytes: 0,
            messages: 0,
            backlog: Vec::new(),
            mark,
            over_mark: 0,
        }
    }

    /// Keeps `sub.over_mark` and the count of such subscribers in step with
    /// its queue.
    fn update_mark<P>(&mut self, sub: &mut Subscriber<P>) {
        // Saturating: forgetting a subscriber empties its queue before
        // accounting for the items one by one.
        let over = self.mark.reached(
            sub.queue.len().saturating_sub(sub.queued_replies),
            sub.queued_bytes,
        );
        if over != sub.over_mark {
            sub.over_mark = over;
            if over {
                self.over_mark += 1;
            } else {
                self.over_mark -= 1;
            }
        }
    }

    /// Accounts for `item` leaving `sub`'s queue (sent or dropped).
    fn took<P: Payload>(&mut self, sub: &mut Subscriber<P>, item: &Queued<P>) {
        self.took_sized(sub, item, queued_size(item));
    }

    /// [`took`](Self::took) for an item whose parts a send may have taken:
    /// `size` is its [`queued_size`] from before the send.
    fn took_sized<P>(&mut self, sub: &mut Subscriber<P>, item: &Queued<P>, size: usize) {
        self.bytes -= size;
        sub.queued_bytes -= size;
        match item {
            Queued::Message { .. } => self.messages -= 1,
            Queued::Reply(_) => sub.queued_replies -= 1,
        }
        self.update_mark(sub);
    }

    /// Appends `item` to `sub`'s queue within the configured bounds, applying
    /// the overflow policy when they are reached. Returns false if it dropped
    /// `item`.
    #[allow(clippy::too_many_arguments)] // all of it is the push's context
    fn push<P: Payload>(
        &mut self,
        config: &QueueConfig,
        max_replies: usize,
        counters: &mut Counters,
        id: SubId,
        sub: &mut Subscriber<P>,
        item: Queued<P>,
        now: Instant,
    ) -> bool {
        let size = queued_size(&item);
        let is_message = matches!(item, Queued::Message { .. });
        // Replies have their own bound rather than the message limits, so a
        // client waiting for its OK gets it even behind a full queue.
        let fits = |queues: &Queues, sub: &Subscriber<P>| {
            queues.bytes + size <= config.max_total_bytes
                && if is_message {
                    sub.queue.len() - sub.queued_replies < config.max_messages
                        && sub.queued_bytes + size <= config.max_bytes
                } else {
                    sub.queued_replies < max_replies
                }
        };
        // drop-old makes room for a message by dropping the oldest queued
        // *messages*: a queued reply answers a command and is never dropped
        // for data, and a reply over its own bound is simply refused.
        if config.policy == OverflowPolicy::DropOld && is_message {
            while !fits(self, sub) {
                let Some(oldest) = sub
                    .queue
                    .iter()
                    .position(|q| matches!(q, Queued::Message { .. }))
                else {
                    break;
                };
                let Some(old) = sub.queue.remove(oldest) else {
                    break;
                };
                self.took(sub, &old);
                count_drop(counters, sub, &old);
            }
        }
        if !fits(self, sub) {
            count_drop(counters, sub, &item);
            // "Full" means a backlog that is not draining; a message too
            // large for an empty queue is dropped but says nothing about
            // the consumer's speed.
            if config.policy == OverflowPolicy::Disconnect
                && is_message
                && !sub.queue.is_empty()
                && sub.full_since.is_none()
            {
                sub.full_since = Some(now);
            }
            return false;
        }
        if !sub.in_backlog {
            sub.in_backlog = true;
            self.backlog.push(id);
        }
        sub.queued_bytes += size;
        self.bytes += size;
        if is_message {
            self.messages += 1;
        } else {
            sub.queued_replies += 1;
        }
        sub.queue.push_back(item);
        self.update_mark(sub);
        true
    }
}

/// Messages routed by [`Broker::route_publish`] and not sent yet.
///
/// Deliveries are sent per subscriber, all of one subscriber's in a row:
/// libzmq's I/O thread then finds a run of messages in that subscriber's
/// pipe and writes them with one `send()`, where message-by-message fan-out
/// wakes it, and makes a system call, for every delivery.
#[derive(Debug)]
struct Staged<P> {
    messages: Vec<StagedMessage<P>>,
    /// The staged topics' bytes back to back: read once per message rather
    /// than through the FFI once per delivery.
    topic_bytes: Vec<u8>,
    /// Subscribers with staged deliveries (a non-empty `Subscriber::staged`),
    /// each once, in the order of their first.
    subscribers: Vec<SubId>,
    deliveries: usize,
    /// When the last message was staged: the time its queueing is dated.
    routed_at: Option<Instant>,
    /// Topic and payload bytes of all staged deliveries, under the
    /// backpressure policy (zero under the others).
    bytes: usize,
    /// A subscriber's staged and queued messages or bytes together, or
    /// all of them, reach the backpressure mark.
    over_mark: bool,
}

#[derive(Debug)]
struct StagedMessage<P> {
    topic: P,
    payload: P,
    /// Deliveries still to send or queue: the last one takes the parts
    /// rather than sharing them.
    uses: usize,
    payload_len: u64,
    /// Where the topic is in `Staged::topic_bytes`.
    topic_at: std::ops::Range<usize>,
}

impl<P> Default for Staged<P> {
    fn default() -> Self {
        Staged {
            messages: Vec::new(),
            topic_bytes: Vec::new(),
            subscribers: Vec::new(),
            deliveries: 0,
            routed_at: None,
            bytes: 0,
            over_mark: false,
        }
    }
}

/// At most this many deliveries are staged by [`Broker::route_publish`]
/// before they are sent: bounds the delay staging adds (a few
/// milliseconds) while leaving runs long enough to batch libzmq's writes
/// (40 messages per subscriber at a fan-out of 100).
pub const MAX_STAGED_DELIVERIES: usize = 4096;
/// At most this many messages are staged by [`Broker::route_publish`]
/// before their deliveries are sent.
pub const MAX_STAGED_MESSAGES: usize = 1024;

/// Replies one subscriber may have queued: a full re-subscribe's worth (as
/// the token bucket allows in one burst) plus `max_queued_replies`, so an
/// honest client re-subscribing everything always gets every OK.
fn reply_bound(limits: &Limits) -> usize {
    limits.max_filters_per_subscriber + limits.max_queued_replies
}

fn count_drop<P>(counters: &mut Counters, sub: &mut Subscriber<P>, item: &Queued<P>) {
    if matches!(item, Queued::Message { .. }) {
        counters.dropped_queue_full += 1;
        sub.dropped += 1;
    } else {
        counters.dropped_replies += 1;
    }
}

/// The broker's state and decisions; see the module docs.
///
/// Guarantees, whatever the input:
/// - a message goes to each subscriber with a matching filter exactly once,
///   and to no other;
/// - each subscriber's seq grows by exactly one per message routed to it,
///   delivered or dropped, so every drop shows as a gap;
/// - queues stay within [`QueueConfig`]'s bounds and the subscriber and
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
    stranger_tokens: f64,
    stranger_tokens_at: Instant,
}

impl<P: Payload> Broker<P> {
    /// A broker with no subscribers.
    pub fn new(config: BrokerConfig, now: Instant) -> Self {
        let stranger_tokens = f64::from(config_rate(&config));
        Broker {
            queues: Queues::new(&config.queue),
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
            stranger_tokens_at: now,
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
        let topic_bytes = topic.bytes();
        self.index.matches(topic_bytes, &mut self.matched);
        if self.matched.is_empty() {
            self.counters.unmatched += 1;
            return Ok(0);
        }
        let staged = &mut self.staged;
        let message = u32::try_from(staged.messages.len()).expect("MAX_STAGED_MESSAGES fits");
        let topic_start = staged.topic_bytes.len();
        staged.topic_bytes.extend_from_slice(topic_bytes);
        let topic_at = topic_start..staged.topic_bytes.len();
        let backpressure = self.config.queue.policy == OverflowPolicy::Backpressure;
        // What one queued delivery of it counts (see `queued_size`).
        let size = topic_bytes.len() + payload_len as usize;
        for &id in &self.matched {
            let Some(sub) = self.subs.get_mut(id) else {
                debug_assert!(false, "routing index names a removed subscriber");
                continue;
            };
            sub.last_seq += 1;
            if sub.staged.is_empty() {
                staged.subscribers.push(id);
            }
            sub.staged.push(message);
            // Staged deliveries reach the queue only when the batch is
            // sent, so the marks count them too.
            if backpressure {
                let mark = &self.queues.mark;
                sub.staged_bytes += size;
                staged.bytes += size;
                if mark.reached(
                    sub.staged.len() + sub.queue.len() - sub.queued_replies,
                    sub.queued_bytes + sub.staged_bytes,
                ) || self.queues.bytes + staged.bytes >= mark.total_bytes
                {
                    staged.over_mark = true;
                }
            }
        }
        // Moved, not shared: the caller's frames are only refilled, and a
        // share would cost two more reference counts (content and the
        // connection's metadata) taken here and dropped at the next receive.
        staged.messages.push(StagedMessage {
            topic: topic.take(),
            payload: payload.take(),
            uses: self.matched.len(),
            payload_len,
            topic_at,
        });
        staged.routed_at = Some(now);
        let routed = self.matched.len();
        staged.deliveries += routed;
        self.counters.routed += routed as u64;
        if staged.deliveries >= MAX_STAGED_DELIVERIES
            || staged.messages.len() >= MAX_STAGED_MESSAGES
        {
            self.send_routed(out);
        }
        Ok(routed)
    }

    /// Sends the deliveries [`route_publish`](Self::route_publish) staged:
    /// per subscriber, in order, straight to libzmq while it takes them and
    /// into the subscriber's queue from the first it refuses.
    pub fn send_routed(&mut self, out: &mut impl Transport<P>) {
        let Some(now) = self.staged.routed_at.take() else {
            return;
        };
        let staged = &mut self.staged;
        for &id in &staged.subscribers {
            let Some(sub) = self.subs.get_mut(id) else {
                debug_assert!(false, "a subscriber was removed with deliveries staged");
                continue;
            };
            let list = std::mem::take(&mut sub.staged);
            let first_seq = sub.last_seq + 1 - list.len() as u64;
            // Deliveries sent, or dropped because the peer is gone; the
            // rest are queued.
            let mut done = 0;
            if sub.queue.is_empty() {
                for &message in &list {
                    let message = &mut staged.messages[message as usize];
                    let topic = &staged.topic_bytes[message.topic_at.clone()];
                    let seq = first_seq + done as u64;
                    let last_use = message.uses == 1;
                    match out.deliver(&sub.routing_id, seq, topic, &mut message.payload, last_use) {
                        SendOutcome::Sent => {
                            message.uses -= 1;
                            self.counters.delivered += 1;
                            self.counters.delivered_bytes += message.payload_len;
                            done += 1;
                        }
                        SendOutcome::WouldBlock => break,
                        SendOutcome::Unreachable => {
                            self.counters.dropped_subscriber_gone += (list.len() - done) as u64;
                            done = list.len();
                            self.gone.push(id);
                            break;
                        }
                    }
                }
            }
            for (i, &message) in list.iter().enumerate().skip(done) {
                let message = &mut staged.messages[message as usize];
                message.uses -= 1;
                let (topic, payload) = if message.uses == 0 {
                    (message.topic.take(), message.payload.take())
                } else {
                    (message.topic.share(), message.payload.share())
                };
                let item = Queued::Message {
                    seq: first_seq + i as u64,
                    topic,
                    payload,
                };
                self.queues.push(
                    &self.config.queue,
                    reply_bound(&self.config.limits),
                    &mut self.counters,
                    id,
                    sub,
                    item,
                    now,
                );
            }
            // Hand the list back emptied, keeping its capacity: steady-state
            // routing does not allocate.
            sub.staged = list;
            sub.staged.clear();
            sub.staged_bytes = 0;
        }
        staged.subscribers.clear();
        staged.messages.clear();
        staged.topic_bytes.clear();
        staged.deliveries = 0;
        staged.bytes = 0;
        staged.over_mark = false;
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
    }

    /// What to answer a subscriber's message (`None`: nothing, for garbage
    /// from a stranger past the rate limit), and who it is (`None`: a
    /// routing id the broker does not track).
    fn decide(
        &mut self,
        routing_id: &[u8],
        key: Option<&str>,
        frames: &[&[u8]],
        frame_count: usize,
        now: Instant,
    ) -> (Option<SubId>, Option<Reply>) {
        let known = self.subs.lookup(routing_id);
        if let Some(id) = known {
            if let Some(sub) = self.subs.get_mut(id) {
                sub.last_heard = now;
            }
            // Every message costs a token, well-formed or not, so garbage
            // cannot buy more replies than commands can.
            if !self.take_command_token(id, now) {
                self.counters.refused_rate += 1;
                let text = format!(
                    "more than {} commands per second; slow down",
                    self.config.limits.max_commands_per_sec
                );
                return (known, Some(Reply::Err(ErrorCode::Limit, text)));
            }
        }
        let parsed = if frame_count > frames.len() {
            Err(CommandError::TooManyFrames(frame_count))
        } else {
            protocol::parse_command(frames, self.config.limits.max_filter_len)
        };
        let command = match parsed {
            Ok(command) => command,
            Err(e) => {
                self.counters.malformed_commands += 1;
                if known.is_none() && !self.take_stranger_token(now) {
                    self.counters.refused_rate += 1;
                    return (None, None);
                }
                self.command_log.warn(
                    now,
                    format_args!("refused a command from {}: {e}", Hex(routing_id)),
                );
                return (known, Some(Reply::Err(e.code(), e.to_string())));
            }
        };
        let id = match known {
            Some(id) => id,
            None if self.subs.len() >= self.config.limits.max_subscribers => {
                self.counters.refused_limit += 1;
                let text = format!(
                    "the broker holds its limit of {} subscribers; try again later",
                    self.config.limits.max_subscribers
                );
                return (None, Some(Reply::Err(ErrorCode::Limit, text)));
            }
            None => {
                let id = self.subs.insert(routing_id, now);
                if let Some(sub) = self.subs.get_mut(id) {
                    sub.key = key.map(Into::into);
                }
                id
            }
        };
        self.counters.commands += 1;
        let reply = match command {
            Command::Ping => Reply::Pong,
            Command::Subscribe(filter) => match &self.acl {
                Some(acl) if !acl.may_subscribe(key, &filter) => {
                    self.counters.refused_unauthorized += 1;
                    Reply::Err(
                        ErrorCode::Unauthorized,
                        format!("this key may not subscribe to {filter}"),
                    )
                }
                _ => self.subscribe(id, filter),
            },
            Command::Unsubscribe(filter) => self.unsubscribe(id, filter),
        };
        (Some(id), Some(reply))
    }

    /// The strangers' shared bucket: `max_commands_per_sec`, no burst.
    fn take_stranger_token(&mut self, now: Instant) -> bool {
        let rate = f64::from(config_rate(&self.config));
        let elapsed = now
            .saturating_duration_since(self.stranger_tokens_at)
            .as_secs_f64();
        self.stranger_tokens = (self.stranger_tokens + elapsed * rate).min(rate);
        self.stranger_tokens_at = now;
        if self.stranger_tokens < 1.0 {
            return false;
        }
        self.stranger_tokens -= 1.0;
        true
    }

    /// Token bucket: `max_commands_per_sec` sustained. The bucket holds a
    /// second's worth plus a full filter set, so a client re-subscribing
    /// everything after a reconnect is never refused.
    fn take_command_token(&mut self, id: SubId, now: Instant) -> bool {
        let limits = &self.config.limits;
        let rate = f64::from(limits.max_commands_per_sec);
        let capacity = rate + limits.max_filters_per_subscriber as f64;
        let Some(sub) = self.subs.get_mut(id) else {
            return false;
        };
        let elapsed = now.saturating_duration_since(sub.tokens_at).as_secs_f64();
        sub.command_tokens = (sub.command_tokens + elapsed * rate).min(capacity);
        sub.tokens_at = now;
        if sub.command_tokens < 1.0 {
            return false;
        }
        sub.command_tokens -= 1.0;
        true
    }

    fn subscribe(&mut self, id: SubId, filter: Filter) -> Reply {
        let limits = &self.config.limits;
        let Some(sub) = self.subs.get_mut(id) else {
            return Reply::Err(ErrorCode::Limit, "subscriber was removed".into());
        };
        if !sub.filters.contains(&filter) {
            let key_filters = sub
                .key
                .as_deref()
                .map_or(0, |key| self.filters_per_key.get(key).copied().unwrap_or(0));
            let segments = filter.pattern_segments();
            let refusal = if sub.filters.len() >= limits.max_filters_per_subscriber {
                Some(format!(
                    "this subscriber holds its limit of {} filters",
                    limits.max_filters_per_subscriber
                ))
            } else if segments > limits.max_pattern_segments {
                Some(format!(
                    "a pattern of {segments} segments is over the limit of {}",
                    limits.max_pattern_segments
                ))
            } else if key_filters >= limits.max_filters_per_key {
                Some(format!(
                    "this key's subscribers hold its limit of {} filters",
                    limits.max_filters_per_key
                ))
            } else if self.index.heap_bytes() >= limits.max_index_bytes {
                Some(format!(
                    "the broker's routing index holds its limit of {} bytes",
                    limits.max_index_bytes
                ))
            } else if self.index.len() >= limits.max_filters_total {
                Some(format!(
                    "the broker holds its limit of {} filters",
                    limits.max_filters_total
                ))
            } else {
                None
            };
            if let Some(text) = refusal {
                self.counters.refused_limit += 1;
                return Reply::Err(ErrorCode::Limit, text);
            }
            self.index.insert(&filter, id);
            sub.filters.insert(filter.clone());
            if let Some(key) = &sub.key {
                match self.filters_per_key.get_mut(&**key) {
                    Some(held) => *held += 1,
                    None => {
                        self.filters_per_key.insert(key.clone(), 1);
                    }
                }
            }
        }
        Reply::Ok {
            subscribe: true,
            filter,
        }
    }

    fn unsubscribe(&mut self, id: SubId, filter: Filter) -> Reply {
        let Some(sub) = self.subs.get_mut(id) else {
            return Reply::Err(ErrorCode::Limit, "subscriber was removed".into());
        };
        if !sub.filters.remove(&filter) {
            return Reply::Err(
                ErrorCode::NotSubscribed,
                format!("not subscribed to {filter}"),
            );
        }
        self.index.remove(&filter, id);
        if let Some(key) = sub.key.as_deref() {
            release_key_filters(&mut self.filters_per_key, key, 1);
        }
        Reply::Ok {
            subscribe: false,
            filter,
        }
    }

    /// Sends `reply` in order behind whatever the subscriber has queued, or
    /// straight away to a routing id the broker does not track.
    fn reply(
        &mut self,
        id: Option<SubId>,
        routing_id: &[u8],
        reply: Reply,
        now: Instant,
        out: &mut impl Transport<P>,
    ) {
        let Some((id, sub)) = id.and_then(|id| Some((id, self.subs.get_mut(id)?))) else {
            // Untracked peers get one best-effort try: queueing for them
            // would let anyone make the broker hold memory.
            send_reply(out, routing_id, &reply);
            return;
        };
        if sub.queue.is_empty() {
            match send_reply(out, &sub.routing_id, &reply) {
                SendOutcome::Sent => return,
                SendOutcome::Unreachable => {
                    self.gone.push(id);
                    return;
                }
                SendOutcome::WouldBlock => {}
            }
        }
        self.queues.push(
            &self.config.queue,
            reply_bound(&self.config.limits),
            &mut self.counters,
            id,
            sub,
            Queued::Reply(reply),
            now,
        );
    }

    /// Sends what waits in subscriber queues, oldest first, until libzmq
    /// refuses more. Returns whether anything is still queued.
    pub fn flush(&mut self, out: &mut impl Transport<P>) -> bool {
        self.send_routed(out);
        let mut i = 0;
        while let Some(&id) = self.queues.backlog.get(i) {
            let Some(sub) = self.subs.get_mut(id) else {
                self.queues.backlog.swap_remove(i);
                continue;
            };
            let mut progressed = false;
            while let Some(item) = sub.queue.front_mut() {
                // Measured first: the send takes a queued message's parts.
                let size = queued_size(item);
                let outcome = match item {
                    Queued::Message {
                        seq,
                        topic,
                        payload,
                    } => {
                        let payload_len = payload.bytes().len() as u64;
                        let outcome =
                            out.deliver(&sub.routing_id, *seq, topic.bytes(), payload, true);
                        if outcome == SendOutcome::Sent {
                            self.counters.delivered += 1;
                            self.counters.delivered_bytes += payload_len;
                        }
                        outcome
                    }
                    Queued::Reply(reply) => send_reply(out, &sub.routing_id, reply),
                };
                match outcome {
                    SendOutcome::Sent => {
                        let Some(item) = sub.queue.pop_front() else {
                            break;
                        };
                        self.queues.took_sized(sub, &item, size);
                        progressed = true;
                    }
                    SendOutcome::WouldBlock => break,
                    SendOutcome::Unreachable => {
                        // The failed send may have taken the item's parts:
                        // account for it here, at its size from before.
                        if let Some(item) = sub.queue.pop_front() {
                            self.queues.took_sized(sub, &item, size);
                            if matches!(item, Queued::Message { .. }) {
                                self.counters.dropped_subscriber_gone += 1;
                            }
                        }
                        self.gone.push(id);
                        break;
                    }
                }
            }
            // A consumer that took anything is not stuck: the clock
            // restarts at its next drop (`disconnect`) or at the next tick
            // that finds it holding publishers back (`backpressure`).
            if progressed {
                sub.full_since = None;
            }
            if sub.queue.is_empty() {
                sub.in_backlog = false;
                self.queues.backlog.swap_remove(i);
            } else {
                i += 1;
            }
        }
        self.remove_gone();
        !self.queues.backlog.is_empty()
    }

    /// Lets time pass: forgets subscribers silent for `sub_timeout` and
    /// cuts off slow ones under the `disconnect` and `backpressure` overflow
    /// policies. Returns when it next needs to be called.
    pub fn tick(&mut self, now: Instant, out: &mut impl Transport<P>) -> Instant {
        self.send_routed(out);
        if now < self.next_sweep {
            return self.next_sweep;
        }
        let timeout = self.config.sub_timeout;
        self.gone.extend(
            self.subs
                .iter()
                .filter(|(_, sub)| now.saturating_duration_since(sub.last_heard) >= timeout)
                .map(|(id, _)| id),
        );
        for &id in &self.gone {
            if let Some(sub) = self.subs.get(id) {
                // Best effort: if it is alive after all, it learns it must
                // subscribe again.
                let text = format!(
                    "expired: no command for {} ms; subscribe again",
                    timeout.as_millis()
                );
                send_reply(out, &sub.routing_id, &Reply::Err(ErrorCode::Limit, text));
            }
        }
        for id in std::mem::take(&mut self.gone) {
            if self.forget(id) {
                self.counters.expired_subscribers += 1;
            }
        }

        if self.config.queue.policy == OverflowPolicy::Backpressure {
            // A subscriber holding publishers back starts the clock here:
            // one past its own mark, or, while all queues together are past
            // theirs, any with messages queued. Taking anything (in
            // `flush`) stops it.
            let all_over = self.queues.bytes >= self.queues.mark.total_bytes;
            for &id in &self.queues.backlog {
                if let Some(sub) = self.subs.get_mut(id)
                    && (sub.over_mark || all_over && sub.queue.len() > sub.queued_replies)
                    && sub.full_since.is_none()
                {
                    sub.full_since = Some(now);
                }
            }
        }
        if matches!(
            self.config.queue.policy,
            OverflowPolicy::Disconnect | OverflowPolicy::Backpressure
        ) {
            let cutoff = self.config.queue.disconnect_after;
            let slow: Vec<SubId> = self
                .queues
                .backlog
                .iter()
                .copied()
                .filter(|&id| {
                    self.subs
                        .get(id)
                        .and_then(|s| s.full_since)
                        .is_some_and(|since| now.saturating_duration_since(since) >= cutoff)
                })
                .collect();
            for id in slow {
                self.cut_off(id, now);
            }
        }
        // Sweeping costs one pass over the table, so do it a few times per
        // timeout rather than on every wake-up.
        let interval = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        self.next_sweep = now + interval;
        self.next_sweep
    }

    /// The `disconnect` policy (and `backpressure`'s bound): a subscriber
    /// whose queue stayed full, or that held publishers back taking
    /// nothing, loses its filters and queue, and is told so once its pipe
    /// drains.
    fn cut_off(&mut self, id: SubId, now: Instant) {
        let Some(sub) = self.subs.get_mut(id) else {
            return;
        };
        for filter in sub.filters.drain() {
            self.index.remove(&filter, id);
        }
        for item in std::mem::take(&mut sub.queue) {
            self.queues.took(sub, &item);
            count_drop(&mut self.counters, sub, &item);
        }
        sub.full_since = None;
        self.counters.slow_disconnects += 1;
        tracing::warn!(
            subscriber = %Hex(&sub.routing_id),
            dropped = sub.dropped,
            "cut off a slow subscriber: its queue stayed full, or it held publishers back taking nothing"
        );
        if sub.in_backlog {
            sub.in_backlog = false;
            self.queues.backlog.retain(|&b| b != id);
        }
        let text = "cut-off: slow consumer, filters and queue dropped; subscribe again";
        self.queues.push(
            &self.config.queue,
            reply_bound(&self.config.limits),
            &mut self.counters,
            id,
            sub,
            Queued::Reply(Reply::Err(ErrorCode::Limit, text.into())),
            now,
        );
    }

    /// Frees the subscribers collected in `gone`, counting them unreachable.
    fn remove_gone(&mut self) {
        while let Some(id) = self.gone.pop() {
            if self.forget(id) {
                self.counters.unreachable_subscribers += 1;
            }
        }
    }

    /// Frees a subscriber: its filters, its queue (counted as dropped) and its
    /// id. False if it was already gone (an id can be listed twice).
    fn forget(&mut self, id: SubId) -> bool {
        let Some(mut sub) = self.subs.remove(id) else {
            return false;
        };
        for filter in &sub.filters {
            self.index.remove(filter, id);
        }
        if let Some(key) = sub.key.as_deref() {
            release_key_filters(&mut self.filters_per_key, key, sub.filters.len());
        }
        for item in std::mem::take(&mut sub.queue) {
            self.queues.took(&mut sub, &item);
            if matches!(item, Queued::Message { .. }) {
                self.counters.dropped_subscriber_gone += 1;
            }
        }
        if sub.in_backlog {
            self.queues.backlog.retain(|&b| b != id);
        }
        tracing::debug!(subscriber = %Hex(&sub.routing_id), "forgot a subscriber");
        true
    }

    /// Under [`OverflowPolicy::Backpressure`]: whether the event loop must
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

    /// Every tracked subscriber.
    pub fn subscribers(&self) -> impl Iterator<Item = &Subscriber<P>> {
        self.subs.iter().map(|(_, s)| s)
    }

    /// Heap bytes held by the routing index (for memory accounting).
    pub fn index_heap_bytes(&self) -> usize {
        self.index.heap_bytes()
    }
}

/// The command rate the limits allow, at least 1.
fn config_rate(config: &BrokerConfig) -> u32 {
    config.limits.max_commands_per_sec.max(1)
}

/// Gives `count` filters back to `key`'s quota; forgets the key at zero, so
/// the map holds only keys with filters.
fn release_key_filters(map: &mut HashMap<Box<str>, usize>, key: &str, count: usize) {
    if let Some(held) = map.get_mut(key) {
        *held = held.saturating_sub(count);
        if *held == 0 {
            map.remove(key);
        }
    }
}

/// Routing ids are binary; logs show them as hex.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hashbrown::HashSet;

    type Bytes = Rc<[u8]>;

    /// A transport that records deliveries and replies, and can be told that
    /// some peers are full or gone.
    #[derive(Default)]
    struct Recorder {
        delivered: Vec<(Vec<u8>, u64, Vec<u8>)>,
        replies: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
        full: HashSet<Vec<u8>>,
        gone: HashSet<Vec<u8>>,
    }

    impl Recorder {
        fn outcome(&self, to: &[u8]) -> SendOutcome {
            if self.gone.contains(to) {
                SendOutcome::Unreachable
            } else if self.full.contains(to) {
                SendOutcome::WouldBlock
            } else {
                SendOutcome::Sent
            }
        }
    }

    impl Transport<Bytes> for Recorder {
        fn deliver(
            &mut self,
            to: &[u8],
            seq: u64,
            topic: &[u8],
            _: &mut Bytes,
            _: bool,
        ) -> SendOutcome {
            let outcome = self.outcome(to);
            if outcome == SendOutcome::Sent {
                self.delivered.push((to.to_vec(), seq, topic.to_vec()));
            }
            outcome
        }
        fn reply(&mut self, to: &[u8], frames: &[&[u8]]) -> SendOutcome {
            let outcome = self.outcome(to);
            if outcome == SendOutcome::Sent {
                self.replies
                    .push((to.to_vec(), frames.iter().map(|f| f.to_vec()).collect()));
            }
            outcome
        }
    }

    fn publish(b: &mut Broker<Bytes>, out: &mut Recorder, topic: &str, now: Instant) -> usize {
        let mut frames: [Bytes; 2] = [Rc::from(topic.as_bytes()), Rc::from(&b"p"[..])];
        b.on_publish(None, &mut frames, 2, now, out).unwrap()
    }

    /// Routes a publish without sending it (`route_publish`).
    fn stage(b: &mut Broker<Bytes>, out: &mut Recorder, topic: &str, now: Instant) {
        let mut frames: [Bytes; 2] = [Rc::from(topic.as_bytes()), Rc::from(&b"p"[..])];
        b.route_publish(None, &mut frames, 2, now, out).unwrap();
    }

    fn command(b: &mut Broker<Bytes>, out: &mut Recorder, who: &[u8], frames: &[&[u8]]) {
        b.on_command(who, None, frames, frames.len(), Instant::now(), out);
    }

    fn last_reply(out: &Recorder) -> Vec<&[u8]> {
        out.replies
            .last()
            .unwrap()
            .1
            .iter()
            .map(|f| &f[..])
            .collect()
    }

    #[test]
    fn subscribe_publish_unsubscribe() {
        let now = Instant::now();
        let mut b = Broker::new(BrokerConfig::default(), now);
        let mut out = Recorder::default();
        command(&mut b, &mut out, b"a", &[b"SUB", b"exact", b"x.y"]);
        assert_eq!(last_reply(&out), [&b"OK"[..], b"SUB", b"exact", b"x.y"]);
        command(&mut b, &mut out, b"a", &[b"SUB", b"pattern", b"x.*"]);
        command(&mut b, &mut out, b"a", &[b"SUB", b"pattern", b"x.*"]);
        assert_eq!(b.subscription_count(), 2, "SUB twice is idempotent");
        assert_eq!(
            publish(&mut b, &mut out, "x.y", now),
            1,
            "once despite two filters"
        );
        assert_eq!(publish(&mut b, &mut out, "x.z", now), 1);
        assert_eq!(publish(&mut b, &mut out, "q", now), 0);
        let seqs: Vec<u64> = out.delivered.iter().map(|d| d.1).collect();
        assert_eq!(seqs, [1, 2]);
        command(&mut b, &mut out, b"a", &[b"UNSUB", b"prefix", b"x"]);
        assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"not-subscribed"]);
        command(&mut b, &mut out, b"a", &[b"UNSUB", b"pattern", b"x.*"]);
        assert_eq!(last_reply(&out)[..2], [&b"OK"[..], b"UNSUB"]);
        assert_eq!(publish(&mut b, &mut out, "x.z", now), 0);
    }

    #[test]
    fn malformed_input_is_refused_and_counted() {
        let now = Instant::now();
        let mut b = Broker::new(BrokerConfig::default(), now);
        let mut out = Recorder::default();
        command(&mut b, &mut out, b"a", &[b"HELLO"]);
        assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"bad-command"]);
        b.on_command(b"a", None, &[b"SUB", b"exact", b"x"], 9, now, &mut out);
        assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"bad-command"]);
        command(&mut b, &mut out, b"a", &[b"SUB", b"pattern", b">.x"]);
        assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"bad-filter"]);
        assert_eq!(b.counters().malformed_commands, 3);
        assert_eq!(b.subscriber_count(), 0, "bad commands register nobody");
        let mut one: [Bytes; 1] = [Rc::from(&b"t"[..])];
        assert_eq!(
            b.on_publish(None, &mut one, 1, now, &mut out),
            Err(PublishError::FrameCount(1))
        );
        let mut three: [Bytes; 2] = [Rc::from(&b"t"[..]), Rc::from(&b"p"[..])];
        assert_eq!(
            b.on_publish(None, &mut three, 3, now, &mut out),
            Err(PublishError::FrameCount(3))
        );
        assert_eq!(b.counters().malformed_publishes, 2);
    }

    #[test]
    fn staged_deliveries_go_out_per_subscriber_in_order() {
        let now = Instant::now();
        let mut b = Broker::new(BrokerConfig::default(), now);
        let mut out = Recorder::default();
        command(&mut b, &mut out, b"a", &[b"SUB", b"prefix", b""]);
        command(&mut b, &mut out, b"b", &[b"SUB", b"exact", b"x"]);
        command(&mut b, &mut out, b"c", &[b"SUB", b"prefix", b""]);
        out.gone.insert(b"c".to_vec());
        for topic in ["x", "y", "x"] {
            stage(&mut b, &mut out, topic, now);
        }
        assert!(out.delivered.is_empty(), "staged, not sent");
        assert_eq!(b.staged_deliveries(), 8);
        assert_eq!(
            b.subscriber(b"a").unwrap().last_seq,
            3,
            "seqs taken when routed"
        );
        b.send_routed(&mut out);
        let mut sent: Vec<(&[u8], u64, &[u8])> = out
            .delivered
            .iter()
            .map(|(to, seq, topic)| (&to[..], *seq, &topic[..]))
            .collect();
        let runs = 1 + sent.windows(2).filter(|w| w[0].0 != w[1].0).count();
        assert_eq!(runs, 2, "one run per subscriber: {sent:?}");
        sent.sort_by_key(|d| d.0);
        let want: [(&[u8], u64, &[u8]); 5] = [
            (b"a", 1, b"x"),
            (b"a", 2, b"y"),
            (b"a", 3, b"x"),
            (b"b", 1, b"x"),
            (b"b", 2, b"x"),
        ];
        assert_eq!(sent, want, "each subscriber's run in order");
        assert_eq!(b.staged_deliveries(), 0);
        assert!(b.subscriber(b"c").is_none(), "unreachable: forgotten");
        let c = b.counters();
        assert_eq!(c.dropped_subscriber_gone, 3, "all of c's staged deliveries");
        assert_eq!(c.routed, c.delivered + c.dropped_subscriber_gone);

        // A command sends what is staged before its reply.
        out.delivered.clear();
        stage(&mut b, &mut out, "x", now);
        command(&mut b, &mut out, b"b", &[b"PING"]);
        assert_eq!(out.delivered.len(), 2);
        assert_eq!(b.staged_deliveries(), 0);
    }

    #[test]
    fn staged_deliveries_to_a_full_pipe_queue_in_order() {
        let now = Instant::now();
        let mut b = Broker::new(BrokerConfig::default(), now);
        let mut out = Recorder::default();
        command(&mut b, &mut out, b"a", &[b"SUB", b"prefix", b""]);
        out.full.insert(b"a".to_vec());
        for _ in 0..3 {
            stage(&mut b, &mut out, "t", now);
        }
        b.send_routed(&mut out);
        assert_eq!(b.queued_messages(), 3);
        out.full.clear();
        assert!(!b.flush(&mut out));
        let seqs: Vec<u64> = out.delivered.iter().map(|d| d.1).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[test]
    fn staging_is_bounded() {
        let now = Instant::now();
        let mut b = Broker::new(BrokerConfig::default(), now);
        let mut out = Recorder::default();
        command(&mut b, &mut out, b"a", &[b"SUB", b"prefix", b""]);
        for _ in 0..MAX_STAGED_MESSAGES + 10 {
            stage(&mut b, &mut out, "t", now);
            assert!(b.staged_deliveries() < MAX_STAGED_MESSAGES);
        }
        assert_eq!(out.delivered.len(), MAX_STAGED_MESSAGES);
    }

    #[test]
    fn full_pipe_queues_in_order_then_drops_with_a_gap() {
        let now = Instant::now();
        let mut config = BrokerConfig::default();
        config.queue.max_messages = 3;
        let (mut b, mut out) = one_full_subscriber(config, now);
        for _ in 0..5 {
            publish(&mut b, &mut out, "t", now);
        }
        assert_eq!(b.queued_messages(), 3);
        assert_eq!(b.counters().dropped_queue_full, 2);
        out.full.clear();
        assert!(!b.flush(&mut out));
        publish(&mut b, &mut out, "t", now);
        let seqs: Vec<u64> = out.delivered.iter().map(|d| d.1).collect();
        assert_eq!(
            seqs,
            [1, 2, 3, 6],
            "drop-new keeps the oldest; 4 and 5 are the gap"
        );
        assert_eq!(b.subscriber("a".as_bytes()).unwrap().dropped, 2);
    }

    #[test]
    fn drop_old_keeps_the_newest() {
        let now = Instant::now();
        let mut config = BrokerConfig::default();
        config.queue.max_messages = 2;
        config.queue.policy = OverflowPolicy::DropOld;
        let (mut b, mut out) = one_full_subscriber(config, now);
        for _ in 0..5 {
            publish(&mut b, &mut out, "t", now);
        }
        out.full.clear();
        b.flush(&mut out);
        let seqs: Vec<u64> = out.delivered.iter().map(|d| d.1).collect();
        assert_eq!(seqs, [4, 5]);
        assert_eq!(b.counters().dropped_queue_full, 3);
    }

    #[test]
    fn unreachable_and_silent_subscribers_are_freed() {
        let now = Instant::now();
        let mut b = Broker::new(BrokerConfig::default(), now);
        let mut out = Recorder::default();
        command(&mut b, &mut out, b"a", &[b"SUB", b"prefix", b""]);
        command(&mut b, &mut out, b"b", &[b"SUB", b"prefix", b""]);
        out.gone.insert(b"a".to_vec());
        assert_eq!(publish(&mut b, &mut out, "t", now), 2);
        assert_eq!(b.subscriber_count(), 1);
        assert_eq!(b.subscription_count(), 1);
        let later = Instant::now() + Duration::from_secs(11);
        b.tick(later, &mut out);
        assert_eq!(b.subscriber_count(), 0);
        assert_eq!(b.subscription_count(), 0);
        assert_eq!(b.counters().expired_subscribers, 1);
        assert_eq!(b.counters().unreachable_subscribers, 1);
    }

    #[test]
    fn disconnect_policy_cuts_off_and_tells() {
        let now = Instant::now();
        let mut config = BrokerConfig::default();
        config.queue.max_messages = 1;
        config.queue.policy = OverflowPolicy::Disconnect;
        let (mut b, mut out) = one_full_subscriber(config, now);
        publish(&mut b, &mut out, "t", now);
        publish(&mut b, &mut out, "t", now);
        b.tick(now + Duration::from_secs(6), &mut out);
        assert_eq!(b.counters().slow_disconnects, 1);
        assert_eq!(b.subscription_count(), 0);
        out.full.clear();
        b.flush(&mut out);
        assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"limit"]);
    }

    /// A broker on `config` with subscriber "a" on everything and its pipe
    /// full, so what is routed to it queues.
    fn one_full_subscriber(config: BrokerConfig, now: Instant) -> (Broker<Bytes>, Recorder) {
        let mut b = Broker::new(config, now);
        let mut out = Recorder::default();
        command(&mut b, &mut out, b"a", &[b"SUB", b"prefix", b""]);
        out.full.insert(b"a".to_vec());
        (b, out)
    }

    /// The backpressure policy, queues of 4 messages, "a" behind a full pipe.
    fn backpressured(now: Instant) -> (Broker<Bytes>, Recorder) {
        let mut config = BrokerConfig::default();
        config.queue.max_messages = 4;
        config.queue.policy = OverflowPolicy::Backpressure;
        config.queue.disconnect_after = Duration::from_secs(5);
        one_full_subscriber(config, now)
    }

    #[test]
    fn backpressure_pauses_publishers_at_half_a_queue_and_loses_nothing() {
        let now = Instant::now();
        let (mut b, mut out) = backpressured(now);
        let mut published = 0;
        while !b.publishers_paused() {
            publish(&mut b, &mut out, "t", now);
            published += 1;
            assert!(published <= 4, "never paused");
        }
        assert_eq!(published, 2, "paused at half of max_messages");
        assert!(
            b.publishers_paused(),
            "stays paused while the queue is full"
        );
        out.full.clear();
        assert!(!b.flush(&mut out));
        assert!(!b.publishers_paused(), "resumes once the queue drained");
        let seqs: Vec<u64> = out.delivered.iter().map(|d| d.1).collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(b.counters().dropped_queue_full, 0);
        assert_eq!(b.counters().backpressure_pauses, 1);
        assert_eq!(b.snapshot().publishers_paused, 0);
    }

    #[test]
    fn backpressure_counts_staged_deliveries_toward_the_mark() {
        let now = Instant::now();
        let (mut b, mut out) = backpressured(now);
        stage(&mut b, &mut out, "t", now);
        assert!(!b.publishers_paused());
        stage(&mut b, &mut out, "t", now);
        assert!(b.publishers_paused(), "two staged reach the mark of two");
        b.send_routed(&mut out);
        assert!(b.publishers_paused(), "now two queued behind the full pipe");
    }

    #[test]
    fn backpressure_counts_staged_bytes_toward_the_mark() {
        let now = Instant::now();
        let mut config = BrokerConfig::default();
        config.queue.max_bytes = 100;
        config.queue.policy = OverflowPolicy::Backpressure;
        let (mut b, mut out) = one_full_subscriber(config, now);
        let mut stage_30 = |b: &mut Broker<Bytes>| {
            let mut frames: [Bytes; 2] = [Rc::from(&b"t"[..]), Rc::from(&[0u8; 29][..])];
            b.route_publish(None, &mut frames, 2, now, &mut out)
                .unwrap();
        };
        stage_30(&mut b);
        assert!(!b.publishers_paused(), "30 of 100 bytes");
        stage_30(&mut b);
        assert!(
            b.publishers_paused(),
            "60 staged bytes reach the mark of 50"
        );
    }

    #[test]
    fn backpressure_clocks_every_backlog_while_all_queues_hold_half_the_total() {
        let now = Instant::now();
        let mut config = BrokerConfig::default();
        config.queue.max_total_bytes = 40;
        config.queue.policy = OverflowPolicy::Backpressure;
        config.queue.disconnect_after = Duration::from_secs(5);
        let mut b = Broker::new(config, now);
        let mut out = Recorder::default();
        for who in [&b"a"[..], b"b"] {
            command(&mut b, &mut out, who, &[b"SUB", b"prefix", b""]);
            out.full.insert(who.to_vec());
        }
        for published in 1.. {
            publish(&mut b, &mut out, "t", now);
            if b.publishers_paused() {
                assert_eq!(published, 5, "2 queues x 5 x 2 bytes = 20 of 40");
                break;
            }
            assert!(published < 5, "never paused");
        }
        assert_eq!(b.queues.over_mark, 0, "no queue is past its own mark");
        b.tick(now, &mut out);
        b.tick(now + Duration::from_secs(5), &mut out);
        assert_eq!(b.counters().slow_disconnects, 2);
        assert!(!b.publishers_paused());
    }

    #[test]
    fn backpressure_cuts_off_a_subscriber_that_takes_nothing() {
        let now = Instant::now();
        let (mut b, mut out) = backpressured(now);
        publish(&mut b, &mut out, "t", now);
        publish(&mut b, &mut out, "t", now);
        assert!(b.publishers_paused());
        // The clock starts at the first tick that sees it holding
        // publishers back, and taking something restarts it.
        b.tick(now, &mut out);
        out.full.clear();
        b.flush(&mut out); // it takes its queue: progress
        out.full.insert(b"a".to_vec());
        publish(&mut b, &mut out, "t", now);
        publish(&mut b, &mut out, "t", now);
        let later = now + Duration::from_secs(3);
        b.tick(later, &mut out);
        b.tick(now + Duration::from_secs(6), &mut out);
        assert_eq!(b.counters().slow_disconnects, 0, "it took something at 0 s");
        b.tick(later + Duration::from_secs(5), &mut out);
        assert_eq!(b.counters().slow_disconnects, 1);
        assert_eq!(b.subscription_count(), 0);
        assert!(
            !b.publishers_paused(),
            "a cut-off subscriber holds nothing back"
        );
        assert_eq!(b.counters().dropped_queue_full, 2, "its queue, counted");
    }

    #[test]
    fn limits_refuse_with_err_limit() {
        let now = Instant::now();
        let mut config = BrokerConfig::default();
        config.limits.max_subscribers = 1;
        config.limits.max_filters_per_subscriber = 1;
        let mut b = Broker::new(config, now);
        let mut out = Recorder::default();
        command(&mut b, &mut out, b"a", &[b"SUB", b"exact", b"x"]);
        command(&mut b, &mut out, b"a", &[b"SUB", b"exact", b"y"]);
        assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"limit"]);
        command(&mut b, &mut out, b"b", &[b"PING"]);
        assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"limit"]);
        assert_eq!(b.counters().refused_limit, 2);
    }

    #[test]
    fn patterns_over_the_segment_limit_are_refused() {
        let now = Instant::now();
        let mut config = BrokerConfig::default();
        config.limits.max_pattern_segments = 3;
        let mut b = Broker::new(config, now);
        let mut out = Recorder::default();
        command(&mut b, &mut out, b"a", &[b"SUB", b"pattern", b"a.*.c"]);
        assert_eq!(last_reply(&out)[0], b"OK");
        command(&mut b, &mut out, b"a", &[b"SUB", b"pattern", b"a.*.c.>"]);
        assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"limit"]);
        // Exact and prefix filters are matched byte by byte: no segment limit.
        command(&mut b, &mut out, b"a", &[b"SUB", b"exact", b"a.b.c.d.e"]);
        assert_eq!(last_reply(&out)[0], b"OK");
        assert_eq!(b.counters().refused_limit, 1);
        assert_eq!(b.subscription_count(), 2);
    }

    #[test]
    fn the_index_byte_limit_refuses_once_passed() {
        let now = Instant::now();
        let mut config = BrokerConfig::default();
        config.limits.max_index_bytes = 4096;
        let mut b = Broker::new(config, now);
        let mut out = Recorder::default();
        let mut confirmed = 0;
        for i in 0..1000 {
            let filter = format!("topic.{i:04}.{}", "x".repeat(100));
            command(
                &mut b,
                &mut out,
                b"a",
                &[b"SUB", b"exact", filter.as_bytes()],
            );
            match last_reply(&out)[0] {
                b"OK" => confirmed += 1,
                _ => break,
            }
        }
        assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"limit"]);
        assert!(confirmed > 0 && confirmed < 1000, "{confirmed} confirmed");
        // Refused from the first filter past the limit on: one filter's
        // worth of overshoot at most.
        assert!(
            b.index_heap_bytes() < 4096 + 512,
            "{}",
            b.index_heap_bytes()
        );
    }

    #[test]
    fn one_key_cannot_hold_more_than_its_quota() {
        let now = Instant::now();
        let mut config = BrokerConfig::default();
        config.limits.max_filters_per_key = 3;
        let mut b = Broker::new(config, now);
        let mut out = Recorder::default();
        let sub = |b: &mut Broker<Bytes>, out: &mut Recorder, who: &[u8], key, f: &str| {
            b.on_command(who, key, &[b"SUB", b"exact", f.as_bytes()], 3, now, out);
            out.replies.last().unwrap().1[0].clone()
        };
        // Two connections of the same key share its quota.
        assert_eq!(sub(&mut b, &mut out, b"a", Some("K"), "1"), b"OK");
        assert_eq!(sub(&mut b, &mut out, b"b", Some("K"), "2"), b"OK");
        assert_eq!(sub(&mut b, &mut out, b"b", Some("K"), "3"), b"OK");
        assert_eq!(sub(&mut b, &mut out, b"a", Some("K"), "4"), b"ERR");
        // Another key is not affected.
        assert_eq!(sub(&mut b, &mut out, b"c", Some("L"), "4"), b"OK");
        // An UNSUB, or a subscriber forgotten, gives quota back.
        b.on_command(
            b"b",
            Some("K"),
            &[b"UNSUB", b"exact", b"3"],
            3,
            now,
            &mut out,
        );
        assert_eq!(sub(&mut b, &mut out, b"a", Some("K"), "4"), b"OK");
        assert_eq!(sub(&mut b, &mut out, b"a", Some("K"), "5"), b"ERR");
        out.gone.insert(b"b".to_vec());
        let mut frames: [Bytes; 2] = [Rc::from(&b"2"[..]), Rc::from(&b"p"[..])];
        let _ = b.on_publish(None, &mut frames, 2, now, &mut out);
        assert_eq!(sub(&mut b, &mut out, b"a", Some("K"), "5"), b"OK");
    }

    #[test]
    fn garbage_from_strangers_shares_one_rate_limit() {
        let now = Instant::now();
        let mut config = BrokerConfig::default();
        config.limits.max_commands_per_sec = 10;
        let mut b = Broker::new(config, now);
        let mut out = Recorder::default();
        for i in 0..100u32 {
            // A new routing id each time: no record, no bucket of its own.
            b.on_command(&i.to_be_bytes(), None, &[b"NOPE"], 1, now, &mut out);
        }
        assert_eq!(
            out.replies.len(),
            10,
            "the shared bucket holds a second's worth"
        );
        assert_eq!(b.counters().malformed_commands, 100);
        assert_eq!(b.counters().refused_rate, 90);
        // A well-formed first command from a newcomer is not held back.
        command(&mut b, &mut out, b"honest", &[b"PING"]);
        assert_eq!(last_reply(&out), [b"PONG"]);
        // The bucket refills with time.
        let later = now + Duration::from_millis(500);
        b.on_command(b"x", None, &[b"NOPE"], 1, later, &mut out);
        assert_eq!(last_reply(&out)[0], b"ERR");
    }
}
