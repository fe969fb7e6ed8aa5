#![no_main]
//! `xpub_notices`: the XPUB front's subscription notices, counted across SUB
//! sockets, interleaved with DEALER subscribers and publishes, against a
//! model.
//!
//! Plain SUB sockets subscribe through libzmq's XPUB, which passes every
//! subscribe (`0x01` + prefix) and unsubscribe (`0x00` + prefix) notice up;
//! the broker keeps a count per prefix and routes a prefix to the front
//! while its count is above zero, sending a matching message to the XPUB
//! socket once however many prefixes match. Prefixes and topics are glued
//! from a tiny alphabet (`a`, `b`, `ab`, `.`, and the empty prefix), so the
//! same prefix is subscribed by several SUBs, unsubscribed once too often,
//! and held next to the same prefix from DEALER subscribers, all the time.
//! The limits are small and come from the input (`max_filter_len`,
//! `max_filters_total`, `max_filters_per_subscriber`, `max_index_bytes`),
//! so refusals are common; the front opens at the start or, if the input
//! says so, only at an `Open` operation, with DEALERs already subscribed.
//!
//! The model holds the count per prefix, each DEALER's prefixes and its
//! last seq. Checked after every operation:
//! - each notice's `NoticeOutcome` is the model's: a subscribe of a held
//!   prefix always counts; a subscribe of a new prefix is `Refused` exactly
//!   when it is over `max_filter_len`, the index holds `max_index_bytes`
//!   (as `index_heap_bytes` read just before) or `max_filters_total` pairs
//!   are held, and a refused one leaves no count; an unsubscribe of a prefix
//!   no SUB holds is `NotSubscribed`, and the last one removes the prefix
//!   (`routed: false`); anything but `0x01`/`0x00` first is `Malformed`,
//!   and every notice is `Malformed` and uncounted while the front is
//!   closed;
//! - every DEALER `SUB`/`UNSUB` is answered as the model predicts (`OK`
//!   echo, `ERR bad-filter` over `max_filter_len`, `ERR limit`,
//!   `ERR not-subscribed`), with the front's prefixes counting toward
//!   `max_filters_total`;
//! - each publish calls `to_xpub` exactly once, with its topic and payload,
//!   if some held prefix starts the topic and never otherwise, with
//!   `last_use` exactly when no DEALER matched; each DEALER with a matching
//!   prefix gets one delivery with the next seq and the intact payload (the
//!   payload type's `take` really empties it, so a part given away too
//!   early shows), the last one marked `last_use`; `on_publish` returns the
//!   number of receivers, the front counting as one;
//! - `xpub_prefixes()` (and the snapshot's) is the number of prefixes held,
//!   `subscription_count()` the front's prefixes plus the DEALERs' filters;
//! - the counters `xpub_subscribes`, `xpub_unsubscribes`,
//!   `xpub_unknown_unsubscribes`, `xpub_refused_notices`,
//!   `xpub_malformed_notices`, `xpub_delivered` (and `xpub_dropped` 0),
//!   `published`, `unmatched`, `malformed_publishes`, `refused_limit` and
//!   `malformed_commands` equal the model's.
//!
//! At the end every SUB unsubscribes what it holds (the last notice of
//! each prefix unroutes it, one more is `NotSubscribed`), then every
//! DEALER: the index is empty, with a fresh index's heap bytes, and a
//! publish reaches nobody.
//!
//! Input: byte 0 `max_filter_len` (`% 8`), byte 1 `max_filters_total` (low
//! nibble) and `max_filters_per_subscriber` (high nibble, plus 1), byte 2
//! `max_index_bytes` (low 3 bits, see `INDEX_BYTES`) and, in bit 7, whether
//! the front stays closed until an `Open` operation; then operations until
//! the input ends, each an opcode byte (`% 8`) and its arguments (see
//! `Op::read`). Prefixes are `Input::text` over `ALPHABET` of up to 3 pieces,
//! topics of up to 4.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Instant;

use common::{Bytes, Input};
use libfuzzer_sys::fuzz_target;
use zbroker_core::broker::{Broker, NoticeOutcome, Payload, SendOutcome, Transport};
use zbroker_core::config::BrokerConfig;
use zbroker_core::index::RoutingIndex;
use zbroker_core::protocol::PublishError;

