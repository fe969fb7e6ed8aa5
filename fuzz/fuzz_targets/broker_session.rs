#![no_main]
//! `broker_session`: whole broker sessions through the sans-IO core, checked
//! against an independent model.
//!
//! The core's promises (module docs of `zbroker_core::broker`, README, PROTOCOL.md)
//! are about interleavings: a subscriber that stalls while others publish,
//! unsubscribes while its queue is full, vanishes mid-flush, goes silent,
//! comes back under the same routing id. Unit tests pin a few of those; this
//! target lets the fuzzer pick them. Five routing ids send commands (valid
//! ones from a small alphabet, plus garbage), publishers send messages (plus
//! malformed ones) through `on_publish` or staged through `route_publish`
//! (as the server routes a batch), time advances by fuzz-chosen steps,
//! `flush` and `tick` run whenever the input says, and the transport answers each routing id
//! `Sent`, `WouldBlock` (always, or after N more sends) or `Unreachable` as
//! the input sets it. The config is tiny (queues of a few messages and
//! bytes, a few filters and subscribers) and uses the overflow policy the
//! input picks, so every bound is hit constantly.
//!
//! A model tracks, per routing id, whether the broker knows it, its filters
//! (applying each command as PROTOCOL.md says), when it was last heard, the
//! seq the broker must have assigned, the messages routed to it and not yet
//! delivered, and the replies it is owed. Checked after every operation:
//! - every delivery the transport sees carries a seq that was routed to that
//!   routing id with exactly that topic and payload, strictly above the last
//!   delivered seq (gaps allowed, repeats and reordering not), so a message
//!   reaches a subscriber at most once and only if it had a matching filter
//!   when the message was routed; seq restarts at 1 once the broker has
//!   forgotten the subscriber;
//! - `on_publish` and `route_publish` return the number of receivers the
//!   model computes with `Filter::matches`, and each subscriber's
//!   `last_seq` equals the model's; staged deliveries go out, in order, at
//!   the next `send_routed`, `on_publish` or `flush` (the target calls
//!   `send_routed` before `on_command` and `tick`, which would send them
//!   first too);
//! - every reply the transport sees is one the model predicted for that
//!   routing id (the `OK` echo, `PONG`, or `ERR` with the predicted code), in
//!   command order, or an `expired:` / `cut-off:` notice when one is due;
//!   replies skipped over are no more than the broker counted as dropped;
//! - `on_publish` never evicts a queued reply (PROTOCOL.md: every command is
//!   answered);
//! - the broker forgets a subscriber only after the transport said it is
//!   unreachable (and then no later than the next `flush`), or in a `tick`
//!   at least `sub_timeout` after its last command; it cuts one off only
//!   under the `disconnect` and `backpressure` policies and only after its
//!   queue has been non-empty for at least `disconnect_after` (the queue
//!   cannot have "stayed full", or held publishers back, for longer than it
//!   has been non-empty);
//! - `publishers_paused` is true exactly under the `backpressure` policy
//!   while a subscriber's queued and staged messages reach half of
//!   `max_messages`, its queued and staged bytes half of `max_bytes`, or
//!   all queued and staged bytes half of `max_total_bytes` (the publisher
//!   ops ignore it, so the bounds are hit under this policy too); the
//!   staged bytes the broker counts per subscriber are those of the
//!   model's last routed, undelivered messages;
//! - the token bucket refuses a message from a tracked peer, well-formed or
//!   not (`[ERR, limit, …]`, counted as `refused_rate`), exactly when an
//!   exact-arithmetic model of
//!   `max_commands_per_sec` with a burst of `max_filters_per_subscriber`
//!   has less than one token (either answer is accepted at exactly one);
//! - the broker's filters per subscriber equal the model's, and stay within
//!   the per-subscriber, total and subscriber-count limits;
//! - no subscriber queues more than `max_messages` messages, `max_bytes`
//!   bytes of messages or `max_queued_replies + max_filters_per_subscriber`
//!   replies; the snapshot's
//!   queued messages and bytes and its deepest queue agree with the queues,
//!   and queued bytes never exceed `max_total_bytes`;
//! - the counters match what the model saw, and satisfy
//!   `routed == delivered + dropped_queue_full + dropped_subscriber_gone
//!   + queued_messages + staged` (every routed message is in exactly one of
//!   those states) and `expired + unreachable == subscribers forgotten`.
//!
//! At the end every peer becomes writable again: a flush must empty every
//! queue, and unsubscribing every filter must return the routing index to
//! zero heap bytes.
//!
//! Input: nine config bytes (see `config`), then operations until the input
//! ends, each an opcode byte and its arguments (see `Op::read`). Replaying
//! an input with `ZBROKER_FUZZ_TRACE=1` prints every operation and every
//! send the broker attempted.

mod common;

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::rc::Rc;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use common::{Bytes, Input, PIECES};
use libfuzzer_sys::fuzz_target;
use zbroker_core::broker::{Broker, Payload, SendOutcome, Transport};
use zbroker_core::config::{BrokerConfig, OverflowPolicy};
use zbroker_core::filter::{Filter, FilterKind};
use zbroker_core::protocol::{self, Command, ErrorCode, PublishError};
use zbroker_core::subscribers::{Queued, Reply, Subscriber};

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// Routing ids as libzmq generates them start with a zero byte.
const PEERS: [&[u8]; 5] = [b"\0A", b"\0B", b"\0C", b"\0D", b"\0E"];

