//! Pattern filters: the segment trie's edge splits and merges, its literal
//! child tables, its memory, and its depth limits.

use std::collections::BTreeSet;
use std::mem::size_of;

use super::*;
use crate::index::pattern::{Literals, MAX_FEW_LITERALS, PatternNode};

#[test]
fn pattern_basics() {
    let mut index = RoutingIndex::new();
    assert!(index.insert(&pattern("net.*.port"), 1));
    assert!(!index.insert(&pattern("net.*.port"), 1));
    assert!(index.insert(&pattern("net.>"), 2));
    assert!(index.insert(&pattern(">"), 3));
    assert!(index.insert(&pattern("*"), 4));
    assert!(index.insert(&pattern("net.a.port"), 5));
    assert_eq!(matched(&mut index, "net.a.port"), [1, 2, 3, 5]);
    assert_eq!(matched(&mut index, "net.b.port"), [1, 2, 3]);
    assert_eq!(matched(&mut index, "net.a.b.port"), [2, 3]);
    assert_eq!(matched(&mut index, "net.port"), [2, 3]);
    assert_eq!(matched(&mut index, "net"), [3, 4], "> needs a segment");
    assert_eq!(matched(&mut index, ""), [3, 4], "\"\" is one empty segment");
    assert!(!index.remove(&pattern("net.*"), 1));
    assert!(!index.remove(&pattern("net.>"), 1));
    for (text, sub) in [
        ("net.*.port", 1),
        ("net.>", 2),
        (">", 3),
        ("*", 4),
        ("net.a.port", 5),
    ] {
        assert!(index.remove(&pattern(text), sub));
        audit(&index);
    }
    assert!(matched(&mut index, "net.a.port").is_empty());
    assert_baseline(&index);
}

#[test]
fn pattern_segment_edge_cases() {
    let mut index = RoutingIndex::new();
    index.insert(&pattern("a.*.b"), 1);
    index.insert(&pattern("a*"), 2);
    index.insert(&pattern("a.."), 3);
    index.insert(&pattern("*.>"), 4);
    index.insert(&pattern("x.>"), 5);
    assert_eq!(matched(&mut index, "a..b"), [1, 4], "empty middle segment");
    assert_eq!(matched(&mut index, "a.*.b"), [1, 4]);
    assert_eq!(matched(&mut index, "a*"), [2], "a* is a literal segment");
    assert!(matched(&mut index, "ab").is_empty());
    assert_eq!(matched(&mut index, "a.."), [3, 4]);
    assert_eq!(matched(&mut index, "x"), Vec::<SubId>::new());
    assert_eq!(
        matched(&mut index, "x."),
        [4, 5],
        "a trailing empty segment counts"
    );
    assert_eq!(
        matched(&mut index, "*"),
        Vec::<SubId>::new(),
        "topic * is literal"
    );
    assert_eq!(matched(&mut index, ">.>"), [4]);
}

#[test]
fn pattern_edges_split_and_merge_in_every_order() {
    // Shares "a.b" (two segments) and then "a"; "*" starts its own edge.
    let texts = ["a.b.c", "a.b.d", "a.b", "a.*.c", "a.b.>", "a.b.c.d.e"];
    let topics = [
        "a",
        "a.b",
        "a.b.c",
        "a.b.d",
        "a.x.c",
        "a.b.c.d",
        "a.b.c.d.e",
        "a.b.c.d.f",
        "a.bc.c",
        "a.b.cd",
        "b.b.c",
    ];
    let mut rng = Rng(7);
    for _ in 0..200 {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut index = RoutingIndex::new();
        let mut held: BTreeSet<(Filter, SubId)> = BTreeSet::new();
        let check = |index: &mut RoutingIndex, held: &BTreeSet<(Filter, SubId)>| {
            audit(index);
            for topic in topics {
                let expected: BTreeSet<SubId> = held
                    .iter()
                    .filter(|(f, _)| f.matches(topic.as_bytes()))
                    .map(|&(_, sub)| sub)
                    .collect();
                let got: BTreeSet<SubId> = matched(index, topic).into_iter().collect();
                assert_eq!(got, expected, "topic {topic:?} with {held:?}");
            }
        };
        for &i in &order {
            assert!(index.insert(&pattern(texts[i]), i as SubId));
            held.insert((pattern(texts[i]), i as SubId));
            check(&mut index, &held);
        }
        // root -> "a" -> {"b" (subs, tail) -> {"c" (subs) -> "d.e", "d"},
        // "*.c"}: 7 nodes with both roots.
        assert_eq!(index.node_count(), 2 + 6);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for &i in &order {
            assert!(index.remove(&pattern(texts[i]), i as SubId));
            held.remove(&(pattern(texts[i]), i as SubId));
            check(&mut index, &held);
            if held.len() == 1 {
                // A lone survivor is one leaf under the root.
                assert_eq!(index.node_count(), 3);
            }
        }
        assert_baseline(&index);
    }
}