/// Pieces of prefixes and topics: prefixes of one another, and the
/// separator; zero pieces make the empty prefix (and the empty topic, which
/// a publisher may not send).
const ALPHABET: [&[u8]; 4] = [b"a", b"b", b"ab", b"."];

/// DEALER subscribers' routing ids (libzmq's start with a zero byte).
const DEALERS: [&[u8]; 3] = [b"\0A", b"\0B", b"\0C"];

/// `max_index_bytes` by input: mostly out of reach, or none at all, or a
/// few prefixes' worth (a prefix costs about 100 heap bytes, the empty one
/// none).
const INDEX_BYTES: [usize; 8] = [1 << 30, 1 << 30, 1 << 30, 1 << 30, 0, 100, 300, 600];

#[derive(Debug)]
enum Event {
    Deliver {
        dealer: usize,
        seq: u64,
        topic: Vec<u8>,
        payload: Vec<u8>,
        last_use: bool,
    },
    Reply {
        dealer: usize,
        frames: Vec<Vec<u8>>,
    },
    Xpub {
        topic: Vec<u8>,
        payload: Vec<u8>,
        last_use: bool,
    },
}

fn dealer_of(routing_id: &[u8]) -> usize {
    DEALERS
        .iter()
        .position(|d| *d == routing_id)
        .unwrap_or_else(|| panic!("the broker sent to {routing_id:?}, which never connected"))
}

/// Takes every send, and records it; a last use moves the part out, as the
/// real transport does.
#[derive(Default)]
struct Wire {
    events: Vec<Event>,
}

fn send(payload: &mut Bytes, last_use: bool) -> Vec<u8> {
    let sent = if last_use {
        payload.take()
    } else {
        payload.share()
    };
    sent.0.to_vec()
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
        self.events.push(Event::Deliver {
            dealer: dealer_of(to),
            seq,
            topic: topic.to_vec(),
            payload: send(payload, last_use),
            last_use,
        });
        SendOutcome::Sent
    }

    fn reply(&mut self, to: &[u8], frames: &[&[u8]]) -> SendOutcome {
        self.events.push(Event::Reply {
            dealer: dealer_of(to),
            frames: frames.iter().map(|f| f.to_vec()).collect(),
        });
        SendOutcome::Sent
    }

    fn to_xpub(&mut self, topic: &[u8], payload: &mut Bytes, last_use: bool) -> SendOutcome {
        self.events.push(Event::Xpub {
            topic: topic.to_vec(),
            payload: send(payload, last_use),
            last_use,
        });
        SendOutcome::Sent
    }
}

/// A notice as libzmq's XPUB passes it up: 1 subscribe, 0 unsubscribe.
fn notice_of(first: u8, prefix: &[u8]) -> Vec<u8> {
    [&[first][..], prefix].concat()
}

enum Op {
    /// A notice from the XPUB socket, as libzmq passes it up.
    Notice(Vec<u8>),
    /// `[SUB|UNSUB, prefix, text]` from a DEALER.
    Command {
        dealer: usize,
        subscribe: bool,
        prefix: Vec<u8>,
    },
    Publish(Vec<u8>),
    /// `open_xpub_front`, idempotent once open.
    Open,
}

impl Op {
    fn read(input: &mut Input) -> Op {
        match input.byte() % 8 {
            0 | 1 => Op::Notice(notice_of(1, &input.text(&ALPHABET, 3))),
            2 => Op::Notice(notice_of(0, &input.text(&ALPHABET, 3))),
            // Raw bytes: empty, a first byte of 2 or more, or a notice with
            // bytes the alphabet lacks.
            3 => Op::Notice(input.frame().to_vec()),
            op @ (4 | 5) => Op::Command {
                dealer: usize::from(input.byte()) % DEALERS.len(),
                subscribe: op == 4,
                prefix: input.text(&ALPHABET, 3),
            },
            6 => Op::Publish(input.text(&ALPHABET, 4)),
            _ => Op::Open,
        }
    }
}

