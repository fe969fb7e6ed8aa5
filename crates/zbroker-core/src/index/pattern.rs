//! Pattern filters: a segment radix tree, a path-compressed trie over
//! `.`-separated segments whose edges carry one or more whole segments.
//!
//! A node's literal children are keyed by the first segment of their label
//! in [`Literals`]; the child whose label starts with `*` is kept on its
//! own, so a topic follows at most two edges from each node. The index's
//! module docs describe the walk, its bounds, and why only forks recurse.

mod literals;

use std::mem::size_of;

use hashbrown::DefaultHashBuilder;

use super::SubId;
use super::collector::Collector;
use super::prefix::common_prefix_len;
use super::subscriber_set::SubSet;
use super::usage::Usage;
use crate::filter::{ONE_SEGMENT, SEPARATOR, TAIL};

pub(crate) use literals::Literals;
#[cfg(test)]
pub(crate) use literals::{BACK_TO_FEW_LITERALS, MAX_FEW_LITERALS, segment_hash};

/// A node of the path-compressed segment trie.
///
/// Invariants: a non-root node has subscribers in `subs` or `tail`, or at
/// least two children (literal or `*`). Its label is one or more whole
/// pattern segments joined by `.`, none of them `>`. The root's label is
/// empty and means no segment at all; any other empty label is one empty
/// segment. Nothing else would justify a node in a path-compressed tree.
pub(crate) struct PatternNode {
    /// The edge from the parent: the segments this node adds to its
    /// parent's path, `*` included, joined by `.`.
    pub(crate) label: Box<[u8]>,
    /// Children whose label starts with a literal segment. Wildcards never
    /// appear as keys, so a topic segment spelled `*` or `>` looks up
    /// nothing here and goes only through the `*` child, which matches any
    /// one segment.
    pub(crate) literal: Literals,
    /// The child whose label starts with `*`.
    pub(crate) star: Option<Box<PatternNode>>,
    /// Patterns that end at this node.
    pub(crate) subs: SubSet,
    /// Patterns that continue from this node with a final `>`.
    pub(crate) tail: SubSet,
}

/// Dropping a node drops its subtree without recursion: the descendants move
/// onto a heap stack first, so each one is dropped with no children left.
/// However deep the trie, the native stack holds only a frame or two.
impl Drop for PatternNode {
    fn drop(&mut self) {
        if self.child_count() == 0 {
            // Every node freed by `remove` ends here: no stack, no allocation.
            return;
        }
        let mut stack = Vec::new();
        self.move_children_to(&mut stack);
        while let Some(mut node) = stack.pop() {
            node.move_children_to(&mut stack);
        }
    }
}

impl PatternNode {
    pub(crate) fn new(label: Box<[u8]>) -> Self {
        PatternNode {
            label,
            literal: Literals::default(),
            star: None,
            subs: SubSet::default(),
            tail: SubSet::default(),
        }
    }

    pub(crate) fn has_subs(&self) -> bool {
        !self.subs.is_empty() || !self.tail.is_empty()
    }

    pub(crate) fn child_count(&self) -> usize {
        self.literal.len() + usize::from(self.star.is_some())
    }

    #[expect(clippy::vec_box, reason = "see `Literals::drain_into`")]
    fn move_children_to(&mut self, stack: &mut Vec<Box<PatternNode>>) {
        stack.extend(self.star.take());
        self.literal.drain_into(stack);
    }

    /// The child whose label starts with pattern segment `segment` (`*` or
    /// a literal).
    pub(crate) fn child(
        &self,
        segment: &[u8],
        hasher: &DefaultHashBuilder,
    ) -> Option<&PatternNode> {
        if segment == ONE_SEGMENT {
            self.star.as_deref()
        } else {
            self.literal.get(segment, hasher)
        }
    }

