//! The match cache: what it takes in, how it stays exact, and how it
//! evicts.

use std::collections::BTreeSet;
use std::mem::size_of;

use super::*;
use crate::index::MATCH_CACHE_CAPACITY;
use crate::index::cache::CACHE_MAX_ENTRY_BYTES;
use crate::index::collector::Collector;
use crate::index::pattern;

/// The security review's CPU case, scaled down: patterns of `segments`
/// segments, `a` but for one `*` and a last `nomatch`.
fn worst_case(segments: usize) -> (RoutingIndex, String) {
    let mut index = RoutingIndex::new();
    for star in 0..segments - 1 {
        let mut parts = vec!["a"; segments];
        parts[star] = "*";
        parts[segments - 1] = "nomatch";
        assert!(index.insert(&pattern_of(&parts.join(".")), star as SubId));
    }
    (index, repeated("a", segments))
}

#[test]
fn costly_walks_are_cached_and_cheap_ones_are_not() {
    let (mut index, topic) = worst_case(32);
    assert!(matched(&mut index, "a.a.a").is_empty());
    assert_eq!(index.cache_len(), 0, "a cheap walk is not cached");
    assert_eq!(index.cache_heap_bytes(), 0);
    let mut steps = 0;
    let mut seen = vec![0; 64];
    let mut out = Vec::new();
    let mut collector = Collector {
        seen: &mut seen,
        epoch: 1,
        out: &mut out,
    };
    pattern::collect(
        &index.patterns,
        topic.as_bytes(),
        &index.hasher,
        &mut collector,
        &mut steps,
    );
    assert!(steps >= CACHE_MIN_STEPS, "{steps} steps");
    assert!(matched(&mut index, &topic).is_empty());
    assert_eq!(index.cache_len(), 1);
    assert!(index.cache_heap_bytes() > 0);
    // A pattern that matches the cached topic is added to its entry...
    let extra = pattern_of(&repeated("*", 32));
    assert!(index.insert(&extra, 77));
    assert_eq!(index.cache_len(), 1);
    audit(&index);
    assert_eq!(matched(&mut index, &topic), [77]);
    // ...one that does not leaves it alone...
    assert!(index.insert(&pattern("b.>"), 78));
    assert!(index.remove(&pattern("b.>"), 78));
    assert_eq!(index.cache_len(), 1);
    // ...and removing a matching one drops it.
    assert!(index.remove(&extra, 77));
    assert_eq!(index.cache_len(), 0);
    assert!(matched(&mut index, &topic).is_empty());
    assert_eq!(index.cache_len(), 1);
    audit(&index);
    // Exact and prefix filters never touch the cache, and the cache
    // answers only for the pattern part.
    index.insert(&exact(&topic), 90);
    index.insert(&prefix("a.a"), 91);
    assert_eq!(index.cache_len(), 1);
    assert_eq!(matched(&mut index, &topic), [90, 91]);
    index.remove(&exact(&topic), 90);
    index.remove(&prefix("a.a"), 91);
    for star in 0..31 {
        assert!(index.remove(&pattern_of(&worst_case_text(32, star)), star as SubId));
    }
    assert_baseline(&index);
}

fn worst_case_text(segments: usize, star: usize) -> String {
    let mut parts = vec!["a"; segments];
    parts[star] = "*";
    parts[segments - 1] = "nomatch";
    parts.join(".")
}

#[test]
fn cache_entries_grow_in_place_up_to_their_limit() {
    let (mut index, topic) = worst_case(32);
    assert!(matched(&mut index, &topic).is_empty());
    assert_eq!(index.cache_len(), 1);
    let all = pattern_of(&repeated("*", 32));
    let room = (CACHE_MAX_ENTRY_BYTES - topic.len()) / size_of::<SubId>();
    for sub in 100..100 + room as SubId + 10 {
        assert!(index.insert(&all, sub));
        let fits = ((sub - 100) as usize) < room;
        assert_eq!(index.cache_len(), usize::from(fits), "sub {sub}");
        if sub % 50 == 0 || !fits {
            audit(&index);
        }
    }
    // Too many subscribers to cache now: the walk is repeated each time.
    let expected: Vec<SubId> = (100..100 + room as SubId + 10).collect();
    assert_eq!(matched(&mut index, &topic), expected);
    assert_eq!(index.cache_len(), 0);
    for sub in 100..100 + room as SubId + 10 {
        assert!(index.remove(&all, sub));
    }
    assert!(matched(&mut index, &topic).is_empty());
    assert_eq!(index.cache_len(), 1);
    audit(&index);
}

