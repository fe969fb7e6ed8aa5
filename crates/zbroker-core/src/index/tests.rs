//! Tests of the index through its public operations, checked against
//! [`Filter::matches`] and by [`audit::audit`], which checks every
//! structure's invariants and recounts what the index keeps running totals
//! of. Helpers shared by every test module live here.

mod audit;
mod cache;
mod exact_and_prefix;
mod pattern;
mod subscriber_set;

use std::collections::BTreeSet;

use crate::filter::{Filter, FilterKind};
use crate::index::cache::CACHE_MIN_STEPS;
use crate::index::{RoutingIndex, SubId};
use audit::{assert_baseline, audit};

fn filter(kind: FilterKind, text: &str) -> Filter {
    Filter::new(kind, text.as_bytes(), 4096).unwrap()
}

fn exact(text: &str) -> Filter {
    filter(FilterKind::Exact, text)
}

fn prefix(text: &str) -> Filter {
    filter(FilterKind::Prefix, text)
}

fn pattern(text: &str) -> Filter {
    filter(FilterKind::Pattern, text)
}

fn matched(index: &mut RoutingIndex, topic: &str) -> Vec<SubId> {
    let mut out = Vec::new();
    index.matches(topic.as_bytes(), &mut out);
    let len = out.len();
    out.sort_unstable();
    out.dedup();
    assert_eq!(
        out.len(),
        len,
        "a subscriber was reported twice for {topic:?}"
    );
    out
}

/// xorshift64*: deterministic, no dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

fn random_text(rng: &mut Rng, tokens: &[&str], max_tokens: usize) -> String {
    let n = rng.below(max_tokens + 1);
    (0..n).map(|_| rng.pick(tokens)).collect()
}

/// Pushes the pair unless present; true if it was a duplicate.
fn index_insert_unique(pairs: &mut Vec<(Filter, SubId)>, f: Filter, sub: SubId) -> bool {
    if pairs.iter().any(|(g, s)| *g == f && *s == sub) {
        return true;
    }
    pairs.push((f, sub));
    false
}

fn differential(seed: u64, operations: usize) {
    differential_with(seed, operations, CACHE_MIN_STEPS);
}

fn differential_with(seed: u64, operations: usize, cache_min_steps: usize) {
    let mut rng = Rng(seed);
    let tokens = ["a", "b", "ab", ".", ".", "*", ">"];
    let mut index = RoutingIndex::new();
    index.cache_min_steps = cache_min_steps;
    let mut model: BTreeSet<(Filter, SubId)> = BTreeSet::new();
    let mut out = Vec::new();
    let mut stats = [0usize; 4];
    for _ in 0..operations {
        match rng.below(10) {
            0..=3 => {
                let kind = FilterKind::ALL[rng.below(3)];
                let text = random_text(&mut rng, &tokens, 5);
                let Ok(f) = Filter::new(kind, text.as_bytes(), 64) else {
                    continue;
                };
                let sub = rng.below(12) as SubId;
                let added = model.insert((f.clone(), sub));
                assert_eq!(index.insert(&f, sub), added, "insert {f} for {sub}");
                stats[0] += added as usize;
            }
            4..=6 => {
                // Mostly pairs that are present, sometimes random ones.
                let pair = if !model.is_empty() && rng.below(4) != 0 {
                    model.iter().nth(rng.below(model.len())).cloned()
                } else {
                    let kind = FilterKind::ALL[rng.below(3)];
                    let text = random_text(&mut rng, &tokens, 5);
                    Filter::new(kind, text.as_bytes(), 64)
                        .ok()
                        .map(|f| (f, rng.below(12) as SubId))
                };
                let Some((f, sub)) = pair else { continue };
                let was = model.remove(&(f.clone(), sub));
                assert_eq!(index.remove(&f, sub), was, "remove {f} for {sub}");
                stats[1 + was as usize] += 1;
            }
            _ => {
                let topic = random_text(&mut rng, &tokens, 6);
                index.matches(topic.as_bytes(), &mut out);
                let reported = out.len();
                let got: BTreeSet<SubId> = out.iter().copied().collect();
                assert_eq!(got.len(), reported, "duplicate for {topic:?}");
                let expected: BTreeSet<SubId> = model
                    .iter()
                    .filter(|(f, _)| f.matches(topic.as_bytes()))
                    .map(|&(_, sub)| sub)
                    .collect();
                assert_eq!(got, expected, "topic {topic:?}");
                stats[3] += !expected.is_empty() as usize;
            }
        }
        assert_eq!(index.len(), model.len());
        audit(&index);
    }
    // The run must actually exercise adds, removals and non-empty matches.
    assert!(stats.iter().all(|&n| n > operations / 50), "{stats:?}");
    for (f, sub) in std::mem::take(&mut model) {
        assert!(index.remove(&f, sub));
    }
    assert_baseline(&index);
}