fn peer_of(routing_id: &[u8]) -> usize {
    PEERS
        .iter()
        .position(|p| *p == routing_id)
        .unwrap_or_else(|| panic!("the broker sent to {routing_id:?}, which never connected"))
}

/// How the transport answers one routing id; set by the input.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Open,
    Full,
    Gone,
    /// Room for this many more sends, then `WouldBlock`: a pipe that drains
    /// part of a backlog.
    Room(u8),
}

enum Event {
    Deliver {
        peer: usize,
        seq: u64,
        topic: Vec<u8>,
        payload: Vec<u8>,
        outcome: SendOutcome,
    },
    Reply {
        peer: usize,
        frames: Vec<Vec<u8>>,
        outcome: SendOutcome,
    },
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Deliver {
                peer,
                seq,
                topic,
                payload,
                outcome,
            } => write!(
                f,
                "deliver to {peer}: seq {seq} {:?} ({} bytes) -> {outcome:?}",
                String::from_utf8_lossy(topic),
                payload.len()
            ),
            Event::Reply {
                peer,
                frames,
                outcome,
            } => write!(
                f,
                "reply to {peer}: {:?} -> {outcome:?}",
                frames
                    .iter()
                    .map(|p| String::from_utf8_lossy(p))
                    .collect::<Vec<_>>()
            ),
        }
    }
}

/// The transport: answers per routing id's mode and records every attempt,
/// refused ones included, so the checks see exactly what the broker tried.
struct Wire {
    modes: [Mode; PEERS.len()],
    events: Vec<Event>,
}

impl Wire {
    fn outcome(&mut self, peer: usize) -> SendOutcome {
        match &mut self.modes[peer] {
            Mode::Open => SendOutcome::Sent,
            Mode::Full | Mode::Room(0) => SendOutcome::WouldBlock,
            Mode::Gone => SendOutcome::Unreachable,
            Mode::Room(n) => {
                *n -= 1;
                SendOutcome::Sent
            }
        }
    }
}

impl Transport<Bytes> for Wire {
    fn deliver(
        &mut self,
        to: &[u8],
        seq: u64,
        topic: &[u8],
        payload: &mut Bytes,
        last_use: bool,
    ) -> SendOutcome {
        let peer = peer_of(to);
        let outcome = self.outcome(peer);
        // As the real transport: a last use is sent by moving the part, a
        // refused send leaves it where it was.
        let sent = if last_use && outcome != SendOutcome::WouldBlock {
            payload.take()
        } else {
            payload.share()
        };
        self.events.push(Event::Deliver {
            peer,
            seq,
            topic: topic.to_vec(),
            payload: sent.to_vec(),
            outcome,
        });
        outcome
    }

    fn reply(&mut self, to: &[u8], frames: &[&[u8]]) -> SendOutcome {
        let peer = peer_of(to);
        let outcome = self.outcome(peer);
        self.events.push(Event::Reply {
            peer,
            frames: frames.iter().map(|f| f.to_vec()).collect(),
            outcome,
        });
        outcome
    }
}

/// A reply the model predicts.
#[derive(Clone, Debug)]
enum Expected {
    Ok { subscribe: bool, filter: Filter },
    Pong,
    Err(ErrorCode),
}

impl Expected {
    fn matches(&self, frames: &[Vec<u8>]) -> bool {
        let parts: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        match self {
            Expected::Pong => parts == [b"PONG"],
            Expected::Ok { subscribe, filter } => {
                let verb: &[u8] = if *subscribe { b"SUB" } else { b"UNSUB" };
                parts == [b"OK", verb, filter.kind().as_bytes(), filter.text()]
            }
            Expected::Err(code) => {
                matches!(parts[..], [b"ERR", word, text]
                    if word == code.as_bytes() && std::str::from_utf8(text).is_ok())
            }
        }
    }
}

/// Replies that answer no command; PROTOCOL.md, "Notices".
#[derive(Debug, PartialEq)]
enum Notice {
    Expired,
    CutOff,
}