#[test]
fn cache_evicts_by_clock_and_reuses_its_buffers() {
    let (mut index, topic) = worst_case(32);
    // Many distinct costly topics: the last segment varies.
    let topic_n = |n: usize| format!("{}.x{n:07}", &topic[..topic.len() - 2]);
    for n in 0..3 * MATCH_CACHE_CAPACITY {
        assert!(matched(&mut index, &topic_n(n)).is_empty());
        assert!(index.cache_len() <= MATCH_CACHE_CAPACITY);
    }
    assert_eq!(index.cache_len(), MATCH_CACHE_CAPACITY);
    audit(&index);
    let full = index.cache_heap_bytes();
    // A hot topic, hit between misses, survives the clock.
    let hot = topic_n(1_000_000);
    matched(&mut index, &hot);
    for n in 0..4 * MATCH_CACHE_CAPACITY {
        matched(&mut index, &topic_n(10_000 + n));
        matched(&mut index, &hot);
    }
    assert!(
        index.cache.get(hot.as_bytes()).is_some(),
        "hot topic evicted"
    );
    // Evicted entries' buffers were reused: no growth for same-sized
    // topics.
    assert_eq!(index.cache_heap_bytes(), full);
    audit(&index);
    // An entry bigger than the limit is never cached.
    let huge = format!("{topic}.{}", "x".repeat(CACHE_MAX_ENTRY_BYTES));
    let before = index.cache_len();
    index.insert(&pattern_of(&format!("{}.>", repeated("*", 8))), 5000);
    assert!(index.cache_len() <= before);
    matched(&mut index, &huge);
    assert!(index.cache.get(huge.as_bytes()).is_none());
    audit(&index);
}

/// Hot topics matched again and again while pattern pairs come and go:
/// the cache must always agree with a fresh walk and with the model.
fn cache_churn(seed: u64, min_steps: usize, operations: usize) {
    let mut rng = Rng(seed);
    let segments = ["a", "b", "*"];
    let mut index = RoutingIndex::new();
    index.cache_min_steps = min_steps;
    let mut model: BTreeSet<(Filter, SubId)> = BTreeSet::new();
    let hot: Vec<String> = (0..6)
        .map(|_| {
            let n = 1 + rng.below(12);
            (0..n)
                .map(|_| ["a", "b", "c"][rng.below(3)])
                .collect::<Vec<_>>()
                .join(".")
        })
        .collect();
    let mut out = Vec::new();
    let mut cached = 0;
    for n in 0..operations {
        match rng.below(10) {
            0..=2 => {
                let n = 1 + rng.below(12);
                let mut text: Vec<&str> = (0..n).map(|_| rng.pick(&segments)).collect();
                if rng.below(4) == 0 {
                    text.push(">");
                }
                let f = pattern_of(&text.join("."));
                let sub = rng.below(10) as SubId;
                assert_eq!(index.insert(&f, sub), model.insert((f, sub)));
            }
            3..=4 if !model.is_empty() => {
                let pair = model.iter().nth(rng.below(model.len())).unwrap().clone();
                assert!(index.remove(&pair.0, pair.1));
                model.remove(&pair);
            }
            _ => {
                let topic = &hot[rng.below(hot.len())];
                for _ in 0..1 + rng.below(3) {
                    index.matches(topic.as_bytes(), &mut out);
                    let got: BTreeSet<SubId> = out.iter().copied().collect();
                    assert_eq!(got.len(), out.len(), "duplicate for {topic:?}");
                    let expected: BTreeSet<SubId> = model
                        .iter()
                        .filter(|(f, _)| f.matches(topic.as_bytes()))
                        .map(|&(_, sub)| sub)
                        .collect();
                    assert_eq!(got, expected, "topic {topic:?}");
                }
            }
        }
        cached = cached.max(index.cache_len());
        if n % 8 == 0 {
            audit(&index);
        }
    }
    assert!(cached > 0, "the cache was never used");
    for (f, sub) in std::mem::take(&mut model) {
        assert!(index.remove(&f, sub));
    }
    assert_baseline(&index);
}

#[test]
fn cache_stays_exact_under_pattern_churn() {
    for seed in 1..=6u64 {
        // Every walk cached, and the production threshold (long topics
        // against many wildcards pass it now and then).
        cache_churn(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 0, 3000);
        cache_churn(seed.wrapping_mul(0x2545_F491_4F6C_DD1D), 8, 3000);
    }
}

#[test]
fn differential_with_every_walk_cached() {
    for seed in 1..=4u64 {
        differential_with(seed.wrapping_mul(0x6A09_E667_F3BC_C909), 4000, 0);
    }
}