    fn child_mut(
        &mut self,
        segment: &[u8],
        hasher: &DefaultHashBuilder,
    ) -> Option<&mut Box<PatternNode>> {
        if segment == ONE_SEGMENT {
            self.star.as_mut()
        } else {
            self.literal.get_mut(segment, hasher)
        }
    }

    /// Adds `child`, whose first segment no other child has, charging any
    /// growth of the child table (the child itself is the caller's to count).
    fn attach(&mut self, child: Box<PatternNode>, hasher: &DefaultHashBuilder, usage: &mut Usage) {
        if split_segment(&child.label).0 == ONE_SEGMENT {
            debug_assert!(self.star.is_none());
            self.star = Some(child);
        } else {
            usage.track(&mut self.literal, Literals::heap_bytes, |literal| {
                literal.insert(child, hasher)
            });
        }
    }

    /// Takes out the child whose label starts with `segment`, charging the
    /// child table's shrinkage (the child itself is the caller's to count).
    fn detach(
        &mut self,
        segment: &[u8],
        hasher: &DefaultHashBuilder,
        usage: &mut Usage,
    ) -> Option<Box<PatternNode>> {
        if segment == ONE_SEGMENT {
            self.star.take()
        } else {
            usage.track(&mut self.literal, Literals::heap_bytes, |literal| {
                literal.remove(segment, hasher)
            })
        }
    }

    /// Heap held by this node when boxed, its descendants excluded.
    pub(crate) fn own_heap(&self) -> usize {
        size_of::<PatternNode>()
            + self.label.len()
            + self.literal.heap_bytes()
            + self.subs.heap_bytes()
            + self.tail.heap_bytes()
    }
}

/// Splits off the first segment. The remainder is `None` after the last
/// one. Every byte string has at least one segment: "" is one empty segment.
pub(crate) fn split_segment(text: &[u8]) -> (&[u8], Option<&[u8]>) {
    match text.iter().position(|&b| b == SEPARATOR) {
        Some(dot) => (&text[..dot], Some(&text[dot + 1..])),
        None => (text, None),
    }
}

/// Whether `label`'s first segment is `segment`.
pub(crate) fn starts_with_segment(label: &[u8], segment: &[u8]) -> bool {
    label.starts_with(segment) && label.get(segment.len()).is_none_or(|&b| b == SEPARATOR)
}

/// Splits a pattern at its first `>` segment: the segments before it (`None`
/// if there are none) and whether there was a `>`. Validation puts `>` only
/// last; insert and remove still stop at the first one wherever it stands,
/// as `Filter::matches` does, so all three agree on any text.
fn split_tail(text: &[u8]) -> (Option<&[u8]>, bool) {
    let mut start = 0;
    loop {
        let end = text[start..]
            .iter()
            .position(|&b| b == SEPARATOR)
            .map_or(text.len(), |dot| start + dot);
        if &text[start..end] == TAIL {
            return (start.checked_sub(1).map(|dot| &text[..dot]), true);
        }
        if end == text.len() {
            return (Some(text), false);
        }
        start = end + 1;
    }
}

/// How pattern segments `rest` continue along an edge labelled `label`
/// whose first segment equals theirs.
enum Along<'a> {
    /// The whole label matches. Holds the segments after it, `None` if the
    /// pattern ends with the label.
    Whole(Option<&'a [u8]>),
    /// Only the label's segments before byte `at`, a separator, match: there
    /// the pattern ends (`None`) or continues with different segments.
    Split { at: usize, rest: Option<&'a [u8]> },
}

/// Compares whole segments exactly (`*` equals only `*`).
fn along<'a>(label: &[u8], rest: &'a [u8]) -> Along<'a> {
    let common = common_prefix_len(label, rest);
    let rest_ends = common == rest.len();
    if common == label.len() && (rest_ends || rest[common] == SEPARATOR) {
        return Along::Whole((!rest_ends).then(|| &rest[common + 1..]));
    }
    if rest_ends && label[common] == SEPARATOR {
        return Along::Split {
            at: common,
            rest: None,
        };
    }
    // They differ inside a segment: split after the last separator both
    // share. There is one, because the first segments are equal and at
    // least one side continues past it (the cases above took the others).
    let at = label[..common]
        .iter()
        .rposition(|&b| b == SEPARATOR)
        .expect("the first segment is shared");
    Along::Split {
        at,
        rest: Some(&rest[at + 1..]),
    }
}