fn notice(frames: &[Vec<u8>]) -> Option<Notice> {
    match frames {
        [err, code, text] if err == b"ERR" && code == b"limit" => {
            if text.starts_with(b"expired:") {
                Some(Notice::Expired)
            } else if text.starts_with(b"cut-off:") {
                Some(Notice::CutOff)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// The model of one routing id.
#[derive(Default)]
struct Peer {
    /// The broker has a subscriber record for it.
    tracked: bool,
    /// The transport said `Unreachable`: the broker must forget it soon.
    doomed: bool,
    filters: BTreeSet<Filter>,
    last_heard: Duration,
    /// The seq of the last message routed to it (the broker's `last_seq`).
    assigned: u64,
    /// Messages routed to it and neither delivered nor skipped over, by seq.
    pending: BTreeMap<u64, (Vec<u8>, Vec<u8>)>,
    last_delivered: u64,
    /// Replies owed, oldest first.
    replies: VecDeque<Expected>,
    /// Since when its broker-side queue has been non-empty.
    backlogged_since: Option<Duration>,
    /// Cut-off notices queued for it and not yet seen.
    cut_off_notices: usize,
    /// Command tokens in thousandths, so the bucket refills exactly with
    /// whole-millisecond time steps.
    tokens: u64,
    tokens_at: Duration,
}

/// Token units per command.
const MILLI: u64 = 1000;

/// What the model expects the counters to say, plus the slack the checks
/// allow for drops the model cannot attribute.
#[derive(Default, Debug)]
struct Tally {
    published: u64,
    malformed_publishes: u64,
    unmatched: u64,
    routed: u64,
    delivered: u64,
    commands: u64,
    malformed_commands: u64,
    refused_limit: u64,
    refused_rate: u64,
    published_bytes: u64,
    delivered_bytes: u64,
    forgotten: u64,
    cut_offs: u64,
    /// Messages never delivered because a later seq was.
    skipped_messages: u64,
    /// Owed replies never seen because a later reply was.
    skipped_replies: u64,
    /// Replies refused as `Unreachable`: lost without a drop counter.
    lost_replies: u64,
}

/// Which broker call produced the events being absorbed.
enum Call<'a> {
    Publish,
    Command,
    Flush,
    Tick {
        due: bool,
        expiring: &'a BTreeSet<usize>,
    },
}

/// Everything in a queue that `tick` could change; a cut-off changes it.
#[derive(PartialEq)]
struct Signature {
    filters: Vec<Filter>,
    queue: Vec<Result<u64, Reply>>,
    dropped: u64,
}

fn signature(sub: &Subscriber<Bytes>) -> Signature {
    let mut filters: Vec<Filter> = sub.filters().cloned().collect();
    filters.sort();
    Signature {
        filters,
        queue: sub
            .queue()
            .map(|item| match item {
                Queued::Message { seq, .. } => Ok(*seq),
                Queued::Reply(reply) => Err(reply.clone()),
            })
            .collect(),
        dropped: sub.dropped(),
    }
}

fn queued_replies(sub: &Subscriber<Bytes>) -> usize {
    sub.queue()
        .filter(|item| matches!(item, Queued::Reply(_)))
        .count()
}

struct Session {
    broker: Broker<Bytes>,
    wire: Wire,
    peers: [Peer; PEERS.len()],
    config: BrokerConfig,
    base: Instant,
    now: Duration,
    /// When the broker's next sweep is due (what `tick` last returned).
    next_sweep: Duration,
    /// Replies to routing ids the broker does not track: tried once, at once.
    one_shot: Vec<(usize, Expected)>,
    tally: Tally,
    /// `route_publish` left deliveries staged.
    staged: bool,
    /// When the last of them was staged: the broker dates the queueing of
    /// staged deliveries then, not when they are sent.
    staged_at: Duration,
    /// While sending staged deliveries: that date, for queues they start.
    dating: Option<Duration>,
    /// The broker's one token bucket (in thousandths) for malformed commands
    /// from untracked peers, and when it was last refilled; `None` until
    /// the first such command (the bucket starts full).
    strangers: Option<(u64, Duration)>,
}

impl Session {
    fn new(config: BrokerConfig) -> Self {
        let base = Instant::now();
        Session {
            broker: Broker::new(config.clone(), base),
            wire: Wire {
                modes: [Mode::Open; PEERS.len()],
                events: Vec::new(),
            },
            peers: Default::default(),
            config,
            base,
            now: Duration::ZERO,
            next_sweep: Duration::ZERO,
            one_shot: Vec::new(),
            tally: Tally::default(),
            staged: false,
            staged_at: Duration::ZERO,
            dating: None,
            strangers: None,
        }
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    /// `on_command` and `tick` send staged deliveries before anything else;
    /// that is done here first, so the model sees which peers a staged
    /// delivery found unreachable before it predicts the call's effects.
    /// (`flush` and `on_publish` are left to send them themselves.)
    fn send_staged(&mut self) {
        if std::mem::take(&mut self.staged) {
            self.broker.send_routed(&mut self.wire);
            self.dating = Some(self.staged_at);
            self.absorb(&Call::Publish);
            self.check();
            self.dating = None;
        }
    }

    fn command(&mut self, peer: usize, frames: &[&[u8]], count: usize) {
        self.send_staged();
        let subscribers = self.peers.iter().filter(|p| p.tracked).count();
        let total: usize = self.peers.iter().map(|p| p.filters.len()).sum();
        let rate_refusals = self.broker.counters().refused_rate;
        let now = self.instant();
        self.broker
            .on_command(PEERS[peer], None, frames, count, now, &mut self.wire);
        // Whether the token bucket refused it is read from the counter and
        // then judged against the model's bucket below: the broker's float
        // arithmetic may legitimately differ from exact arithmetic right at
        // one token.
        let rate_refused = match self.broker.counters().refused_rate - rate_refusals {
            0 => false,
            1 => true,
            n => panic!("one command refused {n} times"),
        };

        let limits = &self.config.limits;
        let p = &mut self.peers[peer];
        let known = p.tracked;
        if known {
            p.last_heard = self.now;
        }
        let parsed = if count > frames.len() {
            Err(ErrorCode::BadCommand)
        } else {
            protocol::parse_command(frames, limits.max_filter_len).map_err(|e| e.code())
        };
        let capacity =
            (limits.max_commands_per_sec as u64 + limits.max_filters_per_subscriber as u64) * MILLI;
        // The broker takes a token for every message from a tracked peer,
        // well-formed or not, before it parses it; an untracked peer's first
        // command is free (its bucket starts full).
        let mut limited = false;
        if known {
            let elapsed = (self.now - p.tokens_at).as_millis() as u64;
            p.tokens = (p.tokens + elapsed * limits.max_commands_per_sec as u64).min(capacity);
            p.tokens_at = self.now;
            match p.tokens.cmp(&MILLI) {
                Ordering::Greater => assert!(
                    !rate_refused,
                    "peer {peer} rate-limited with {} tokens left",
                    p.tokens as f64 / MILLI as f64
                ),
                Ordering::Less => assert!(
                    rate_refused,
                    "peer {peer} not rate-limited with {} tokens left",
                    p.tokens as f64 / MILLI as f64
                ),
                Ordering::Equal => {}
            }
            if rate_refused {
                limited = true;
            } else {
                p.tokens = p.tokens.saturating_sub(MILLI);
            }
        } else if parsed.is_err() {
            // Malformed commands from untracked peers share one bucket of
            // `max_commands_per_sec`, no burst; past it: no reply at all.
            let rate = u64::from(limits.max_commands_per_sec.max(1));
            let (tokens, at) = self.strangers.unwrap_or((rate * MILLI, self.now));
            let elapsed = (self.now - at).as_millis() as u64;
            let tokens = (tokens + elapsed * rate).min(rate * MILLI);
            match tokens.cmp(&MILLI) {
                Ordering::Greater => assert!(!rate_refused, "a stranger rate-limited early"),
                Ordering::Less => assert!(rate_refused, "a stranger not rate-limited"),
                Ordering::Equal => {}
            }
            if rate_refused {
                self.strangers = Some((tokens, self.now));
                self.tally.malformed_commands += 1;
                self.tally.refused_rate += 1;
                self.absorb(&Call::Command);
                self.check();
                return;
            }
            self.strangers = Some((tokens.saturating_sub(MILLI), self.now));
        } else {
            assert!(!rate_refused, "an untracked peer was rate-limited");
        }
        let (expected, tracked) = match parsed {
            _ if limited => {
                self.tally.refused_rate += 1;
                (Expected::Err(ErrorCode::Limit), true)
            }
            Err(code) => {
                self.tally.malformed_commands += 1;
                (Expected::Err(code), known)
            }
            Ok(_) if !known && subscribers >= limits.max_subscribers => {
                self.tally.refused_limit += 1;
                (Expected::Err(ErrorCode::Limit), false)
            }
            Ok(command) => {
                if !known {
                    *p = Peer {
                        tracked: true,
                        last_heard: self.now,
                        tokens: capacity,
                        tokens_at: self.now,
                        ..Peer::default()
                    };
                }
                {
                    self.tally.commands += 1;
                    let expected = match command {
                        Command::Ping => Expected::Pong,
                        Command::Subscribe(filter) => {
                            if !p.filters.contains(&filter)
                                && (p.filters.len() >= limits.max_filters_per_subscriber
                                    || total >= limits.max_filters_total)
                            {
                                self.tally.refused_limit += 1;
                                Expected::Err(ErrorCode::Limit)
                            } else {
                                p.filters.insert(filter.clone());
                                Expected::Ok {
                                    subscribe: true,
                                    filter,
                                }
                            }
                        }
                        Command::Unsubscribe(filter) => {
                            if p.filters.remove(&filter) {
                                Expected::Ok {
                                    subscribe: false,
                                    filter,
                                }
                            } else {
                                Expected::Err(ErrorCode::NotSubscribed)
                            }
                        }
                    };
                    (expected, true)
                }
            }
        };
        if tracked {
            p.replies.push_back(expected);
        } else {
            self.one_shot.push((peer, expected));
        }
        self.absorb(&Call::Command);
        self.check();
    }

    /// A publish with any topic; `count` frames of which the first two are
    /// given (the server's calling convention). `staged`: through
    /// `route_publish`, leaving the deliveries staged.
    fn publish(&mut self, frames: Vec<Vec<u8>>, count: usize, staged: bool) {
        let max = self.config.limits.max_topic_len;
        let want = match &frames[..] {
            _ if count != 2 => Err(PublishError::FrameCount(count)),
            [topic, _] if topic.is_empty() => Err(PublishError::EmptyTopic),
            [topic, _] if topic.len() > max => Err(PublishError::TopicTooLong {
                len: topic.len(),
                max,
            }),
            [topic, payload] => {
                let mut receivers = 0;
                for p in &mut self.peers {
                    if p.tracked && p.filters.iter().any(|f| f.matches(topic)) {
                        p.assigned += 1;
                        p.pending
                            .insert(p.assigned, (topic.clone(), payload.clone()));
                        receivers += 1;
                    }
                }
                self.tally.published_bytes += payload.len() as u64;
                Ok(receivers)
            }
            _ => unreachable!("count == 2 means two frames"),
        };
        match want {
            Ok(n) => {
                self.tally.published += 1;
                self.tally.routed += n as u64;
                self.tally.unmatched += (n == 0) as u64;
            }
            Err(_) => self.tally.malformed_publishes += 1,
        }
        let replies_before: Vec<Option<usize>> = PEERS
            .iter()
            .map(|rid| self.broker.subscriber(rid).map(queued_replies))
            .collect();
        let mut parts: Vec<Bytes> = frames.iter().map(|f| Bytes(Rc::from(&f[..]))).collect();
        let now = self.instant();
        let was_staged = self.staged;
        let got = if staged {
            self.broker
                .route_publish(None, &mut parts, count, now, &mut self.wire)
        } else {
            self.broker
                .on_publish(None, &mut parts, count, now, &mut self.wire)
        };
        assert_eq!(got, want, "publish of {frames:?} ({count} frames)");
        self.staged = self.broker.staged_deliveries() > 0;
        if staged && matches!(got, Ok(n) if n > 0) {
            self.staged_at = self.now;
        }
        assert!(staged || !self.staged, "on_publish left deliveries staged");
        for (i, before) in replies_before.into_iter().enumerate() {
            let after = self.broker.subscriber(PEERS[i]).map(queued_replies);
            if let (Some(before), Some(after)) = (before, after) {
                assert!(
                    after >= before,
                    "a publish evicted {} queued replies of peer {i}: \
                     those commands will never be answered",
                    before - after
                );
            }
        }
        // `on_publish` sends what is staged dated at the last routing: now
        // if this publish routed, else when the earlier ones were staged.
        if !staged && was_staged && !matches!(got, Ok(n) if n > 0) {
            self.dating = Some(self.staged_at);
        }
        self.absorb(&Call::Publish);
        self.check();
        self.dating = None;
    }

    fn flush(&mut self) {
        // `flush` sends staged deliveries first, dated as `send_staged`'s.
        self.dating = std::mem::take(&mut self.staged).then_some(self.staged_at);
        let more = self.broker.flush(&mut self.wire);
        self.absorb(&Call::Flush);
        let queued = PEERS
            .iter()
            .filter_map(|rid| self.broker.subscriber(rid))
            .any(|sub| sub.queue().len() > 0);
        assert_eq!(more, queued, "flush's answer to \"anything still queued?\"");
        self.check();
        self.dating = None;
    }

    fn tick(&mut self) {
        self.send_staged();
        let due = self.now >= self.next_sweep;
        let timeout = self.config.sub_timeout;
        let expiring: BTreeSet<usize> = (0..PEERS.len())
            .filter(|&i| {
                let p = &self.peers[i];
                due && p.tracked && self.now.saturating_sub(p.last_heard) >= timeout
            })
            .collect();
        let before: Vec<Option<Signature>> = PEERS
            .iter()
            .map(|rid| self.broker.subscriber(rid).map(signature))
            .collect();
        let slow_before = self.broker.counters().slow_disconnects;
        let now = self.instant();
        let next = self.broker.tick(now, &mut self.wire);
        let next = next.duration_since(self.base);
        if due {
            assert!(next > self.now, "the next sweep is in the future");
        } else {
            assert_eq!(next, self.next_sweep, "an early tick changes nothing");
        }
        self.next_sweep = next;
        self.absorb(&Call::Tick {
            due,
            expiring: &expiring,
        });

        let mut cut = 0;
        for (i, before) in before.into_iter().enumerate() {
            let Some(before) = before else { continue };
            let Some(after) = self.broker.subscriber(PEERS[i]).map(signature) else {
                continue;
            };
            if after == before {
                continue;
            }
            let queue = &self.config.queue;
            assert!(
                cuts_off(queue.policy) && due,
                "tick changed peer {i}'s filters or queue without a cut-off"
            );
            let p = &mut self.peers[i];
            let since = p
                .backlogged_since
                .expect("cut off a subscriber with nothing queued");
            assert!(
                self.now - since >= queue.disconnect_after,
                "peer {i} cut off at {:?}, its queue has only been non-empty since {since:?} \
                 (disconnect_after {:?})",
                self.now,
                queue.disconnect_after
            );
            p.filters.clear();
            p.pending.clear();
            p.cut_off_notices += 1;
            p.backlogged_since = None;
            cut += 1;
        }
        self.tally.cut_offs += cut;
        let slow = self.broker.counters().slow_disconnects - slow_before;
        // A repeated cut-off of a subscriber holding nothing but its last
        // notice leaves no trace, hence only a lower bound.
        assert!(slow >= cut, "{cut} cut-offs seen, {slow} counted");
        self.check();
    }

    /// Applies what the transport saw to the model, and the broker's
    /// forgetting of subscribers, checking both.
    fn absorb(&mut self, call: &Call) {
        let mut told = BTreeSet::new();
        for event in std::mem::take(&mut self.wire.events) {
            if *TRACE {
                eprintln!("    {event:?}");
            }
            match event {
                Event::Deliver {
                    peer,
                    seq,
                    topic,
                    payload,
                    outcome,
                } => {
                    assert!(
                        matches!(call, Call::Publish | Call::Flush),
                        "a delivery outside publish and flush"
                    );
                    let p = &mut self.peers[peer];
                    assert!(p.tracked, "delivery to untracked peer {peer}");
                    assert!(
                        seq > p.last_delivered,
                        "peer {peer} got seq {seq} after seq {}",
                        p.last_delivered
                    );
                    let Some(routed) = p.pending.get(&seq) else {
                        panic!(
                            "peer {peer} got seq {seq} (topic {:?}), which was not routed \
                             to it or was already dropped; routed and owed: {:?}",
                            String::from_utf8_lossy(&topic),
                            p.pending.keys().collect::<Vec<_>>()
                        );
                    };
                    assert_eq!(
                        routed,
                        &(topic, payload),
                        "peer {peer} seq {seq} carries another message"
                    );
                    let payload_len = routed.1.len() as u64;
                    match outcome {
                        SendOutcome::Sent => {
                            let later = p.pending.split_off(&(seq + 1));
                            self.tally.skipped_messages += p.pending.len() as u64 - 1;
                            p.pending = later;
                            p.last_delivered = seq;
                            self.tally.delivered += 1;
                            self.tally.delivered_bytes += payload_len;
                        }
                        SendOutcome::WouldBlock => {}
                        SendOutcome::Unreachable => p.doomed = true,
                    }
                }
                Event::Reply {
                    peer,
                    frames,
                    outcome,
                } => {
                    let p = &mut self.peers[peer];
                    if outcome == SendOutcome::Unreachable && p.tracked {
                        p.doomed = true;
                    }
                    match notice(&frames) {
                        Some(Notice::Expired) => {
                            let Call::Tick { expiring, .. } = call else {
                                panic!("expiry notice outside tick");
                            };
                            assert!(
                                expiring.contains(&peer) || p.doomed,
                                "peer {peer} told it expired {:?} after its last command",
                                self.now - p.last_heard
                            );
                            told.insert(peer);
                        }
                        Some(Notice::CutOff) => {
                            assert!(matches!(call, Call::Flush), "cut-off notice outside flush");
                            assert!(p.cut_off_notices > 0, "peer {peer} was never cut off");
                            if outcome == SendOutcome::Sent {
                                p.cut_off_notices -= 1;
                            }
                        }
                        None => {
                            assert!(!matches!(call, Call::Publish), "a publish sent a reply");
                            if let Some(i) = self.one_shot.iter().position(|(q, _)| *q == peer) {
                                let (_, want) = self.one_shot.remove(i);
                                assert!(
                                    want.matches(&frames),
                                    "peer {peer}: {frames:?}, not {want:?}"
                                );
                                continue;
                            }
                            assert!(p.tracked, "reply to untracked peer {peer}: {frames:?}");
                            let Some(at) = p.replies.iter().position(|w| w.matches(&frames)) else {
                                panic!("peer {peer} got {frames:?}; owed {:?}", p.replies);
                            };
                            match outcome {
                                SendOutcome::Sent => {
                                    self.tally.skipped_replies += at as u64;
                                    p.replies.drain(..=at);
                                }
                                SendOutcome::WouldBlock => {}
                                SendOutcome::Unreachable => self.tally.lost_replies += 1,
                            }
                        }
                    }
                }
            }
        }
        assert!(
            self.one_shot.is_empty(),
            "no reply to an untracked peer: {:?}",
            self.one_shot
        );

        for (i, p) in self.peers.iter_mut().enumerate() {
            let has = self.broker.subscriber(PEERS[i]).is_some();
            let swept = matches!(call, Call::Tick { due: true, .. });
            let expired = matches!(call, Call::Tick { expiring, .. } if expiring.contains(&i));
            if expired {
                assert!(told.contains(&i), "peer {i} expired without a notice");
                assert!(!has, "peer {i} outlived sub_timeout");
            }
            if p.tracked && !has {
                assert!(
                    p.doomed || expired,
                    "the broker forgot peer {i} for no reason"
                );
                *p = Peer::default();
                self.tally.forgotten += 1;
            } else if !p.tracked && has {
                panic!("the broker tracks peer {i}, which the model does not");
            }
            if p.doomed && (matches!(call, Call::Flush) || swept) {
                panic!("unreachable peer {i} survived a flush or sweep");
            }
        }
    }

    /// The invariants that hold between any two calls.
    fn check(&mut self) {
        let queue = &self.config.queue;
        let limits = &self.config.limits;
        let (mut subscribers, mut pairs, mut messages, mut bytes, mut depth) = (0, 0, 0, 0, 0);
        // Past the backpressure mark: a queue (with what is staged for it)
        // at half its bounds, or all queues at half of theirs.
        let mut over_mark = false;
        let mut staged_bytes = 0;
        for (i, p) in self.peers.iter_mut().enumerate() {
            let Some(sub) = self.broker.subscriber(PEERS[i]) else {
                continue;
            };
            subscribers += 1;
            let held: BTreeSet<Filter> = sub.filters().cloned().collect();
            assert_eq!(held, p.filters, "filters of peer {i}");
            assert!(held.len() <= limits.max_filters_per_subscriber);
            pairs += held.len();
            assert_eq!(sub.last_seq(), p.assigned, "last seq of peer {i}");

            let (mut own_messages, mut own_bytes, mut last) = (0, 0, 0);
            for item in sub.queue() {
                if let Queued::Message {
                    seq,
                    topic,
                    payload,
                } = item
                {
                    assert!(*seq > last, "peer {i}'s queue is out of order");
                    assert!(p.pending.contains_key(seq), "peer {i} queues seq {seq}");
                    last = *seq;
                    own_messages += 1;
                    own_bytes += topic.len() + payload.len();
                }
            }
            let own_replies = sub.queue().len() - own_messages;
            assert_eq!(sub.queued_replies(), own_replies, "peer {i}'s reply count");
            assert!(
                own_replies <= limits.max_queued_replies + limits.max_filters_per_subscriber,
                "peer {i}: {own_replies} replies queued"
            );
            assert!(
                own_messages <= queue.max_messages,
                "peer {i}: {own_messages} queued"
            );
            assert!(
                own_bytes <= queue.max_bytes,
                "peer {i}: {own_bytes} bytes queued"
            );
            messages += own_messages;
            bytes += sub.queued_bytes();
            depth = depth.max(sub.queue().len());
            if sub.queue().len() == 0 {
                p.backlogged_since = None;
            } else if p.backlogged_since.is_none() {
                p.backlogged_since = Some(self.dating.unwrap_or(self.now));
            }
            // Staged deliveries are the last seqs assigned, none delivered.
            let backpressure = queue.policy == OverflowPolicy::Backpressure;
            let staged_from = p.assigned + 1 - sub.staged_deliveries() as u64;
            let own_staged_bytes: usize = if backpressure {
                p.pending
                    .range(staged_from..)
                    .map(|(_, (topic, payload))| topic.len() + payload.len())
                    .sum()
            } else {
                0
            };
            assert_eq!(
                sub.staged_bytes(),
                own_staged_bytes,
                "peer {i}'s staged bytes"
            );
            staged_bytes += own_staged_bytes;
            let half = |bound: usize| bound.div_ceil(2).max(1);
            over_mark |= own_messages + sub.staged_deliveries() >= half(queue.max_messages)
                || sub.queued_bytes() + own_staged_bytes >= half(queue.max_bytes);
        }
        let backpressure = queue.policy == OverflowPolicy::Backpressure;
        over_mark |= bytes + staged_bytes >= queue.max_total_bytes.div_ceil(2).max(1);
        assert_eq!(
            self.broker.publishers_paused(),
            backpressure && over_mark,
            "publishers paused (policy {:?})",
            queue.policy
        );

        let staged = self.broker.staged_deliveries();
        assert!(
            self.staged || staged == 0,
            "{staged} deliveries left staged"
        );
        let snapshot = self.broker.snapshot();
        assert_eq!(snapshot.subscribers, subscribers as u64);
        assert!(subscribers <= limits.max_subscribers);
        assert_eq!(snapshot.subscriptions, pairs as u64);
        assert!(pairs <= limits.max_filters_total);
        assert_eq!(snapshot.queued_messages, messages as u64);
        assert_eq!(snapshot.queued_bytes, bytes as u64);
        assert!(
            bytes <= queue.max_total_bytes,
            "{bytes} bytes queued in all"
        );
        assert_eq!(snapshot.max_queue_depth, depth as u64);

        let c = &snapshot.counters;
        let t = &self.tally;
        assert_eq!(c.published, t.published, "published");
        assert_eq!(
            c.malformed_publishes, t.malformed_publishes,
            "malformed publishes"
        );
        assert_eq!(c.unmatched, t.unmatched, "unmatched");
        assert_eq!(c.routed, t.routed, "routed");
        assert_eq!(c.delivered, t.delivered, "delivered");
        assert_eq!(c.commands, t.commands, "commands");
        assert_eq!(
            c.malformed_commands, t.malformed_commands,
            "malformed commands"
        );
        assert_eq!(c.refused_limit, t.refused_limit, "refused by a limit");
        assert_eq!(
            c.refused_rate, t.refused_rate,
            "refused by the command rate"
        );
        assert_eq!(c.published_bytes, t.published_bytes, "published bytes");
        assert_eq!(c.delivered_bytes, t.delivered_bytes, "delivered bytes");
        assert_eq!(
            c.routed,
            c.delivered
                + c.dropped_queue_full
                + c.dropped_subscriber_gone
                + snapshot.queued_messages
                + staged as u64,
            "routed = delivered + dropped + queued + staged; {c:?}"
        );
        assert_eq!(
            c.expired_subscribers + c.unreachable_subscribers,
            t.forgotten,
            "subscribers forgotten"
        );
        if !cuts_off(queue.policy) {
            assert_eq!(c.slow_disconnects, 0);
        }
        assert!(
            t.skipped_messages <= c.dropped_queue_full + c.dropped_subscriber_gone,
            "{} seqs skipped, {c:?}",
            t.skipped_messages
        );
        assert!(
            t.skipped_replies <= c.dropped_replies + t.lost_replies,
            "{} replies never came, {c:?}",
            t.skipped_replies
        );
    }

    /// Every peer becomes writable: everything queued must go out, and
    /// removing every filter must leave the index as new.
    fn drain(&mut self) {
        self.wire.modes = [Mode::Open; PEERS.len()];
        self.flush();
        assert_eq!(self.broker.queued_messages(), 0);
        for p in &mut self.peers {
            // Nothing is queued, so whatever is still owed was dropped.
            self.tally.skipped_messages += p.pending.len() as u64;
            p.pending.clear();
            self.tally.skipped_replies += p.replies.len() as u64;
            p.replies.clear();
        }
        self.check();
        // Long enough for the token bucket to hold a command again.
        let refill =
            Duration::from_millis(1 + 1000 / self.config.limits.max_commands_per_sec as u64);
        for i in 0..PEERS.len() {
            for f in self.peers[i].filters.clone() {
                self.now += refill;
                self.command(i, &[b"UNSUB", f.kind().as_bytes(), f.text()], 3);
                assert!(self.peers[i].replies.is_empty(), "UNSUB answered at once");
            }
        }
        assert_eq!(self.broker.subscription_count(), 0);
        assert_eq!(
            self.broker.index_heap_bytes(),
            0,
            "index memory after removing all"
        );
    }
}

/// Policies under which `tick` may cut a subscriber off.
fn cuts_off(policy: OverflowPolicy) -> bool {
    matches!(
        policy,
        OverflowPolicy::Disconnect | OverflowPolicy::Backpressure
    )
}

fn config(input: &mut Input) -> BrokerConfig {
    let mut config = BrokerConfig::default();
    let q = &mut config.queue;
    q.policy = [
        OverflowPolicy::DropNew,
        OverflowPolicy::DropOld,
        OverflowPolicy::Disconnect,
        OverflowPolicy::Backpressure,
    ][input.byte() as usize % 4];
    q.max_messages = input.byte() as usize % 5;
    q.max_bytes = input.byte() as usize;
    q.max_total_bytes = input.byte() as usize * 4;
    let l = &mut config.limits;
    let b = input.byte() as usize;
    l.max_subscribers = 1 + b % 4;
    l.max_filters_per_subscriber = 1 + (b / 4) % 4;
    l.max_filters_total = 1 + (b / 16) % 8;
    let b = input.byte() as usize;
    l.max_topic_len = 1 + b % 16;
    l.max_filter_len = 1 + b / 16;
    config.sub_timeout = Duration::from_millis(10 + input.byte() as u64 * 4);
    config.queue.disconnect_after = Duration::from_millis(input.byte() as u64 * 2);
    let b = input.byte() as usize;
    let l = &mut config.limits;
    l.max_queued_replies = b % 5;
    // From a bucket that a few commands empty to one no input can.
    l.max_commands_per_sec = [1, 2, 5, 20, 100, 1000, 5000, u32::MAX][b / 5 % 8];
    config
}

/// Frames, shown as text in traces.
struct Parts(Vec<Vec<u8>>);

impl fmt::Debug for Parts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|p| String::from_utf8_lossy(p)))
            .finish()
    }
}

