#![no_main]
//! `routing_model`: differential fuzzing of the routing index against the
//! brute-force definition.
//!
//! `RoutingIndex` is the broker's hot path and its most intricate code (a
//! path-compressed radix tree that splits and merges, a segment trie with
//! wildcard branches, per-call dedup stamps), while `Filter::matches` is the
//! specification in a few obvious lines. A sequence of subscribe,
//! unsubscribe, publish and disconnect (drop all of one subscriber's
//! filters) operations runs on both the index and a model, the set of
//! (filter, subscriber) pairs. Topics and filters are glued from a tiny
//! alphabet (`a`, `b`, `ab`, `.`, `*`, `>`, `a.b`) so that shared prefixes,
//! edge splits, empty segments and wildcards are the norm. Checked:
//! - `insert`/`remove` report exactly whether the model gained/lost a pair;
//! - after every publish, `matches` reports exactly the subscribers with a
//!   filter for which `Filter::matches(topic)` holds, each once;
//! - `len()` equals the model's pair count after every operation;
//! - whenever the model is empty (mid-run and after removing everything at
//!   the end), `node_count()` and `heap_bytes()` equal a fresh index's, and
//!   the match cache is empty, so removal really frees and re-merges what
//!   insertion built.
//!
//! Long texts come in too: up to 256 segments cycling through a short
//! period of `a`, `b`, `ab`, `*`, empty and `>` segments, with one segment
//! twisted, so that deep pattern tries, long edge labels split at any
//! segment, chains of `*` and forks at every depth (and the match cache,
//! which only costly walks fill) meet topics that follow them almost all the
//! way.
//!
//! Input: a sequence of operations until the input ends, each an opcode byte
//! and its arguments (see `Op::read`). With bit 6 (0x40) set, subscribe,
//! unsubscribe-a-pair and publish read a long text (see `long_text`)
//! instead of one glued from `PIECES`.

mod common;

use std::collections::BTreeSet;

use common::{Input, PIECES};
use libfuzzer_sys::fuzz_target;
use zbroker_core::filter::{Filter, FilterKind};
use zbroker_core::index::{RoutingIndex, SubId};

/// Subscriber ids are dense slots in the broker, so a handful of small ones
/// is both realistic and collision-rich.
const SUBS: u8 = 6;
const MAX_FILTER_LEN: usize = 64;
/// Room for long texts: 256 segments of up to `ab` and a separator each.
const MAX_LONG_FILTER_LEN: usize = 1024;

/// Segments of long texts, by input byte modulo their number; `*` often.
const LONG_SEGMENTS: [&[u8]; 8] = [b"a", b"*", b"b", b"*", b"ab", b"", b"a", b">"];

/// A long text: a segment count byte (plus one), a period byte (`% 4`,
/// plus one) and that many segment choices (see `LONG_SEGMENTS`), then a
/// position byte (`% count`) and a segment choice that overrides the period
/// there.
fn long_text(input: &mut Input) -> Vec<u8> {
    let count = 1 + usize::from(input.byte());
    let period: Vec<u8> = (0..1 + input.byte() % 4).map(|_| input.byte()).collect();
    let (twist, twisted) = (usize::from(input.byte()) % count, input.byte());
    let mut text = Vec::new();
    for at in 0..count {
        if at > 0 {
            text.push(b'.');
        }
        let choice = if at == twist {
            twisted
        } else {
            period[at % period.len()]
        };
        text.extend_from_slice(LONG_SEGMENTS[usize::from(choice) % LONG_SEGMENTS.len()]);
    }
    text
}

enum Op {
    Subscribe(Filter, SubId),
    /// Removes a pair: `Ok(i)` the i-th held pair (mod count), `Err` any pair,
    /// usually one not held.
    Unsubscribe(Result<usize, (Filter, SubId)>),
    Publish(Vec<u8>),
    Disconnect(SubId),
}

impl Op {
    /// `None` for a filter `Filter::new` refuses: the index never sees those.
    fn read(input: &mut Input) -> Option<Op> {
        let op = input.byte();
        let long = op & 0x40 != 0;
        Some(match op % 8 {
            0..=2 => {
                let (f, sub) = Self::pair(input, long)?;
                Op::Subscribe(f, sub)
            }
            3 => Op::Unsubscribe(Ok(input.byte() as usize)),
            4 => Op::Unsubscribe(Err(Self::pair(input, long)?)),
            5 | 6 if long => Op::Publish(long_text(input)),
            5 | 6 => Op::Publish(input.text(&PIECES, 7)),
            _ => {
                // Raw topic bytes now and then, for what the alphabet misses.
                if op & 0x80 != 0 {
                    Op::Publish(input.frame().to_vec())
                } else {
                    Op::Disconnect((input.byte() % SUBS) as SubId)
                }
            }
        })
    }

    fn pair(input: &mut Input, long: bool) -> Option<(Filter, SubId)> {
        let spec = input.byte();
        let kind = FilterKind::ALL[spec as usize % 3];
        let sub = ((spec / 3) % SUBS) as SubId;
        if long {
            let text = long_text(input);
            return Some((Filter::new(kind, &text, MAX_LONG_FILTER_LEN).ok()?, sub));
        }
        let text = input.text(&PIECES, 6);
        Some((Filter::new(kind, &text, MAX_FILTER_LEN).ok()?, sub))
    }
}

fn check_matches(index: &mut RoutingIndex, model: &BTreeSet<(Filter, SubId)>, topic: &[u8]) {
    let mut out = Vec::new();
    index.matches(topic, &mut out);
    let got: BTreeSet<SubId> = out.iter().copied().collect();
    assert_eq!(
        got.len(),
        out.len(),
        "a subscriber reported twice for {:?}: {out:?}",
        String::from_utf8_lossy(topic)
    );
    let want: BTreeSet<SubId> = model
        .iter()
        .filter(|(f, _)| f.matches(topic))
        .map(|&(_, sub)| sub)
        .collect();
    assert_eq!(
        got,
        want,
        "receivers of {:?} with pairs {model:?}",
        String::from_utf8_lossy(topic)
    );
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
                assert_eq!(index.insert(&f, sub), added, "insert {f} for {sub}");
            }
            Op::Unsubscribe(which) => {
                let pair = match which {
                    Ok(_) if model.is_empty() => continue,
                    Ok(i) => model
                        .iter()
                        .nth(i % model.len())
                        .cloned()
                        .expect("in range"),
                    Err(pair) => pair,
                };
                let held = model.remove(&pair);
                let (f, sub) = pair;
                assert_eq!(index.remove(&f, sub), held, "remove {f} for {sub}");
            }
            Op::Publish(topic) => check_matches(&mut index, &model, &topic),
            Op::Disconnect(sub) => {
                let gone: Vec<(Filter, SubId)> =
                    model.iter().filter(|(_, s)| *s == sub).cloned().collect();
                for pair in gone {
                    assert!(
                        index.remove(&pair.0, sub),
                        "remove held {} for {sub}",
                        pair.0
                    );
                    model.remove(&pair);
                }
            }
        }
        assert_eq!(index.len(), model.len(), "len() after an operation");
        if model.is_empty() {
            common::assert_drained(&index);
        }
    }
    for (f, sub) in std::mem::take(&mut model) {
        assert!(index.remove(&f, sub), "final remove {f} for {sub}");
    }
    if model.is_empty() {
        common::assert_drained(&index);
    }
    check_matches(&mut index, &model, b"a.b");
});