/// The node whose path spells exactly `body` (the root for `None`). Missing
/// nodes are created, and an edge is split where `body` ends or diverges
/// partway along it. Iterative: a loop over nodes, never recursion.
fn node_for<'a>(
    mut node: &'a mut PatternNode,
    body: Option<&[u8]>,
    hasher: &DefaultHashBuilder,
    usage: &mut Usage,
) -> &'a mut PatternNode {
    let Some(mut rest) = body else {
        return node;
    };
    loop {
        let (segment, _) = split_segment(rest);
        if node.child(segment, hasher).is_none() {
            // One new leaf carries every remaining segment.
            usage.nodes += 1;
            usage.heap += size_of::<PatternNode>() + rest.len();
            node.attach(Box::new(PatternNode::new(rest.into())), hasher, usage);
            return node
                .child_mut(segment, hasher)
                .expect("the leaf was just attached");
        }
        let child = node
            .child_mut(segment, hasher)
            .expect("the child was found just above");
        let next = match along(&child.label, rest) {
            Along::Whole(next) => next,
            Along::Split { at, rest } => {
                split_edge(child, at, hasher, usage);
                rest
            }
        };
        match next {
            None => return child,
            Some(next) => {
                node = child;
                rest = next;
            }
        }
    }
}

/// Puts a new node at the separator `at` bytes along the edge into `slot`.
/// The new node takes the segments before it, and the old node becomes its
/// only child with the segments after it. The first segment, and so the
/// parent's key for the slot, is unchanged. The caller attaches subscribers
/// or a second child right away, which keeps the new node justified.
fn split_edge(
    slot: &mut Box<PatternNode>,
    at: usize,
    hasher: &DefaultHashBuilder,
    usage: &mut Usage,
) {
    let upper: Box<[u8]> = slot.label[..at].into();
    let lower: Box<[u8]> = slot.label[at + 1..].into();
    let mut old = std::mem::replace(slot, Box::new(PatternNode::new(upper)));
    old.label = lower;
    // Inline capacity is 1, so a single child allocates nothing; `attach`
    // charges it all the same.
    slot.attach(old, hasher, usage);
    usage.nodes += 1;
    // The two halves hold the old label's bytes but the separator between.
    usage.heap += size_of::<PatternNode>();
    usage.heap -= 1;
}

/// Replaces `node` (no subscribers, exactly one child) with that child,
/// joining their labels with a separator. This undoes the `split_edge` that
/// the child's departed sibling once required. The merged node keeps
/// `node`'s first segment, so the parent's key holds.
fn absorb_only_child(node: &mut PatternNode, usage: &mut Usage) {
    debug_assert!(!node.has_subs() && node.child_count() == 1);
    let freed_table = node.literal.heap_bytes();
    let mut child = match node.star.take() {
        Some(child) => child,
        // The emptied child table goes with it, already measured above.
        None => match std::mem::take(&mut node.literal) {
            Literals::Few(mut children) => children.pop(),
            Literals::Many(children) => children.into_iter().next(),
        }
        .map(|(_, child)| child)
        .expect("caller checked there is exactly one child"),
    };
    let mut merged = Vec::with_capacity(node.label.len() + 1 + child.label.len());
    merged.extend_from_slice(&node.label);
    merged.push(SEPARATOR);
    merged.extend_from_slice(&child.label);
    // The node's own sets were empty and held no heap. The child's sets and
    // children, already counted, move over; what is left of the child (its
    // label and the box) is freed when it drops here, with no children.
    node.label = merged.into_boxed_slice();
    node.subs = std::mem::take(&mut child.subs);
    node.tail = std::mem::take(&mut child.tail);
    node.literal = std::mem::take(&mut child.literal);
    node.star = child.star.take();
    usage.nodes -= 1;
    // Label bytes grow by the one separator.
    usage.heap += 1;
    usage.heap -= freed_table + size_of::<PatternNode>();
}