/// One step of a session, decoded from the input.
#[derive(Debug)]
enum Op {
    /// A subscriber's message: `count` frames, of which `frames` are the
    /// first (at most three, as the server passes them).
    Command {
        peer: usize,
        frames: Parts,
        count: usize,
    },
    /// A publisher's message, likewise with at most two frames given;
    /// `staged` through `route_publish`.
    Publish {
        frames: Parts,
        count: usize,
        staged: bool,
    },
    Mode(usize, Mode),
    Wait(Duration),
    Flush,
    Tick,
}

impl Op {
    fn read(input: &mut Input, publishes: &mut u32) -> Op {
        match input.byte() % 11 {
            0 | 1 => {
                let peer = input.byte() as usize % PEERS.len();
                let how = input.byte();
                let verb: &[u8] = if how & 1 == 0 { b"SUB" } else { b"UNSUB" };
                let kind = FilterKind::ALL[(how >> 1) as usize % 3];
                let text = input.text(&PIECES, 4);
                Op::Command {
                    peer,
                    frames: Parts(vec![verb.to_vec(), kind.as_bytes().to_vec(), text]),
                    count: 3,
                }
            }
            2 => Op::Command {
                peer: input.byte() as usize % PEERS.len(),
                frames: Parts(vec![b"PING".to_vec()]),
                count: 1,
            },
            3 => {
                let peer = input.byte() as usize % PEERS.len();
                let count = input.byte() as usize % 6;
                let frames: Vec<Vec<u8>> = (0..count).map(|_| input.frame().to_vec()).collect();
                Op::Command {
                    peer,
                    frames: Parts(frames.into_iter().take(3).collect()),
                    count,
                }
            }
            op @ (4 | 5) => {
                let topic = input.text(&PIECES, 4);
                // Payloads differ per publish, so a misrouted or duplicated
                // delivery cannot pass for the right one.
                *publishes += 1;
                let len = input.byte() as usize % 64;
                let payload = publishes.to_le_bytes().into_iter().cycle().take(len);
                Op::Publish {
                    frames: Parts(vec![topic, payload.collect()]),
                    count: 2,
                    staged: op == 5,
                }
            }
            6 => {
                let count = [0, 1, 3, 4][input.byte() as usize % 4];
                Op::Publish {
                    frames: Parts((0..count.min(2)).map(|_| input.frame().to_vec()).collect()),
                    count,
                    staged: false,
                }
            }
            7 => {
                let peer = input.byte() as usize % PEERS.len();
                let mode = input.byte();
                let mode = match mode % 4 {
                    0 => Mode::Open,
                    1 => Mode::Full,
                    2 => Mode::Gone,
                    _ => Mode::Room((mode >> 2) % 4),
                };
                Op::Mode(peer, mode)
            }
            8 => Op::Wait(Duration::from_millis(input.byte() as u64 * 4)),
            9 => Op::Flush,
            _ => Op::Tick,
        }
    }
}

