//! The invariant check every test leans on: each structure's invariants,
//! and the running totals (`node_count`, `heap_bytes`, `len`) against a full
//! recount, and every cached topic against a fresh walk.

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::mem::size_of;

use hashbrown::DefaultHashBuilder;

use crate::filter::{ONE_SEGMENT, SEPARATOR, TAIL};
use crate::index::cache::{CACHE_MAX_ENTRY_BYTES, cache_entry_fits};
use crate::index::collector::Collector;
use crate::index::exact;
use crate::index::pattern::{
    self, BACK_TO_FEW_LITERALS, Literals, MAX_FEW_LITERALS, PatternNode, segment_hash,
    split_segment,
};
use crate::index::prefix::RadixNode;
use crate::index::subscriber_set::{BACK_TO_SMALL, SubSet};
use crate::index::{MATCH_CACHE_CAPACITY, RoutingIndex, SubId};

/// What a full walk finds, to check the running totals against.
struct Census {
    nodes: usize,
    heap: usize,
    pairs: usize,
}

fn radix_census(node: &RadixNode, is_root: bool, census: &mut Census) {
    census.nodes += 1;
    census.pairs += node.prefix.len();
    census.heap += if is_root {
        node.own_heap() - size_of::<RadixNode>()
    } else {
        node.own_heap()
    };
    if !is_root {
        assert!(
            !node.label.is_empty(),
            "non-root radix node with empty label"
        );
        assert!(
            node.has_subs() || node.children.len() >= 2,
            "radix node {:?} should have been pruned or merged",
            String::from_utf8_lossy(&node.label)
        );
    }
    for pair in node.children.windows(2) {
        assert!(pair[0].0 < pair[1].0, "radix children out of order");
    }
    for (first, child) in &node.children {
        assert_eq!(*first, child.label[0], "stale first-byte key");
        radix_census(child, false, census);
    }
}

/// Iterative, so the deep tries of the limit tests can be audited too.
fn pattern_census(root: &PatternNode, hasher: &DefaultHashBuilder, census: &mut Census) {
    let mut stack = vec![(root, true)];
    while let Some((node, is_root)) = stack.pop() {
        census.nodes += 1;
        census.pairs += node.subs.len() + node.tail.len();
        set_census(&node.subs);
        set_census(&node.tail);
        census.heap += if is_root {
            node.own_heap() - size_of::<PatternNode>()
        } else {
            node.own_heap()
        };
        let label = String::from_utf8_lossy(&node.label);
        if is_root {
            assert!(node.label.is_empty(), "root with a label");
        } else {
            assert!(
                node.has_subs() || node.child_count() >= 2,
                "pattern node {label:?} should have been pruned or merged"
            );
            assert!(
                node.label.split(|&b| b == SEPARATOR).all(|s| s != TAIL),
                "> in label {label:?}"
            );
        }
        match &node.literal {
            Literals::Few(children) => assert!(children.len() <= MAX_FEW_LITERALS),
            Literals::Many(children) => {
                assert!(
                    children.len() > BACK_TO_FEW_LITERALS,
                    "table should be an array"
                )
            }
        }
        let mut keys = BTreeSet::new();
        for (hash, child) in node.literal.entries() {
            let key = split_segment(&child.label).0;
            assert_eq!(hash, segment_hash(hasher, key), "stale key hash");
            assert!(key != ONE_SEGMENT, "literal child keyed by *");
            assert!(keys.insert(key), "two literal children share a key");
            assert!(
                std::ptr::eq(node.child(key, hasher).unwrap(), child),
                "child not found by its key"
            );
            stack.push((child, false));
        }
        if let Some(star) = &node.star {
            assert_eq!(split_segment(&star.label).0, ONE_SEGMENT, "star child");
            stack.push((star, false));
        }
    }
}

fn set_census(set: &SubSet) {
    if let SubSet::Large(ids) = set {
        assert!(
            ids.len() > BACK_TO_SMALL,
            "large set should have gone small"
        );
    }
    if set.is_empty() {
        assert_eq!(set.heap_bytes(), 0, "empty set holds heap");
    }
}