#[test]
fn pattern_labels_hold_empty_segments_and_wildcards() {
    let mut index = RoutingIndex::new();
    for (sub, text) in ["..", ".", ".a", "*.*", "*..*", "*", "a..>", "a.*.>"]
        .iter()
        .enumerate()
    {
        assert!(index.insert(&pattern(text), sub as SubId));
        audit(&index);
    }
    assert_eq!(matched(&mut index, ""), [5]);
    assert_eq!(matched(&mut index, "."), [1, 3]);
    assert_eq!(matched(&mut index, ".."), [0, 4]);
    assert_eq!(matched(&mut index, ".a"), [2, 3]);
    assert_eq!(matched(&mut index, "a..x"), [4, 6, 7]);
    assert_eq!(matched(&mut index, "a.b.x"), [7]);
    for (sub, text) in ["..", ".", ".a", "*.*", "*..*", "*", "a..>", "a.*.>"]
        .iter()
        .enumerate()
    {
        assert!(index.remove(&pattern(text), sub as SubId));
        assert!(!index.remove(&pattern(text), sub as SubId));
        audit(&index);
    }
    assert_baseline(&index);
}

#[test]
fn literal_children_switch_between_array_and_table() {
    let mut index = RoutingIndex::new();
    let texts: Vec<String> = (0..40).map(|i| format!("root.c{i}.leaf")).collect();
    index.insert(&pattern("root"), 1000);
    for (sub, text) in texts.iter().enumerate() {
        assert!(index.insert(&pattern(text), sub as SubId));
        audit(&index);
        let root = index.patterns.literal.iter().next().unwrap();
        let table = matches!(root.literal, Literals::Many(_));
        assert_eq!(table, sub + 1 > MAX_FEW_LITERALS, "{} children", sub + 1);
    }
    for (sub, text) in texts.iter().enumerate() {
        assert_eq!(matched(&mut index, text), [sub as SubId]);
    }
    for (sub, text) in texts.iter().enumerate().rev() {
        assert!(index.remove(&pattern(text), sub as SubId));
        audit(&index);
        assert_eq!(matched(&mut index, "root"), [1000]);
    }
    assert!(index.remove(&pattern("root"), 1000));
    assert_baseline(&index);
}

#[test]
fn pattern_memory_grows_with_bytes_not_segments() {
    // The security review's case: 1 KiB, 512 segments.
    let text = repeated("a", 512);
    let mut index = RoutingIndex::new();
    index.insert(&pattern(&text), 1);
    assert_eq!(index.node_count(), 2 + 1);
    assert_eq!(index.heap_bytes(), size_of::<PatternNode>() + text.len());
    // Each further pattern of B bytes adds at most two nodes and its
    // bytes, plus its share of a child array or table.
    let mut rng = Rng(11);
    for sub in 2..2000 {
        let cut = 2 * rng.below(512);
        let tail = ["b", "*", "c.d", "*.*.e"][rng.below(4)];
        let text = format!("{}{tail}", &text[..cut]);
        let (nodes, heap) = (index.node_count(), index.heap_bytes());
        assert!(index.insert(&pattern(&text), sub));
        assert!(index.node_count() - nodes <= 2);
        let grown = index.heap_bytes() - heap;
        assert!(
            grown <= text.len() + 2 * size_of::<PatternNode>() + 1024,
            "{text}: {grown} bytes"
        );
    }
    audit(&index);
}