/// The reply a DEALER's command is owed.
#[derive(Debug, PartialEq)]
enum Answer {
    Ok,
    Err(&'static [u8]),
}

/// What the broker must hold and must have counted.
#[derive(Default)]
struct Model {
    max_filter_len: usize,
    max_filters_total: usize,
    max_per_subscriber: usize,
    max_index_bytes: usize,
    open: bool,
    /// SUB sockets' subscriptions per prefix; never zero.
    counts: BTreeMap<Vec<u8>, u32>,
    dealers: [BTreeSet<Vec<u8>>; DEALERS.len()],
    /// Last seq routed to each DEALER.
    seqs: [u64; DEALERS.len()],
    subscribes: u64,
    unsubscribes: u64,
    unknown_unsubscribes: u64,
    refused_notices: u64,
    malformed_notices: u64,
    xpub_delivered: u64,
    published: u64,
    unmatched: u64,
    malformed_publishes: u64,
    refused_limit: u64,
    malformed_commands: u64,
}

impl Model {
    /// (filter, subscriber) pairs in the index: the front's prefixes and
    /// the DEALERs' filters.
    fn pairs(&self) -> usize {
        self.counts.len() + self.dealers.iter().map(BTreeSet::len).sum::<usize>()
    }

    /// Applies a notice; `heap_bytes` is the index's just before.
    fn notice(&mut self, message: &[u8], heap_bytes: usize) -> NoticeOutcome {
        if !self.open {
            return NoticeOutcome::Malformed;
        }
        match message.split_first() {
            Some((1, prefix)) => {
                if let Some(count) = self.counts.get_mut(prefix) {
                    *count += 1;
                    self.subscribes += 1;
                    return NoticeOutcome::Counted { routed: true };
                }
                if prefix.len() > self.max_filter_len
                    || heap_bytes >= self.max_index_bytes
                    || self.pairs() >= self.max_filters_total
                {
                    self.refused_notices += 1;
                    return NoticeOutcome::Refused(String::new());
                }
                self.counts.insert(prefix.to_vec(), 1);
                self.subscribes += 1;
                NoticeOutcome::Counted { routed: true }
            }
            Some((0, prefix)) => match self.counts.get_mut(prefix) {
                None => {
                    self.unknown_unsubscribes += 1;
                    NoticeOutcome::NotSubscribed
                }
                Some(count) => {
                    *count -= 1;
                    self.unsubscribes += 1;
                    let routed = *count > 0;
                    if !routed {
                        self.counts.remove(prefix);
                    }
                    NoticeOutcome::Counted { routed }
                }
            },
            _ => {
                self.malformed_notices += 1;
                NoticeOutcome::Malformed
            }
        }
    }

