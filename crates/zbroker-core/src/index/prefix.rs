//! Prefix filters: a byte-level radix tree, a path-compressed trie with a
//! node only where prefixes branch or end.
//!
//! A topic's bytes spell one path from the root, and every node on it holds
//! a prefix of the topic, so a match is one walk down that path. The
//! index's module docs describe what it costs.

use std::mem::size_of;

use smallvec::SmallVec;

use super::SubId;
use super::collector::Collector;
use super::subscriber_set::SubSet;
use super::usage::Usage;

/// Children keyed by the first byte of their label, sorted by it. The key is
/// duplicated beside the pointer so that a binary search stays within one
/// contiguous array instead of chasing two pointers per probe.
pub(crate) type RadixChildren = SmallVec<[(u8, Box<RadixNode>); 2]>;

/// A node of the radix tree.
///
/// Invariants: a non-root node has a non-empty label and either subscribers
/// or at least two children. Nothing else would justify a node in a
/// path-compressed tree.
pub(crate) struct RadixNode {
    /// The edge from the parent: the bytes this node adds to its parent's
    /// path.
    pub(crate) label: Box<[u8]>,
    /// Subscribers of the prefix this node's path spells.
    pub(crate) prefix: SubSet,
    pub(crate) children: RadixChildren,
}

impl RadixNode {
    pub(crate) fn new(label: Box<[u8]>) -> Self {
        RadixNode {
            label,
            prefix: SubSet::default(),
            children: SmallVec::new(),
        }
    }

    pub(crate) fn has_subs(&self) -> bool {
        !self.prefix.is_empty()
    }

    /// `Ok(index)` of the child whose label starts with `byte`, or
    /// `Err(insertion point)`.
    fn child_index(&self, byte: u8) -> Result<usize, usize> {
        self.children
            .binary_search_by_key(&byte, |&(first, _)| first)
    }

    /// Heap held by this node when boxed, its descendants excluded.
    pub(crate) fn own_heap(&self) -> usize {
        size_of::<RadixNode>()
            + self.label.len()
            + children_heap(&self.children)
            + self.prefix.heap_bytes()
    }
}

fn children_heap(children: &RadixChildren) -> usize {
    if children.spilled() {
        children.capacity() * size_of::<(u8, Box<RadixNode>)>()
    } else {
        0
    }
}

/// Gives memory back once a child array is mostly empty, and goes inline as
/// soon as the children fit.
fn shrink_children(children: &mut RadixChildren) {
    if children.spilled()
        && (children.len() <= children.inline_size() || children.len() * 4 <= children.capacity())
    {
        children.shrink_to_fit();
    }
}

/// Length of the longest common prefix of `a` and `b`.
pub(crate) fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Adds `sub` under prefix `key`. False if the pair was already present, in
/// which case nothing changes.
pub(crate) fn insert(root: &mut RadixNode, key: &[u8], sub: SubId, usage: &mut Usage) -> bool {
    // A duplicate pair finds its node already in place, so a false result
    // never leaves freshly created nodes behind.
    let node = node_for(root, key, usage);
    usage.track(&mut node.prefix, SubSet::heap_bytes, |set| set.insert(sub))
}

/// The node whose path spells exactly `key`. Missing nodes are created and
/// an edge is split where `key` ends or diverges partway along it.
fn node_for<'a>(
    mut node: &'a mut RadixNode,
    mut key: &[u8],
    usage: &mut Usage,
) -> &'a mut RadixNode {
    loop {
        let Some(&first) = key.first() else {
            return node;
        };
        match node.child_index(first) {
            Err(at) => {
                usage.nodes += 1;
                usage.heap += size_of::<RadixNode>() + key.len();
                usage.track(&mut node.children, children_heap, |children| {
                    children.insert(at, (first, Box::new(RadixNode::new(key.into()))));
                });
                return &mut node.children[at].1;
            }
            Ok(at) => {
                let slot = &mut node.children[at].1;
                // At least 1: the child was found by the first byte.
                let common = common_prefix_len(&slot.label, key);
                if common < slot.label.len() {
                    split_edge(slot, common, usage);
                }
                node = slot;
                key = &key[common..];
            }
        }
    }
}

