//! Subscriber sets: the switch between the inline and hashed forms, and
//! many subscribers on one filter.

use super::*;
use crate::index::subscriber_set::{BACK_TO_SMALL, MAX_SMALL_SUBS, SubSet};

#[test]
fn subscriber_set_switches_between_inline_and_hash() {
    let mut index = RoutingIndex::new();
    let shared = prefix("net");
    let other = exact("net.a"); // found through the exact map, not the tree
    index.insert(&other, 1000);
    for sub in 0..100 {
        assert!(index.insert(&shared, sub));
        assert!(!index.insert(&shared, sub));
    }
    let node = &index.radix.children[0].1;
    assert!(matches!(node.prefix, SubSet::Large(_)));
    audit(&index);
    let mut held: Vec<SubId> = (0..100).collect();
    let mut rng = Rng(42);
    while !held.is_empty() {
        let sub = held.swap_remove(rng.below(held.len()));
        assert!(index.remove(&shared, sub));
        assert!(!index.remove(&shared, sub));
        audit(&index);
        let mut expected = held.clone();
        expected.sort_unstable();
        assert_eq!(matched(&mut index, "net.b"), expected);
        expected.push(1000);
        assert_eq!(matched(&mut index, "net.a"), expected);
        if held.is_empty() {
            assert!(
                index.radix.children.is_empty(),
                "the emptied node is pruned"
            );
            continue;
        }
        let node = &index.radix.children[0].1;
        match held.len() {
            0..=BACK_TO_SMALL => assert!(matches!(node.prefix, SubSet::Small(_))),
            n if n > MAX_SMALL_SUBS => assert!(matches!(node.prefix, SubSet::Large(_))),
            _ => {}
        }
    }
    assert!(index.remove(&other, 1000));
    assert_baseline(&index);
}

#[test]
fn ten_thousand_subscribers_on_the_empty_prefix() {
    let mut index = RoutingIndex::new();
    let everything = prefix("");
    let n = 10_000;
    for sub in 0..n {
        index.insert(&everything, sub);
    }
    index.insert(&pattern(">"), 5);
    let mut out = Vec::new();
    index.matches(b"any.topic", &mut out);
    assert_eq!(out.len(), n as usize);
    for sub in (0..n).rev() {
        assert!(index.remove(&everything, sub));
    }
    assert!(index.remove(&pattern(">"), 5));
    assert_baseline(&index);
}
