#![no_main]
//! `index_limits`: pattern filters at the broker's limits, inserted and
//! removed in any order, against the brute-force definition.
//!
//! The pattern trie compresses chains of segments into edge labels, splits
//! them where patterns diverge, merges them back on removal, removes and
//! drops without recursion, and caches the pattern part of costly matches.
//! All of that is at its most intricate for long patterns: up to 1024
//! segments (the broker's hard cap on `--max-pattern-segments`) and 64 KiB
//! (its upper bound on filter and topic length), full of `*`, with a `>`
//! now and then, sharing long runs with one another. `routing_model` covers
//! the small alphabet and the other kinds; this target builds such patterns
//! from a few input bytes and checks, after every operation:
//! - `insert`/`remove` report exactly whether the model gained/lost a pair;
//! - every publish reports exactly the subscribers with a pattern for which
//!   `Filter::matches(topic)` holds, each once, whether the match cache
//!   answered or not (topics are often derived from a held pattern, so
//!   hits and near misses, the costly walks that get cached, are common);
//! - memory follows the patterns' bytes, not their segments: at most two
//!   nodes per distinct pattern, and heap bytes within a small multiple of
//!   the distinct patterns' bytes;
//! - the match cache holds at most `MATCH_CACHE_CAPACITY` topics and about
//!   1 MiB;
//! - whenever the model is empty, and after removing everything at the end,
//!   the index is back to `node_count() == 2`, `heap_bytes() == 0`, and an
//!   empty, freed match cache.
//!
//! Input: operations until the input ends, each an opcode byte (`% 8`) and
//! its arguments (see `Op::read`). A pattern or topic is a `Shape`: a 16-bit
//! little-endian segment count (`% 1024`, plus 1), a byte giving the width
//! of the wide literal segment (`% 64`, plus 1), a byte giving the period
//! (`% 4`, plus 1) and that many segment choices (see `SEGMENTS`), a byte
//! giving the number of twists (`% 4`), each a 16-bit little-endian position
//! and a segment choice that overrides the period there, and a flags byte
//! (bit 0: append a final `>`).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::Input;
use libfuzzer_sys::fuzz_target;
use zbroker_core::filter::{Filter, FilterKind};
use zbroker_core::index::{MATCH_CACHE_CAPACITY, RoutingIndex, SubId};

/// Dense, collision-rich subscriber ids, as in the broker.
const SUBS: u8 = 8;
/// The broker's hard cap on pattern segments.
const MAX_SEGMENTS: usize = 1024;
/// The broker's upper bound on filter and topic length.
const MAX_LEN: usize = 64 << 10;
/// The wide literal segment is this byte repeated.
const WIDE: u8 = b'w';

/// Segment choices, by input byte modulo their number: `None` is the wide
/// literal. In a topic, `*` and `>` are plain literals.
const SEGMENTS: [Option<&[u8]>; 8] = [
    Some(b"a"),
    Some(b"*"),
    None,
    Some(b"a"),
    Some(b"*"),
    Some(b"b"),
    Some(b""),
    Some(b">"),
];

/// A text built from a few bytes: `segments` segments cycling through
/// `period`, with `twists` overriding single positions.
struct Shape {
    segments: usize,
    wide: usize,
    period: Vec<u8>,
    twists: Vec<(usize, u8)>,
    tail: bool,
}

impl Shape {
    fn read(input: &mut Input) -> Shape {
        let segments =
            1 + usize::from(u16::from_le_bytes([input.byte(), input.byte()])) % MAX_SEGMENTS;
        let wide = 1 + usize::from(input.byte()) % 64;
        let period = (0..1 + input.byte() % 4).map(|_| input.byte()).collect();
        let twists = (0..input.byte() % 4)
            .map(|_| {
                let at = usize::from(u16::from_le_bytes([input.byte(), input.byte()]));
                (at % segments, input.byte())
            })
            .collect();
        let tail = input.byte() & 1 != 0;
        Shape {
            segments,
            wide,
            period,
            twists,
            tail,
        }
    }