/// Adds `sub` under pattern `text`. False if the pair was already present,
/// in which case nothing changes.
pub(crate) fn insert(
    root: &mut PatternNode,
    text: &[u8],
    sub: SubId,
    hasher: &DefaultHashBuilder,
    usage: &mut Usage,
) -> bool {
    // A duplicate pair finds its node already in place, so a false result
    // never leaves freshly created nodes behind.
    let (body, tail) = split_tail(text);
    let node = node_for(root, body, hasher, usage);
    let set = if tail { &mut node.tail } else { &mut node.subs };
    usage.track(set, SubSet::heap_bytes, |set| set.insert(sub))
}

/// Removes `sub` from pattern `text`. False if the pair was not present, in
/// which case nothing changes.
///
/// Iterative, like `prefix::remove`: it walks with the parent in hand, and
/// path compression means cleanup never reaches above the target's parent.
/// A non-root parent without subscribers had at least two children, so
/// losing one leaves it at least one; if exactly one, it merges into it.
pub(crate) fn remove(
    root: &mut PatternNode,
    text: &[u8],
    sub: SubId,
    hasher: &DefaultHashBuilder,
    usage: &mut Usage,
) -> bool {
    let (body, tail) = split_tail(text);
    let Some(mut rest) = body else {
        // The root is never pruned.
        let set = if tail { &mut root.tail } else { &mut root.subs };
        return usage.track(set, SubSet::heap_bytes, |set| set.remove(sub));
    };
    let mut parent = root;
    let mut parent_is_root = true;
    loop {
        let (segment, _) = split_segment(rest);
        let Some(child) = parent.child(segment, hasher) else {
            return false;
        };
        let Along::Whole(next) = along(&child.label, rest) else {
            return false;
        };
        if let Some(next) = next {
            parent = parent
                .child_mut(segment, hasher)
                .expect("the child was found just above");
            parent_is_root = false;
            rest = next;
            continue;
        }
        let child = parent
            .child_mut(segment, hasher)
            .expect("the child was found just above");
        let set = if tail {
            &mut child.tail
        } else {
            &mut child.subs
        };
        if !usage.track(set, SubSet::heap_bytes, |set| set.remove(sub)) {
            return false;
        }
        if child.has_subs() {
            return true;
        }
        match child.child_count() {
            0 => {
                let freed = parent
                    .detach(segment, hasher, usage)
                    .expect("the child was found just above");
                usage.nodes -= 1;
                usage.heap -= freed.own_heap();
                if !parent_is_root && !parent.has_subs() && parent.child_count() == 1 {
                    absorb_only_child(parent, usage);
                }
            }
            1 => absorb_only_child(child, usage),
            _ => {}
        }
        return true;
    }
}

/// How a topic continues along an edge.
enum Follow<'t> {
    /// A label segment differs, or the topic ends before the label does.
    Mismatch,
    /// The topic ends exactly where the label does.
    End,
    /// The label matches; the topic's segments after it.
    More(&'t [u8]),
}