/// Puts a new node `at` bytes along the edge into `slot`. The new node
/// takes the label's first `at` bytes, and the old node becomes its only
/// child with the rest. The first byte, and so the parent's ordering, is
/// unchanged. The caller attaches subscribers or a second child right
/// away, which keeps the new node justified.
fn split_edge(slot: &mut Box<RadixNode>, at: usize, usage: &mut Usage) {
    let upper: Box<[u8]> = slot.label[..at].into();
    let lower: Box<[u8]> = slot.label[at..].into();
    let lower_first = lower[0];
    let mut old = std::mem::replace(slot, Box::new(RadixNode::new(upper)));
    // The two halves together hold as many label bytes as the old label.
    old.label = lower;
    // Inline capacity is 2, so a single child allocates nothing.
    slot.children.push((lower_first, old));
    usage.nodes += 1;
    usage.heap += size_of::<RadixNode>();
}

/// Replaces `node` (no subscribers, exactly one child) with that child,
/// concatenating their labels. This undoes the `split_edge` that the child's
/// departed sibling once required. The merged node keeps `node`'s first
/// byte, so the grandparent's ordering holds.
fn absorb_only_child(node: &mut RadixNode, usage: &mut Usage) {
    debug_assert!(!node.has_subs() && node.children.len() == 1);
    let freed_children = children_heap(&node.children);
    let (_, child) = node
        .children
        .pop()
        .expect("caller checked there is exactly one child");
    let RadixNode {
        label,
        prefix,
        children,
    } = *child;
    let mut merged = Vec::with_capacity(node.label.len() + label.len());
    merged.extend_from_slice(&node.label);
    merged.extend_from_slice(&label);
    // Label bytes are unchanged in total. The node's own sets were empty and
    // held no heap. The child's sets and children, already counted, move over.
    node.label = merged.into_boxed_slice();
    node.prefix = prefix;
    node.children = children;
    usage.nodes -= 1;
    usage.heap -= freed_children + size_of::<RadixNode>();
}

/// Removes `sub` from prefix `key`. False if the pair was not present, in
/// which case nothing changes. Frees the node if that leaves it with neither
/// subscribers nor children, and merges a node left with no subscribers and
/// one child into that child. Iterative: a loop over nodes, never recursion.
pub(crate) fn remove(root: &mut RadixNode, key: &[u8], sub: SubId, usage: &mut Usage) -> bool {
    if key.is_empty() {
        // The root is never pruned.
        return usage.track(&mut root.prefix, SubSet::heap_bytes, |set| set.remove(sub));
    }
    // Walk with the parent in hand. The path-compression invariant means
    // cleanup never reaches above the target's parent: a non-root parent
    // without subscribers had at least two children, so losing one leaves
    // at least one.
    let mut parent = root;
    let mut parent_is_root = true;
    let mut rest = key;
    loop {
        // `rest` is non-empty: the loop only continues past a shorter label.
        let Ok(at) = parent.child_index(rest[0]) else {
            return false;
        };
        let label = &parent.children[at].1.label;
        if !rest.starts_with(label) {
            return false;
        }
        if label.len() < rest.len() {
            rest = &rest[label.len()..];
            parent = &mut parent.children[at].1;
            parent_is_root = false;
            continue;
        }
        let child = &mut parent.children[at].1;
        if !usage.track(&mut child.prefix, SubSet::heap_bytes, |set| set.remove(sub)) {
            return false;
        }
        if child.has_subs() {
            return true;
        }
        match child.children.len() {
            0 => {
                let freed = child.own_heap();
                usage.track(&mut parent.children, children_heap, |children| {
                    children.remove(at);
                    shrink_children(children);
                });
                usage.nodes -= 1;
                usage.heap -= freed;
                if !parent_is_root && !parent.has_subs() && parent.children.len() == 1 {
                    absorb_only_child(parent, usage);
                }
            }
            1 => absorb_only_child(child, usage),
            _ => {}
        }
        return true;
    }
}

/// Emits the subscribers of every prefix of `topic` held below `root`,
/// `root` included.
pub(crate) fn collect(root: &RadixNode, topic: &[u8], collector: &mut Collector<'_>) {
    let mut node = root;
    let mut rest = topic;
    loop {
        collector.emit(node.prefix.iter());
        let Some(&first) = rest.first() else {
            return;
        };
        let Ok(at) = node.child_index(first) else {
            return;
        };
        let child = &node.children[at].1;
        // A topic that ends or diverges partway along an edge matches nothing
        // below it. Deeper filters all extend this edge's whole label.
        if !rest.starts_with(&child.label) {
            return;
        }
        rest = &rest[child.label.len()..];
        node = child;
    }
}