    fn segment(&self, choice: u8) -> Vec<u8> {
        match SEGMENTS[usize::from(choice) % SEGMENTS.len()] {
            Some(segment) => segment.to_vec(),
            None => vec![WIDE; self.wide],
        }
    }

    fn text(&self) -> Vec<u8> {
        let mut text = Vec::new();
        for at in 0..self.segments {
            let choice = self
                .twists
                .iter()
                .rev()
                .find(|&&(position, _)| position == at)
                .map_or(self.period[at % self.period.len()], |&(_, choice)| choice);
            if at > 0 {
                text.push(b'.');
            }
            text.extend(self.segment(choice));
        }
        if self.tail {
            text.extend_from_slice(b".>");
        }
        text
    }
}

enum Op {
    Subscribe(Filter, SubId),
    /// Removes the i-th held pair (mod count).
    UnsubscribeHeld(usize),
    /// Removes a pair of a fresh shape, usually one not held.
    Unsubscribe(Filter, SubId),
    Publish(Vec<u8>),
    /// Publishes a topic made from the i-th held pattern: each `*` replaced
    /// by a segment, a final `>` by one to three, then one segment changed
    /// if `mutate`.
    PublishNear {
        held: usize,
        fill: u8,
        extra: u8,
        mutate: Option<(usize, u8)>,
    },
    /// Removes every pair of one subscriber.
    Disconnect(SubId),
}

impl Op {
    /// `None` for a pattern `Filter::new` refuses: the index never sees it.
    fn read(input: &mut Input) -> Option<Op> {
        Some(match input.byte() % 8 {
            0..=2 => {
                let (f, sub) = Self::pair(input)?;
                Op::Subscribe(f, sub)
            }
            3 => Op::UnsubscribeHeld(usize::from(input.byte())),
            4 => {
                let (f, sub) = Self::pair(input)?;
                Op::Unsubscribe(f, sub)
            }
            5 => Op::Publish(Shape::read(input).text()),
            6 => {
                let held = usize::from(input.byte());
                let (fill, extra, change) = (input.byte(), input.byte(), input.byte());
                let mutate = (change & 1 != 0).then(|| {
                    let at = usize::from(u16::from_le_bytes([input.byte(), input.byte()]));
                    (at, change >> 1)
                });
                Op::PublishNear {
                    held,
                    fill,
                    extra,
                    mutate,
                }
            }
            _ => Op::Disconnect(SubId::from(input.byte() % SUBS)),
        })
    }

    fn pair(input: &mut Input) -> Option<(Filter, SubId)> {
        let sub = SubId::from(input.byte() % SUBS);
        let text = Shape::read(input).text();
        Some((Filter::new(FilterKind::Pattern, &text, MAX_LEN).ok()?, sub))
    }
}

/// A topic matched by `pattern`, or nearly: see `Op::PublishNear`.
fn near_topic(pattern: &[u8], fill: u8, extra: u8, mutate: Option<(usize, u8)>) -> Vec<u8> {
    let fills: [&[u8]; 4] = [b"a", b"b", b"x", b""];
    let mut segments: Vec<Vec<u8>> = Vec::new();
    for (at, segment) in pattern.split(|&b| b == b'.').enumerate() {
        match segment {
            b"*" => segments.push(fills[(usize::from(fill) + at) % fills.len()].to_vec()),
            b">" => {
                for n in 0..1 + usize::from(extra % 3) {
                    segments.push(fills[(usize::from(fill) + n) % fills.len()].to_vec());
                }
            }
            literal => segments.push(literal.to_vec()),
        }
    }
    if let Some((at, choice)) = mutate {
        let at = at % (segments.len() + 1);
        let replacement = fills[usize::from(choice) % fills.len()].to_vec();
        match at.checked_sub(segments.len()) {
            // One past the end: the topic grows by a segment.
            Some(_) => segments.push(replacement),
            None => segments[at] = replacement,
        }
    }
    segments.join(&b'.')
}