#[test]
fn huge_patterns_insert_match_and_remove_without_deep_recursion() {
    on_small_stack(|| {
        let long = repeated("a", 131_072);
        let stars = repeated("*", 65_536);
        let long_topic = long.clone();
        let star_topic = repeated("b", 65_536);
        let mut index = RoutingIndex::new();
        assert!(index.insert(&long_pattern(&long), 1));
        assert!(index.insert(&long_pattern(&stars), 2));
        assert!(index.insert(&long_pattern(&format!("{stars}.>")), 3));
        assert!(index.insert(&long_pattern(&format!("{long}.>")), 4));
        assert!(index.insert(&long_pattern(&repeated("a", 65_536)), 5));
        audit(&index);
        assert!(index.node_count() <= 2 + 6);
        assert_eq!(matched(&mut index, &long_topic), [1, 3]);
        assert_eq!(matched(&mut index, &star_topic), [2]);
        assert_eq!(matched(&mut index, &format!("{long_topic}.x")), [3, 4]);
        assert_eq!(matched(&mut index, &repeated("a", 65_536)), [2, 5]);
        assert!(index.remove(&long_pattern(&long), 1));
        assert!(index.remove(&long_pattern(&stars), 2));
        assert!(index.remove(&long_pattern(&format!("{stars}.>")), 3));
        audit(&index);
        // Dropped with patterns still held.
        let held = std::mem::take(&mut index);
        drop(held);
        assert!(index.insert(&long_pattern(&stars), 2));
        assert!(index.remove(&long_pattern(&stars), 2));
        assert_baseline(&index);
    });
}

/// Patterns `a`, `a.a`, ... `a` x `depth`: a chain of one node per
/// segment, the deepest trie a set of patterns of that many segments can
/// build. Inserted longest first, so each one splits the long edge.
fn chain(depth: usize) -> Vec<Filter> {
    let longest = repeated("a", depth);
    (1..=depth)
        .rev()
        .map(|n| long_pattern(&longest[..2 * n - 1]))
        .collect()
}

#[test]
fn deep_chains_remove_and_drop_without_deep_recursion() {
    on_small_stack(|| {
        const DEPTH: usize = 2048;
        let filters = chain(DEPTH);
        let mut index = RoutingIndex::new();
        for (sub, f) in filters.iter().enumerate() {
            assert!(index.insert(f, sub as SubId));
        }
        assert_eq!(index.node_count(), 2 + DEPTH);
        audit(&index);
        let mut out = Vec::new();
        index.matches(filters[0].text(), &mut out);
        assert_eq!(out, [0]);
        // Drop the whole chain at once...
        drop(std::mem::take(&mut index));
        // ...and take another apart from the middle outwards.
        for (sub, f) in filters.iter().enumerate() {
            assert!(index.insert(f, sub as SubId));
        }
        let mut rng = Rng(3);
        let mut order: Vec<usize> = (0..DEPTH).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for (n, &i) in order.iter().enumerate() {
            assert!(index.remove(&filters[i], i as SubId));
            if n % 1024 == 0 {
                audit(&index);
            }
        }
        assert_baseline(&index);
    });
}

/// `depth` nested forks along the topic `a.a.a...`: at every depth both
/// the `*` child and the literal `a` child continue, the one shape that
/// makes matching recurse, once per fork.
#[test]
fn nested_forks_recurse_once_per_fork() {
    const DEPTH: usize = 1024;
    let mut index = RoutingIndex::new();
    let mut sub = 0;
    for d in 0..DEPTH {
        for last in ["y", "z"] {
            let text = format!("{}a.{last}", "*.".repeat(d));
            assert!(index.insert(&pattern_of(&text), sub));
            sub += 1;
        }
    }
    audit(&index);
    let topic = repeated("a", DEPTH + 1);
    std::thread::Builder::new()
        // About 300 bytes per fork optimised (1024 fit in 320 KiB), three
        // times that unoptimised (1 MiB); twice what debug builds need.
        .stack_size(2 << 20)
        .spawn(move || {
            assert!(matched(&mut index, &topic).is_empty());
            let hit = format!("{}.z", repeated("a", DEPTH));
            assert_eq!(matched(&mut index, &hit), [2 * DEPTH as SubId - 1]);
        })
        .unwrap()
        .join()
        .unwrap();
}