/// `ZBROKER_FUZZ_TRACE=1` prints the config and every operation, which is
/// what you want when replaying a crash (`fuzz/target/.../broker_session
/// CRASH_FILE`).
static TRACE: LazyLock<bool> = LazyLock::new(|| std::env::var_os("ZBROKER_FUZZ_TRACE").is_some());

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let config = config(&mut input);
    if *TRACE {
        eprintln!("{:?} {:?}", config.limits, config.queue);
        eprintln!("sub_timeout {:?}", config.sub_timeout);
    }
    let mut session = Session::new(config);
    let mut publishes = 0u32;
    while !input.is_empty() {
        let op = Op::read(&mut input, &mut publishes);
        if *TRACE {
            eprintln!("at {:?}: {op:?}", session.now);
        }
        match op {
            Op::Command {
                peer,
                frames,
                count,
            } => {
                let frames: Vec<&[u8]> = frames.0.iter().map(Vec::as_slice).collect();
                session.command(peer, &frames, count);
            }
            Op::Publish {
                frames,
                count,
                staged,
            } => session.publish(frames.0, count, staged),
            Op::Mode(peer, mode) => session.wire.modes[peer] = mode,
            Op::Wait(step) => session.now += step,
            Op::Flush => session.flush(),
            Op::Tick => session.tick(),
        }
    }
    if *TRACE {
        eprintln!("{:?}\n{:?}", session.tally, session.broker.snapshot());
    }
    session.drain();
}

fuzz_target!(|data: &[u8]| run(data));