fn check_matches(index: &mut RoutingIndex, model: &BTreeSet<(Filter, SubId)>, topic: &[u8]) {
    let mut out = Vec::new();
    index.matches(topic, &mut out);
    let got: BTreeSet<SubId> = out.iter().copied().collect();
    assert_eq!(got.len(), out.len(), "a subscriber reported twice: {out:?}");
    let want: BTreeSet<SubId> = model
        .iter()
        .filter(|(f, _)| f.matches(topic))
        .map(|&(_, sub)| sub)
        .collect();
    assert_eq!(
        got,
        want,
        "receivers of a {}-byte topic starting {:?}",
        topic.len(),
        String::from_utf8_lossy(&topic[..topic.len().min(64)])
    );
}

/// Invariants that hold after every operation.
fn check_state(index: &RoutingIndex, model: &BTreeSet<(Filter, SubId)>) {
    assert_eq!(index.len(), model.len(), "len() after an operation");
    let mut distinct: BTreeMap<&[u8], ()> = BTreeMap::new();
    for (f, _) in model {
        distinct.insert(f.text(), ());
    }
    let bytes: usize = distinct.keys().map(|text| text.len()).sum();
    // At most one leaf and one branching node per distinct pattern (two
    // with the same text and a `>` apart share the node).
    assert!(
        index.node_count() <= 2 + 2 * distinct.len(),
        "{} nodes for {} distinct patterns",
        index.node_count(),
        distinct.len()
    );
    // Per distinct pattern: its bytes, two 120-byte nodes and a share of a
    // child table; per pair: a subscriber set's share. A per-segment cost
    // (hundreds of bytes per 2-byte segment) would be far past this.
    let bound = 2 * bytes + 512 * distinct.len() + 96 * model.len();
    assert!(
        index.heap_bytes() <= bound,
        "{} heap bytes for {} distinct patterns of {bytes} bytes and {} pairs",
        index.heap_bytes(),
        distinct.len(),
        model.len()
    );
    assert!(index.cache_len() <= MATCH_CACHE_CAPACITY);
    assert!(index.cache_heap_bytes() <= (MATCH_CACHE_CAPACITY << 12) + (32 << 10));
    if model.is_empty() {
        common::assert_drained(index);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut index = RoutingIndex::new();
    let mut model: BTreeSet<(Filter, SubId)> = BTreeSet::new();
    while !input.is_empty() {
        let Some(op) = Op::read(&mut input) else {
            continue;
        };
        match op {
            Op::Subscribe(f, sub) => {
                let added = model.insert((f.clone(), sub));
                assert_eq!(index.insert(&f, sub), added, "insert for {sub}");
            }
            Op::UnsubscribeHeld(i) => {
                if let Some(pair) = model.iter().nth(i % model.len().max(1)).cloned() {
                    assert!(index.remove(&pair.0, pair.1), "remove held for {}", pair.1);
                    model.remove(&pair);
                }
            }
            Op::Unsubscribe(f, sub) => {
                let held = model.remove(&(f.clone(), sub));
                assert_eq!(index.remove(&f, sub), held, "remove for {sub}");
            }
            Op::Publish(topic) => check_matches(&mut index, &model, &topic),
            Op::PublishNear {
                held,
                fill,
                extra,
                mutate,
            } => {
                let Some((f, _)) = model.iter().nth(held % model.len().max(1)) else {
                    continue;
                };
                let topic = near_topic(f.text(), fill, extra, mutate);
                check_matches(&mut index, &model, &topic);
                // Again: now the cache may answer.
                check_matches(&mut index, &model, &topic);
            }
            Op::Disconnect(sub) => {
                let gone: Vec<(Filter, SubId)> =
                    model.iter().filter(|(_, s)| *s == sub).cloned().collect();
                for pair in gone {
                    assert!(index.remove(&pair.0, sub), "remove held for {sub}");
                    model.remove(&pair);
                }
            }
        }
        check_state(&index, &model);
    }
    for (f, sub) in std::mem::take(&mut model) {
        assert!(index.remove(&f, sub), "final remove for {sub}");
    }
    check_state(&index, &model);
});