/// Follows `label` (one or more segments) along `topic` (one or more): a
/// `*` segment matches any one topic segment, a literal segment only
/// itself. A run of literal segments is compared as one byte string: it
/// matches exactly when the topic starts with the same bytes followed by a
/// separator or its end. Adds its work to `steps`: one per `*` segment and
/// per literal run, and one per 8 bytes of a run.
fn follow_label<'t>(mut label: &[u8], mut topic: &'t [u8], steps: &mut usize) -> Follow<'t> {
    loop {
        let (label_next, topic_next) = if starts_with_segment(label, ONE_SEGMENT) {
            *steps += 1;
            (label.get(2..), split_segment(topic).1)
        } else {
            let run = literal_run_len(label);
            *steps += 1 + run / 8;
            if !topic.starts_with(&label[..run]) {
                return Follow::Mismatch;
            }
            let topic_next = match topic.get(run) {
                None => None,
                Some(&SEPARATOR) => Some(&topic[run + 1..]),
                // The topic's segment goes on past the label's.
                Some(_) => return Follow::Mismatch,
            };
            (label.get(run + 1..), topic_next)
        };
        match (label_next, topic_next) {
            (None, None) => return Follow::End,
            (None, Some(next)) => return Follow::More(next),
            (Some(_), None) => return Follow::Mismatch,
            (Some(label_next), Some(next)) => {
                label = label_next;
                topic = next;
            }
        }
    }
}

/// Bytes of the literal segments `label` starts with: up to the separator
/// before its first `*` segment, or all of it. `label` does not start with
/// a `*` segment, so any other one follows a separator.
fn literal_run_len(label: &[u8]) -> usize {
    // Word-at-a-time search: most labels hold no `*` at all.
    if !label.contains(&b'*') {
        return label.len();
    }
    let mut from = 0;
    while let Some(found) = label[from..].windows(2).position(|pair| pair == b".*") {
        let dot = from + found;
        if label.get(dot + 2).is_none_or(|&b| b == SEPARATOR) {
            return dot;
        }
        from = dot + 1;
    }
    label.len()
}

/// Emits the pattern subscribers matching `rest` (at least one segment)
/// below `node`, and adds its work to `steps` (see `follow_label`).
pub(crate) fn collect(
    mut node: &PatternNode,
    mut rest: &[u8],
    hasher: &DefaultHashBuilder,
    collector: &mut Collector<'_>,
    steps: &mut usize,
) {
    loop {
        // `rest` holds at least one more segment, which is all `>` needs.
        collector.emit(node.tail.iter());
        let (segment, topic_next) = split_segment(rest);
        // Each lookup matches its child's first label segment: the `*`
        // child's matches any topic segment, a literal child's equals it.
        let mut onward = node
            .star
            .as_deref()
            .and_then(|star| follow_child(star, ONE_SEGMENT.len(), topic_next, collector, steps));
        if let Some(literal) = node.literal.get(segment, hasher)
            && let Some(next) = follow_child(literal, segment.len(), topic_next, collector, steps)
            && let Some((star, star_rest)) = onward.replace(next)
        {
            // Only a fork needs the stack, and only for the `*` side: a
            // single path continues in the loop, so patterns without forks
            // never recurse.
            collect(star, star_rest, hasher, collector, steps);
        }
        let Some((next_node, next_rest)) = onward else {
            return;
        };
        node = next_node;
        rest = next_rest;
    }
}

/// Follows the rest of `child`'s label, whose first segment (`first_len`
/// bytes) has matched the topic's, along the topic's remaining segments
/// `topic_next`. Emits the child's `subs` if the topic ends with the label;
/// returns the child and the topic's segments after the label if it goes on.
#[inline(always)]
fn follow_child<'n, 't>(
    child: &'n PatternNode,
    first_len: usize,
    topic_next: Option<&'t [u8]>,
    collector: &mut Collector<'_>,
    steps: &mut usize,
) -> Option<(&'n PatternNode, &'t [u8])> {
    *steps += 1;
    let follow = match (child.label.get(first_len + 1..), topic_next) {
        (None, None) => Follow::End,
        (None, Some(next)) => Follow::More(next),
        (Some(_), None) => Follow::Mismatch,
        (Some(label), Some(next)) => follow_label(label, next, steps),
    };
    match follow {
        Follow::Mismatch => None,
        Follow::End => {
            collector.emit(child.subs.iter());
            None
        }
        Follow::More(next) => Some((child, next)),
    }
}
