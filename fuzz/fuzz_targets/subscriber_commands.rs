#![no_main]
//! `subscriber_commands`: arbitrary multipart messages on the subscriber
//! endpoint.
//!
//! Subscribers are untrusted, and PROTOCOL.md promises every command an
//! answer, in order, with a documented error code; clients match replies to
//! commands by position, so a missing or extra reply desynchronises them for
//! good. Every message goes into `protocol::parse_command` and into
//! `Broker::on_command`, called as the server calls it (at most three frames
//! after the routing id, plus the true frame count), with small limits so
//! that `limit` refusals are common. Checked:
//! - nothing panics;
//! - `parse_command` agrees with the grammar in PROTOCOL.md, re-implemented
//!   here, down to the `CommandError` variant, and `CommandError::code`
//!   maps each variant to the documented code;
//! - every `on_command` produces exactly one reply, to the sender, nothing
//!   else, and that reply is the one a small model of each routing id's
//!   filters predicts: `[OK, verb, kind, filter]` echoing the command,
//!   `[PONG]`, or `[ERR, code, text]` with the predicted code (one of the
//!   protocol's words) and UTF-8 text;
//! - `protocol::parse_reply` reads every reply back as what it is;
//! - the broker's counts of subscribers and subscriptions match the model.
//!
//! Input: byte 0 `max_filter_len` (`% 40`), byte 1 the subscriber and filter
//! limits; then messages until the input ends, each a routing-id byte (one of
//! four ids), a frame-count byte (`% 6`) and that many length-prefixed
//! frames.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::Instant;

use common::Input;
use libfuzzer_sys::fuzz_target;
use zbroker_core::broker::{Broker, SendOutcome, Transport};
use zbroker_core::config::BrokerConfig;
use zbroker_core::filter::{Filter, FilterError, FilterKind};
use zbroker_core::protocol::{self, Command, CommandError, ErrorCode, Reply};

type Bytes = Rc<[u8]>;

const ROUTING_IDS: [&[u8]; 4] = [b"\x00k\x8b\x45\x67", b"r1", b"r2", b"r3"];

#[derive(Default)]
struct Recorder {
    replies: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
    deliveries: usize,
}

impl Transport<Bytes> for Recorder {
    fn deliver(&mut self, _: &[u8], _: u64, _: &[u8], _: &mut Bytes, _: bool) -> SendOutcome {
        self.deliveries += 1;
        SendOutcome::Sent
    }

    fn reply(&mut self, to: &[u8], frames: &[&[u8]]) -> SendOutcome {
        self.replies
            .push((to.to_vec(), frames.iter().map(|f| f.to_vec()).collect()));
        SendOutcome::Sent
    }
}

/// The command grammar of PROTOCOL.md, written without looking at
/// `parse_command`'s structure: verb, then frame count, then kind, then the
/// filter rules (too long, empty exact/pattern, `>` only as last segment).
fn spec_parse(frames: &[&[u8]], max_filter_len: usize) -> Result<Command, CommandError> {
    let (verb, arity): (&'static str, usize) = match frames.first() {
        None => return Err(CommandError::Empty),
        Some(&b"SUB") => ("SUB", 3),
        Some(&b"UNSUB") => ("UNSUB", 3),
        Some(&b"PING") => ("PING", 1),
        Some(_) => return Err(CommandError::UnknownVerb),
    };
    if frames.len() != arity {
        return Err(CommandError::FrameCount {
            verb,
            expected: arity,
            got: frames.len(),
        });
    }
    if verb == "PING" {
        return Ok(Command::Ping);
    }
    let kind = match frames[1] {
        b"exact" => FilterKind::Exact,
        b"prefix" => FilterKind::Prefix,
        b"pattern" => FilterKind::Pattern,
        _ => return Err(CommandError::UnknownKind),
    };
    let text = frames[2];
    let invalid = if text.len() > max_filter_len {
        Some(FilterError::TooLong {
            len: text.len(),
            max: max_filter_len,
        })
    } else if text.is_empty() && kind != FilterKind::Prefix {
        Some(FilterError::Empty(kind))
    } else if kind == FilterKind::Pattern && {
        let segments: Vec<&[u8]> = text.split(|&b| b == b'.').collect();
        segments[..segments.len() - 1].contains(&&b">"[..])
    } {
        Some(FilterError::TailNotLast)
    } else {
        None
    };
    if let Some(e) = invalid {
        return Err(CommandError::Filter(e));
    }
    let filter = Filter::new(kind, text, max_filter_len).expect("the spec accepts this filter");
    Ok(if verb == "SUB" {
        Command::Subscribe(filter)
    } else {
        Command::Unsubscribe(filter)
    })
}

/// The code PROTOCOL.md's table gives each refusal.
fn documented_code(e: &CommandError) -> ErrorCode {
    match e {
        CommandError::Filter(_) => ErrorCode::BadFilter,
        CommandError::Empty
        | CommandError::UnknownVerb
        | CommandError::FrameCount { .. }
        | CommandError::UnknownKind
        | CommandError::TooManyFrames(_) => ErrorCode::BadCommand,
    }
}

/// The reply the model predicts.
#[derive(Debug, PartialEq)]
enum Expected {
    Ok { subscribe: bool, filter: Filter },
    Pong,
    Err(ErrorCode),
}