    /// Applies a DEALER's command; `heap_bytes` is the index's just before.
    fn command(
        &mut self,
        dealer: usize,
        subscribe: bool,
        prefix: &[u8],
        heap_bytes: usize,
    ) -> Answer {
        if prefix.len() > self.max_filter_len {
            self.malformed_commands += 1;
            return Answer::Err(b"bad-filter");
        }
        let pairs = self.pairs();
        let held = &mut self.dealers[dealer];
        if !subscribe {
            return if held.remove(prefix) {
                Answer::Ok
            } else {
                Answer::Err(b"not-subscribed")
            };
        }
        if held.contains(prefix) {
            return Answer::Ok;
        }
        if held.len() >= self.max_per_subscriber
            || heap_bytes >= self.max_index_bytes
            || pairs >= self.max_filters_total
        {
            self.refused_limit += 1;
            return Answer::Err(b"limit");
        }
        held.insert(prefix.to_vec());
        Answer::Ok
    }
}

fn outcome_matches(got: &NoticeOutcome, want: &NoticeOutcome) -> bool {
    match (got, want) {
        (NoticeOutcome::Refused(why), NoticeOutcome::Refused(_)) => !why.is_empty(),
        _ => got == want,
    }
}

fn show(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

/// Sends a notice and checks its outcome against the model's.
fn notice(broker: &mut Broker<Bytes>, model: &mut Model, message: &[u8], now: Instant) {
    let want = model.notice(message, broker.index_heap_bytes());
    let got = broker.on_xpub_notice(message, now);
    assert!(
        outcome_matches(&got, &want),
        "notice {message:?}: got {got:?}, the model says {want:?} (counts {:?})",
        model.counts
    );
}

/// Sends a DEALER's command and checks its one reply.
fn command(
    broker: &mut Broker<Bytes>,
    model: &mut Model,
    wire: &mut Wire,
    (dealer, subscribe, prefix): (usize, bool, &[u8]),
    now: Instant,
) {
    let want = model.command(dealer, subscribe, prefix, broker.index_heap_bytes());
    let verb: &[u8] = if subscribe { b"SUB" } else { b"UNSUB" };
    broker.on_command(
        DEALERS[dealer],
        None,
        &[verb, b"prefix", prefix],
        3,
        now,
        wire,
    );
    let events = std::mem::take(&mut wire.events);
    let [Event::Reply { dealer: to, frames }] = &events[..] else {
        panic!("{verb:?} {} from {dealer}: sent {events:?}", show(prefix));
    };
    assert_eq!(*to, dealer, "the reply went to another DEALER");
    let parts: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    let ok = match &want {
        Answer::Ok => parts == [b"OK", verb, b"prefix", prefix],
        Answer::Err(code) => matches!(parts[..], [b"ERR", word, _] if word == *code),
    };
    assert!(
        ok,
        "{verb:?} {} from {dealer}: replied {:?}, the model says {want:?}",
        show(prefix),
        parts.iter().map(|p| show(p)).collect::<Vec<_>>()
    );
}

/// Publishes `topic` and checks who got it.
fn publish(
    broker: &mut Broker<Bytes>,
    model: &mut Model,
    wire: &mut Wire,
    topic: &[u8],
    now: Instant,
) {
    // A payload of its own per message, so a delivery of another shows.
    let payload = (model.published + model.malformed_publishes)
        .to_le_bytes()
        .to_vec();
    let mut frames = [Bytes(Rc::from(topic)), Bytes(Rc::from(&payload[..]))];
    let routed = broker.on_publish(None, &mut frames, 2, now, wire);
    let events = std::mem::take(&mut wire.events);
    if topic.is_empty() {
        model.malformed_publishes += 1;
        assert_eq!(routed, Err(PublishError::EmptyTopic));
        assert!(events.is_empty(), "an empty topic went out: {events:?}");
        return;
    }
    model.published += 1;
    let dealers: Vec<usize> = (0..DEALERS.len())
        .filter(|&d| model.dealers[d].iter().any(|p| topic.starts_with(p)))
        .collect();
    let xpub = model.open && model.counts.keys().any(|p| topic.starts_with(p));
    assert_eq!(
        routed,
        Ok(dealers.len() + usize::from(xpub)),
        "receivers of {}",
        show(topic)
    );
    if !xpub && dealers.is_empty() {
        model.unmatched += 1;
    }
    let mut to_xpub = 0;
    let mut delivered = Vec::new();
    for event in &events {
        match event {
            Event::Xpub {
                topic: t,
                payload: p,
                last_use,
            } => {
                to_xpub += 1;
                assert_eq!((t, p), (&topic.to_vec(), &payload), "to_xpub's parts");
                assert_eq!(
                    *last_use,
                    dealers.is_empty(),
                    "to_xpub's last_use for {} with DEALERs {dealers:?}",
                    show(topic)
                );
                model.xpub_delivered += 1;
            }
            Event::Deliver {
                dealer,
                seq,
                topic: t,
                payload: p,
                last_use,
            } => {
                assert_eq!((t, p), (&topic.to_vec(), &payload), "delivery's parts");
                delivered.push((*dealer, *seq, *last_use));
            }
            Event::Reply { .. } => panic!("a reply during a publish: {events:?}"),
        }
    }
    assert_eq!(
        to_xpub,
        usize::from(xpub),
        "to_xpub calls for {} with prefixes {:?}",
        show(topic),
        model.counts.keys().map(|p| show(p)).collect::<Vec<_>>()
    );
    let mut got: Vec<usize> = delivered.iter().map(|&(d, _, _)| d).collect();
    got.sort_unstable();
    assert_eq!(got, dealers, "DEALERs that got {}", show(topic));
    for (at, &(dealer, seq, last_use)) in delivered.iter().enumerate() {
        model.seqs[dealer] += 1;
        assert_eq!(seq, model.seqs[dealer], "DEALER {dealer}'s seq");
        assert_eq!(last_use, at + 1 == delivered.len(), "last_use at {at}");
    }
}

fn check_state(broker: &Broker<Bytes>, model: &Model) {
    assert_eq!(
        broker.xpub_prefixes(),
        model.counts.len(),
        "xpub_prefixes()"
    );
    assert_eq!(broker.subscription_count(), model.pairs(), "subscriptions");
    let c = broker.counters();
    let got = [
        c.xpub_subscribes,
        c.xpub_unsubscribes,
        c.xpub_unknown_unsubscribes,
        c.xpub_refused_notices,
        c.xpub_malformed_notices,
        c.xpub_delivered,
        c.xpub_dropped,
        c.published,
        c.unmatched,
        c.malformed_publishes,
        c.refused_limit,
        c.malformed_commands,
    ];
    let want = [
        model.subscribes,
        model.unsubscribes,
        model.unknown_unsubscribes,
        model.refused_notices,
        model.malformed_notices,
        model.xpub_delivered,
        0,
        model.published,
        model.unmatched,
        model.malformed_publishes,
        model.refused_limit,
        model.malformed_commands,
    ];
    assert_eq!(
        got, want,
        "counters: xpub subscribes, unsubscribes, unknown unsubscribes, refused, \
         malformed, delivered, dropped; published, unmatched, malformed \
         publishes, refused_limit, malformed_commands"
    );
    assert_eq!(
        broker.snapshot().xpub_prefixes,
        model.counts.len() as u64,
        "the snapshot's xpub_prefixes"
    );
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let (lens, totals, flags) = (input.byte(), input.byte(), input.byte());
    let mut model = Model {
        max_filter_len: usize::from(lens % 8),
        max_filters_total: usize::from(totals & 0x0f),
        max_per_subscriber: 1 + usize::from(totals >> 4),
        max_index_bytes: INDEX_BYTES[usize::from(flags & 7)],
        ..Model::default()
    };
    let mut config = BrokerConfig::default();
    config.limits.max_filter_len = model.max_filter_len;
    config.limits.max_filters_total = model.max_filters_total;
    config.limits.max_filters_per_subscriber = model.max_per_subscriber;
    config.limits.max_index_bytes = model.max_index_bytes;
    // The command rate is broker_session's business; here a bucket no
    // input can empty keeps the model to the limits alone.
    config.limits.max_commands_per_sec = u32::MAX;
    let now = Instant::now();
    let mut broker: Broker<Bytes> = Broker::new(config, now);
    let mut wire = Wire::default();
    if flags & 0x80 == 0 {
        broker.open_xpub_front();
        model.open = true;
    }

    while !input.is_empty() {
        match Op::read(&mut input) {
            Op::Notice(message) => notice(&mut broker, &mut model, &message, now),
            Op::Command {
                dealer,
                subscribe,
                prefix,
            } => command(
                &mut broker,
                &mut model,
                &mut wire,
                (dealer, subscribe, &prefix),
                now,
            ),
            Op::Publish(topic) => publish(&mut broker, &mut model, &mut wire, &topic, now),
            Op::Open => {
                broker.open_xpub_front();
                model.open = true;
            }
        }
        assert!(wire.events.is_empty(), "unchecked sends: {:?}", wire.events);
        check_state(&broker, &model);
    }

    // Every SUB goes: each count is given back, the last notice unroutes.
    for (prefix, count) in model.counts.clone() {
        let message = notice_of(0, &prefix);
        for _ in 0..count {
            notice(&mut broker, &mut model, &message, now);
        }
        notice(&mut broker, &mut model, &message, now);
    }
    check_state(&broker, &model);
    assert_eq!(broker.xpub_prefixes(), 0);
    assert_eq!(broker.subscription_count(), model.pairs());
    for dealer in 0..DEALERS.len() {
        for prefix in model.dealers[dealer].clone() {
            command(
                &mut broker,
                &mut model,
                &mut wire,
                (dealer, false, &prefix),
                now,
            );
        }
    }
    check_state(&broker, &model);
    assert_eq!(broker.subscription_count(), 0, "pairs left at the end");
    assert_eq!(
        broker.index_heap_bytes(),
        RoutingIndex::new().heap_bytes(),
        "heap bytes left behind"
    );
    publish(&mut broker, &mut model, &mut wire, b"a.b", now);
    check_state(&broker, &model);
});
