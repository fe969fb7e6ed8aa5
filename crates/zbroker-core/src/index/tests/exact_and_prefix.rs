//! Exact filters (the hash map) and prefix filters (the radix tree).

use std::collections::BTreeSet;

use super::*;

#[test]
fn exact_basics() {
    let mut index = RoutingIndex::new();
    assert!(index.insert(&exact("net.a"), 1));
    assert!(!index.insert(&exact("net.a"), 1), "insert is idempotent");
    assert_eq!(index.len(), 1);
    assert_eq!(matched(&mut index, "net.a"), [1]);
    assert!(matched(&mut index, "net").is_empty());
    assert!(matched(&mut index, "net.ab").is_empty());
    assert!(matched(&mut index, "").is_empty());
    assert!(!index.remove(&exact("net"), 1), "absent filter");
    assert!(!index.remove(&exact("net.a"), 2), "absent subscriber");
    assert!(!index.remove(&prefix("net.a"), 1), "same text, other kind");
    assert!(index.remove(&exact("net.a"), 1));
    assert!(!index.remove(&exact("net.a"), 1), "already removed");
    assert!(matched(&mut index, "net.a").is_empty());
    assert_baseline(&index);
}

#[test]
fn prefix_basics() {
    let mut index = RoutingIndex::new();
    assert!(index.insert(&prefix("net."), 1));
    assert!(index.insert(&prefix(""), 2));
    assert!(!index.insert(&prefix(""), 2));
    assert_eq!(matched(&mut index, "net.a"), [1, 2]);
    assert_eq!(matched(&mut index, "net."), [1, 2]);
    assert_eq!(matched(&mut index, "net"), [2]);
    assert_eq!(matched(&mut index, ""), [2]);
    assert!(!index.remove(&prefix("net"), 1));
    assert!(index.remove(&prefix(""), 2));
    assert!(matched(&mut index, "x").is_empty());
    assert!(index.remove(&prefix("net."), 1));
    assert_baseline(&index);
}

#[test]
fn exact_and_prefix_share_a_node_independently() {
    let mut index = RoutingIndex::new();
    index.insert(&exact("ab"), 1);
    index.insert(&prefix("ab"), 2);
    assert_eq!(index.node_count(), 3);
    assert_eq!(matched(&mut index, "ab"), [1, 2]);
    assert_eq!(matched(&mut index, "abc"), [2]);
    assert!(index.remove(&exact("ab"), 1));
    assert_eq!(matched(&mut index, "ab"), [2]);
    assert_eq!(index.node_count(), 3, "prefix still holds the node");
    assert!(index.remove(&prefix("ab"), 2));
    assert_baseline(&index);
}

#[test]
fn radix_split_and_merge_in_every_order() {
    let texts = ["abc", "abd", "ab"];
    let orders = [
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    ];
    let topics = ["", "a", "ab", "abc", "abd", "abe", "abcd", "b"];
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
    for kind in [FilterKind::Exact, FilterKind::Prefix] {
        for insert_order in orders {
            for remove_order in orders {
                let mut index = RoutingIndex::new();
                let mut held = BTreeSet::new();
                for &i in &insert_order {
                    let f = filter(kind, texts[i]);
                    assert!(index.insert(&f, i as SubId));
                    held.insert((f, i as SubId));
                    check(&mut index, &held);
                }
                // Prefixes: root, "ab", "c", "d", and the pattern root.
                // Exact filters live in the hash map: no nodes.
                let nodes = if kind == FilterKind::Prefix { 5 } else { 2 };
                assert_eq!(index.node_count(), nodes);
                for &i in &remove_order {
                    let f = filter(kind, texts[i]);
                    assert!(index.remove(&f, i as SubId));
                    held.remove(&(f, i as SubId));
                    check(&mut index, &held);
                    // A lone survivor is merged into one node under the root.
                    if held.len() == 1 && kind == FilterKind::Prefix {
                        assert_eq!(index.node_count(), 3);
                    }
                }
                assert_baseline(&index);
            }
        }
    }
}

#[test]
fn merge_keeps_deeper_structure() {
    let mut index = RoutingIndex::new();
    for (i, text) in ["ab", "abcx", "abcy", "abd"].iter().enumerate() {
        index.insert(&prefix(text), i as SubId);
    }
    // "ab" -> {"c" -> {"x", "y"}, "d"}
    assert_eq!(index.node_count(), 2 + 5);
    assert!(index.remove(&prefix("abd"), 3));
    assert!(index.remove(&prefix("ab"), 0));
    // "ab" and "c" merge into "abc", which still branches into x and y.
    assert_eq!(index.node_count(), 2 + 3);
    audit(&index);
    assert_eq!(matched(&mut index, "abcx"), [1]);
    assert_eq!(matched(&mut index, "abcy"), [2]);
    assert!(matched(&mut index, "abc").is_empty());
}