struct Model {
    max_subscribers: usize,
    max_per_subscriber: usize,
    max_total: usize,
    /// Filters per tracked routing id; a routing id is tracked from its
    /// first valid command on (nothing in this target ever forgets one).
    filters: BTreeMap<usize, BTreeSet<Filter>>,
}

impl Model {
    fn total(&self) -> usize {
        self.filters.values().map(BTreeSet::len).sum()
    }

    fn apply(&mut self, who: usize, command: Result<Command, CommandError>) -> Expected {
        let command = match command {
            Ok(command) => command,
            Err(e) => return Expected::Err(documented_code(&e)),
        };
        if !self.filters.contains_key(&who) {
            if self.filters.len() >= self.max_subscribers {
                return Expected::Err(ErrorCode::Limit);
            }
            self.filters.insert(who, BTreeSet::new());
        }
        let total = self.total();
        let held = self.filters.get_mut(&who).expect("tracked above");
        match command {
            Command::Ping => Expected::Pong,
            Command::Subscribe(filter) => {
                // The target runs with the default pattern segment limit.
                let max_segments = zbroker_core::config::Limits::default().max_pattern_segments;
                if !held.contains(&filter)
                    && (held.len() >= self.max_per_subscriber
                        || filter.pattern_segments() > max_segments
                        || total >= self.max_total)
                {
                    return Expected::Err(ErrorCode::Limit);
                }
                held.insert(filter.clone());
                Expected::Ok {
                    subscribe: true,
                    filter,
                }
            }
            Command::Unsubscribe(filter) => {
                if held.remove(&filter) {
                    Expected::Ok {
                        subscribe: false,
                        filter,
                    }
                } else {
                    Expected::Err(ErrorCode::NotSubscribed)
                }
            }
        }
    }
}

fn check_reply(frames: &[Vec<u8>], want: &Expected) {
    let parts: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    let decoded = protocol::parse_reply(&parts);
    match want {
        Expected::Pong => {
            assert_eq!(parts, [b"PONG"]);
            assert_eq!(decoded, Some(Reply::Pong));
        }
        Expected::Ok { subscribe, filter } => {
            let verb: &[u8] = if *subscribe { b"SUB" } else { b"UNSUB" };
            assert_eq!(
                parts,
                [b"OK", verb, filter.kind().as_bytes(), filter.text()],
                "OK must echo the command"
            );
            assert_eq!(
                decoded,
                Some(Reply::Ok {
                    subscribe: *subscribe,
                    kind: filter.kind(),
                    filter: filter.text(),
                })
            );
        }
        Expected::Err(code) => {
            let [err, word, text] = parts[..] else {
                panic!("an ERR reply has three frames: {parts:?}");
            };
            assert_eq!(err, b"ERR");
            assert_eq!(
                ErrorCode::from_bytes(word),
                Some(*code),
                "ERR code {:?}",
                String::from_utf8_lossy(word)
            );
            let text = std::str::from_utf8(text).expect("ERR text is UTF-8");
            assert!(!text.is_empty(), "ERR text explains the refusal");
            assert_eq!(
                decoded,
                Some(Reply::Err {
                    code: word,
                    text: text.as_bytes()
                })
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let max_filter_len = input.byte() as usize % 40;
    let limits = input.byte() as usize;
    let mut model = Model {
        max_subscribers: 1 + limits % 3,
        max_per_subscriber: 1 + (limits >> 2) % 4,
        max_total: 1 + (limits >> 4) % 8,
        filters: BTreeMap::new(),
    };
    let mut config = BrokerConfig::default();
    config.limits.max_filter_len = max_filter_len;
    config.limits.max_subscribers = model.max_subscribers;
    config.limits.max_filters_per_subscriber = model.max_per_subscriber;
    config.limits.max_filters_total = model.max_total;
    // The command rate is broker_session's business; here a bucket no
    // input can empty keeps the model to the protocol alone.
    config.limits.max_commands_per_sec = u32::MAX;
    let now = Instant::now();
    let mut broker: Broker<Bytes> = Broker::new(config, now);
    let mut out = Recorder::default();

    while !input.is_empty() {
        let who = input.byte() as usize % ROUTING_IDS.len();
        let count = input.byte() as usize % 6;
        let frames: Vec<&[u8]> = (0..count).map(|_| input.frame()).collect();

        // The decoder never sees more than the three frames the server
        // keeps; longer messages are refused before it is called.
        let spec = if count > 3 {
            Err(CommandError::TooManyFrames(count))
        } else {
            let spec = spec_parse(&frames, max_filter_len);
            assert_eq!(
                protocol::parse_command(&frames, max_filter_len),
                spec,
                "parse_command on {frames:?}"
            );
            spec
        };
        if let Err(e) = &spec {
            assert_eq!(e.code(), documented_code(e), "code of {e:?}");
            let _ = e.to_string();
        }

        let want = model.apply(who, spec);
        let kept = &frames[..count.min(3)];
        out.replies.clear();
        broker.on_command(ROUTING_IDS[who], None, kept, count, now, &mut out);
        let [(to, reply)] = &out.replies[..] else {
            panic!(
                "{frames:?} got {} replies, not exactly one",
                out.replies.len()
            );
        };
        assert_eq!(to, ROUTING_IDS[who], "the reply goes to the sender");
        check_reply(reply, &want);
        assert_eq!(out.deliveries, 0, "commands publish nothing");
        assert_eq!(broker.subscriber_count(), model.filters.len());
        assert_eq!(broker.subscription_count(), model.total());
    }
});