/// `n` copies of `segment` joined by `.`.
fn repeated(segment: &str, n: usize) -> String {
    vec![segment; n].join(".")
}

fn long_pattern(text: &str) -> Filter {
    Filter::new(FilterKind::Pattern, text.as_bytes(), 1 << 20).unwrap()
}

/// Runs `f` on a thread with a 256 KiB stack, where recursion of one
/// frame per segment or node of the tests below would overflow.
fn on_small_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

fn pattern_of(text: &str) -> Filter {
    long_pattern(text)
}

#[test]
fn fresh_index_is_two_roots_and_no_heap() {
    let index = RoutingIndex::default();
    assert_eq!(index.node_count(), 2);
    assert_eq!(index.heap_bytes(), 0);
    assert!(index.is_empty());
    audit(&index);
}

#[test]
fn overlapping_filters_report_a_subscriber_once() {
    let mut index = RoutingIndex::new();
    for f in [
        exact("a.b"),
        prefix("a"),
        prefix(""),
        prefix("a.b"),
        pattern("a.*"),
        pattern("a.b"),
        pattern("a.>"),
        pattern(">"),
        pattern("*.b"),
    ] {
        assert!(index.insert(&f, 7));
        assert!(index.insert(&f, 8));
    }
    assert_eq!(matched(&mut index, "a.b"), [7, 8]);
    assert_eq!(matched(&mut index, "a"), [7, 8]);
    assert_eq!(matched(&mut index, "z"), [7, 8]);
    // And again, so stamps from the previous call do not hide anyone.
    assert_eq!(matched(&mut index, "a.b"), [7, 8]);
}

#[test]
fn epoch_wraparound_restarts_cleanly() {
    let mut index = RoutingIndex::new();
    index.insert(&prefix(""), 0);
    index.insert(&exact("t"), 3);
    // Stamps sub 3 with epoch 1, which comes round again after the wrap.
    assert_eq!(matched(&mut index, "t"), [0, 3]);
    index.epoch = u32::MAX - 1;
    assert_eq!(matched(&mut index, "u"), [0]);
    assert_eq!(matched(&mut index, "t"), [0, 3]);
    assert_eq!(index.epoch, 1, "the wrap skips 0");
    assert_eq!(matched(&mut index, "t"), [0, 3]);
}

#[test]
fn memory_is_reclaimed_after_mass_removal() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let tokens = ["a", "b", "c", "ab", "net", "port", ".", ".", "*", "x.y"];
    let mut pairs = Vec::new();
    while pairs.len() < 10_000 {
        let kind = FilterKind::ALL[rng.below(3)];
        let mut text = random_text(&mut rng, &tokens, 12);
        if kind == FilterKind::Pattern && rng.below(4) == 0 {
            text.push_str(".>");
        }
        let Ok(f) = Filter::new(kind, text.as_bytes(), 4096) else {
            continue;
        };
        let sub = rng.below(100) as SubId;
        if index_insert_unique(&mut pairs, f, sub) {
            continue;
        }
    }
    let mut index = RoutingIndex::new();
    for (f, sub) in &pairs {
        assert!(index.insert(f, *sub));
    }
    assert_eq!(index.len(), pairs.len());
    assert!(index.node_count() > 1000);
    audit(&index);
    let mut out = Vec::new();
    index.matches(b"net.a.port", &mut out);
    // Fisher-Yates, so removal order is unrelated to insertion order.
    for i in (1..pairs.len()).rev() {
        pairs.swap(i, rng.below(i + 1));
    }
    for (n, (f, sub)) in pairs.iter().enumerate() {
        assert!(index.remove(f, *sub));
        if n % 1000 == 0 {
            audit(&index);
        }
    }
    assert_baseline(&index);
    index.matches(b"net.a.port", &mut out);
    assert!(out.is_empty());
}

#[test]
fn differential_against_filter_matches() {
    for seed in 1..=8u64 {
        differential(seed.wrapping_mul(0x2545_F491_4F6C_DD1D), 4000);
    }
}