fn sets_census(index: &RoutingIndex) {
    fn radix(node: &RadixNode) {
        set_census(&node.prefix);
        node.children.iter().for_each(|(_, child)| radix(child));
    }
    radix(&index.radix);
    index.exact.values().for_each(set_census);
}

/// Checks the structural invariants and that the running totals equal a
/// full recount.
pub(super) fn audit(index: &RoutingIndex) {
    let mut census = Census {
        nodes: 0,
        heap: 0,
        pairs: 0,
    };
    radix_census(&index.radix, true, &mut census);
    pattern_census(&index.patterns, &index.hasher, &mut census);
    census.heap += exact::table_heap(&index.exact);
    for (topic, set) in &index.exact {
        assert!(!set.is_empty(), "empty exact entry left behind");
        census.heap += topic.len() + set.heap_bytes();
        census.pairs += set.len();
    }
    sets_census(index);
    assert_eq!(index.node_count(), census.nodes, "node count drifted");
    assert_eq!(index.heap_bytes(), census.heap, "heap accounting drifted");
    assert_eq!(index.len(), census.pairs, "pair count drifted");
    cache_audit(index);
}

/// The pattern subscribers matching `topic`, by a fresh walk that
/// neither reads nor fills the cache, sorted.
fn walked(index: &RoutingIndex, topic: &[u8]) -> Vec<SubId> {
    let mut seen = vec![0; index.seen.len()];
    let mut out = Vec::new();
    let mut collector = Collector {
        seen: &mut seen,
        epoch: 1,
        out: &mut out,
    };
    pattern::collect(
        &index.patterns,
        topic,
        &index.hasher,
        &mut collector,
        &mut 0,
    );
    out.sort_unstable();
    out
}

/// Every cached entry is findable and equals what a walk finds now.
fn cache_audit(index: &RoutingIndex) {
    let cache = &index.cache;
    let mut live = 0;
    for (at, slot) in cache.slots.iter().enumerate() {
        assert!(slot.topic.capacity() <= CACHE_MAX_ENTRY_BYTES);
        assert!(slot.subs.capacity() * size_of::<SubId>() <= CACHE_MAX_ENTRY_BYTES);
        if !slot.live {
            continue;
        }
        live += 1;
        assert_eq!(slot.hash, cache.hasher.hash_one(&slot.topic[..]));
        assert_eq!(
            cache.table.find(slot.hash, |&i| i as usize == at),
            Some(&(at as u32)),
            "live slot missing from the table"
        );
        assert!(cache_entry_fits(slot.topic.len(), slot.subs.len()));
        let mut cached = slot.subs.clone();
        cached.sort_unstable();
        assert!(cached.windows(2).all(|w| w[0] != w[1]), "cached twice");
        assert_eq!(
            cached,
            walked(index, &slot.topic),
            "stale cache entry for {:?}",
            String::from_utf8_lossy(&slot.topic)
        );
    }
    assert_eq!(cache.table.len(), live, "table and live slots disagree");
    assert!(cache.slots.len() <= MATCH_CACHE_CAPACITY);
    assert!(index.cache_heap_bytes() <= (MATCH_CACHE_CAPACITY << 12) + (22 << 10));
    if index.pattern_pairs == 0 {
        assert_eq!(index.cache_len(), 0, "cache kept without patterns");
        assert_eq!(index.cache_heap_bytes(), 0, "cache memory kept");
    }
}

pub(super) fn assert_baseline(index: &RoutingIndex) {
    let fresh = RoutingIndex::new();
    assert_eq!(index.len(), 0);
    assert!(index.is_empty());
    assert_eq!(index.node_count(), fresh.node_count());
    assert_eq!(index.heap_bytes(), fresh.heap_bytes());
    assert_eq!(index.cache_len(), 0);
    assert_eq!(index.cache_heap_bytes(), 0);
    audit(index);
}
