//! The routing index: every subscriber's filters in one structure, answering
//! "who wants this topic?" without looking at anyone who does not.
//!
//! Modeled on the NATS server's sublist. Three structures share one index:
//!
//! * **Exact filters** live in a hash map keyed by topic: one hash of the
//!   topic finds them, whatever else the index holds.
//!
//! * **Prefix filters** live in a byte-level radix tree (a path-compressed
//!   trie with a node only where filters branch or end). A topic walks the
//!   tree from the root along the single path its bytes spell. Every node it
//!   reaches is a prefix of the topic, so its subscribers match (the root,
//!   the empty prefix, matches every topic). Children are kept sorted by the
//!   first byte of their edge label, so each step is a binary search over at
//!   most 256 entries.
//!
//! * **Pattern filters** live in a segment trie over `.`-separated segments.
//!   Each node has literal children in a hash map keyed by segment, an
//!   optional `*` child, a `subs` set (patterns ending at the node) and a
//!   `tail` set (patterns whose next and last segment is `>`). A topic
//!   follows, for each of its segments, at most two edges: the literal child
//!   named by that segment and the `*` child. Every node reached emits its
//!   `tail` set while at least one topic segment remains, since `>` needs
//!   one or more segments. The nodes reached after the last segment emit
//!   their `subs` sets.
//!
//! # Cost model
//!
//! A match costs one hash of the topic for exact filters, and O(topic
//! length) for the radix walk, because the label comparisons along the one
//! path add up to at most the topic's bytes. The number of radix nodes on
//! that path is the number of places where held prefixes branch *along the
//! topic*: many prefixes that share the topic's leading bytes and diverge
//! after them (a million ids under `neutron.port.`) add a node per
//! branching byte, a handful for a million, never more than the topic's
//! length. The
//! pattern walk costs one hash lookup per visited node, and every visited
//! node is a distinct pattern prefix that matches the topic's leading
//! segments. Emitting costs one step per matching (filter, subscriber)
//! pair, so a subscriber matched by three filters costs three steps and is
//! reported once.
//!
//! Nothing else is touched. Subscriptions under another first byte, a
//! diverging edge label, another literal segment, or deeper than the topic
//! reaches are never visited, and neither are subscribers hanging off nodes
//! the walk does not emit. A million unrelated subscriptions therefore leave
//! a match's cost unchanged; the only things that grow with them are the
//! branch search at a node (a binary search in the radix tree, an expected
//! constant-time hash lookup for patterns) and, for prefixes that share the
//! topic's leading bytes, the branching nodes described above. The one kind of non-matching
//! subscription that does cost anything is a pattern sharing a matching
//! prefix with the topic (`a.*.x` against `a.b.y`). The walk passes through
//! its nodes, but never through its subscribers, and the cost is bounded by
//! the topic's segments and the patterns' shape, not by how many subscribe.
//!
//! A subscriber found through several of its filters is reported once:
//! each match stamps the subscriber's slot in a dense array with a
//! per-call epoch, so no set or sort is built per call. [`RoutingIndex::matches`]
//! allocates nothing once the caller's output vector has grown to size.
//!
//! # Memory
//!
//! Removal frees every node left with neither subscribers nor children. It
//! merges a radix node left with no subscribers and a single child back
//! into that child, and it shrinks child tables and subscriber sets that
//! have become mostly empty. After every pair has been removed, the index is
//! back to its two fixed roots and holds no heap memory (the stamp array
//! aside, see [`RoutingIndex::heap_bytes`]).
//!
//! Recursion is used only along pattern segments: for `*` branches while
//! matching, and on removal. Its depth is bounded by the segment count of
//! the topic or filter, which the broker's length limits keep to a few
//! thousand.

use std::fmt;
use std::mem::size_of;

use hashbrown::{HashMap, HashSet};
use smallvec::SmallVec;

use crate::filter::{Filter, FilterKind, ONE_SEGMENT, SEPARATOR, TAIL};

/// Dense subscriber handle: a slot number in the broker's subscriber table.
///
/// The index keeps one stamp word per slot up to the largest id it has seen,
/// so ids should be small and reused, not random.
pub type SubId = u32;

/// The routing index over all subscribers' filters.
///
/// Invariants the operations keep:
/// * it holds each (filter, subscriber) pair at most once;
/// * [`matches`](Self::matches) reports exactly the subscribers that have at
///   least one filter `f` with `f.matches(topic)` ([`Filter::matches`] is the
///   specification), each once;
/// * after every pair has been removed, [`node_count`](Self::node_count) and
///   [`heap_bytes`](Self::heap_bytes) are back to a fresh index's values
///   (2 nodes and 0 bytes).
pub struct RoutingIndex {
    /// Exact filters by topic.
    exact: HashMap<Box<[u8]>, SubSet>,
    /// Root of the prefix radix tree; its label is always empty and it is
    /// never pruned or merged.
    radix: RadixNode,
    /// Root of the pattern segment trie; never pruned.
    patterns: PatternNode,
    /// Per-subscriber stamp of the last `matches` call that reported it.
    seen: Vec<u32>,
    /// Stamp of the current (or last) `matches` call; never 0 after the first
    /// call, so the zeroed slots of a fresh or freshly grown array never
    /// collide with it.
    epoch: u32,
    /// (filter, subscriber) pairs held.
    pairs: usize,
    usage: Usage,
}

/// Nodes of a fresh index: the radix root and the pattern root.
const EMPTY_NODE_COUNT: usize = 2;

impl Default for RoutingIndex {
    /// Same as [`RoutingIndex::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for RoutingIndex {
    /// A summary, not the contents: the whole trie would be unreadable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoutingIndex")
            .field("len", &self.pairs)
            .field("node_count", &self.usage.nodes)
            .field("heap_bytes", &self.usage.heap)
            .finish_non_exhaustive()
    }
}

impl RoutingIndex {
    /// An empty index: no pairs, two root nodes, no heap memory.
    pub fn new() -> Self {
        RoutingIndex {
            exact: HashMap::new(),
            radix: RadixNode::new(Box::default()),
            patterns: PatternNode::default(),
            seen: Vec::new(),
            epoch: 0,
            pairs: 0,
            usage: Usage {
                nodes: EMPTY_NODE_COUNT,
                heap: 0,
            },
        }
    }

    /// Adds `sub` under `filter`. Returns true if the pair was added, false
    /// if it was already present, in which case nothing changes.
    ///
    /// Costs O(filter length), plus amortized growth of the stamp array to
    /// cover `sub`.
    pub fn insert(&mut self, filter: &Filter, sub: SubId) -> bool {
        let usage = &mut self.usage;
        let added = match filter.kind() {
            FilterKind::Pattern => pattern_insert(&mut self.patterns, filter.text(), sub, usage),
            FilterKind::Exact => exact_insert(&mut self.exact, filter.text(), sub, usage),
            FilterKind::Prefix => {
                // A duplicate pair finds its node already in place, so a false
                // result never leaves freshly created nodes behind.
                let node = radix_node_for(&mut self.radix, filter.text(), usage);
                usage.track(&mut node.prefix, SubSet::heap_bytes, |set| set.insert(sub))
            }
        };
        if added {
            self.pairs += 1;
            let slot = sub as usize;
            if slot >= self.seen.len() {
                // Zero is never the live epoch, so new slots start unstamped.
                self.seen.resize(slot + 1, 0);
            }
        }
        added
    }

    /// Removes the pair. Returns true if it was present, false if not (then
    /// nothing changes).
    ///
    /// Frees every node the removal leaves without subscribers or children.
    /// It also merges a radix node left with no subscribers and one child
    /// into that child, so the structure looks as if the pair had never been
    /// inserted. Costs O(filter length) plus expected O(1) in the filter's
    /// subscriber set, even when thousands of subscribers share the filter.
    /// The cost does not grow with the number of subscribers.
    pub fn remove(&mut self, filter: &Filter, sub: SubId) -> bool {
        let usage = &mut self.usage;
        let removed = match filter.kind() {
            FilterKind::Pattern => pattern_remove(&mut self.patterns, filter.text(), sub, usage),
            FilterKind::Exact => exact_remove(&mut self.exact, filter.text(), sub, usage),
            FilterKind::Prefix => radix_remove(&mut self.radix, filter.text(), sub, usage),
        };
        if removed {
            self.pairs -= 1;
        }
        removed
    }

    /// Clears `out`, then pushes every subscriber that has at least one
    /// filter matching `topic`, each exactly once, in unspecified order.
    ///
    /// Agrees with [`Filter::matches`] over all held pairs. Costs O(topic
    /// length + matching pairs), plus one hash lookup per pattern-trie node
    /// whose pattern prefix matches the topic's leading segments. It is
    /// independent of the number of subscriptions that do not match (see
    /// the module docs). It allocates only when `out` must grow.
    pub fn matches(&mut self, topic: &[u8], out: &mut Vec<SubId>) {
        out.clear();
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            // Stale stamps from 2^32 calls ago could equal the new epoch.
            self.seen.fill(0);
            self.epoch = 1;
        }
        let mut collector = Collector {
            seen: &mut self.seen,
            epoch: self.epoch,
            out,
        };
        if let Some(set) = self.exact.get(topic) {
            collector.emit(set);
        }
        radix_collect(&self.radix, topic, &mut collector);
        pattern_collect(&self.patterns, topic, &mut collector);
    }

    /// Number of (filter, subscriber) pairs held.
    pub fn len(&self) -> usize {
        self.pairs
    }

    /// True if no pair is held.
    pub fn is_empty(&self) -> bool {
        self.pairs == 0
    }

    /// Trie nodes currently allocated, the two roots included: an empty index
    /// reports 2 (the radix root and the pattern root).
    pub fn node_count(&self) -> usize {
        self.usage.nodes
    }

    /// Approximate heap bytes held by nodes, edge labels, child tables and
    /// subscriber sets, kept as a running count, so reading it is O(1).
    ///
    /// The count is the sum of the sizes requested from the allocator,
    /// without allocator overhead. It leaves out the dedup stamp array (4
    /// bytes per slot up to the largest [`SubId`] ever inserted), which is
    /// sized like the broker's subscriber table and kept for reuse. An empty
    /// index reports 0, because the roots live inline in the index, and the
    /// count returns to 0 once every pair has been removed.
    pub fn heap_bytes(&self) -> usize {
        self.usage.heap
    }
}

/// Running totals behind `node_count` and `heap_bytes`, updated by every
/// structural change so neither needs a walk.
struct Usage {
    nodes: usize,
    heap: usize,
}

impl Usage {
    /// Runs `op` on `target` and charges the change in `measure(target)`. A
    /// container's growth and shrinkage are decided inside the collection, so
    /// measuring both sides is the only exact way to account for it.
    fn track<T: ?Sized, R>(
        &mut self,
        target: &mut T,
        measure: impl Fn(&T) -> usize,
        op: impl FnOnce(&mut T) -> R,
    ) -> R {
        let before = measure(target);
        let result = op(target);
        // `heap` already includes `before`, so this cannot underflow.
        self.heap = self.heap + measure(target) - before;
        result
    }
}

/// Feeds subscriber sets into the output, dropping repeats within one call.
struct Collector<'a> {
    seen: &'a mut [u32],
    epoch: u32,
    out: &'a mut Vec<SubId>,
}

impl Collector<'_> {
    fn emit(&mut self, set: &SubSet) {
        for sub in set.iter() {
            // `insert` grows `seen` to cover every id the index holds.
            let stamp = &mut self.seen[sub as usize];
            if *stamp != self.epoch {
                *stamp = self.epoch;
                self.out.push(sub);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Subscriber sets
// ---------------------------------------------------------------------------

/// Ids kept inline before a small set spills to the heap.
const INLINE_SUBS: usize = 4;
/// Largest size of the linear-scan representation. Past it, a hash set is
/// used, so that one filter shared by thousands of subscribers still
/// inserts and removes in O(1).
const MAX_SMALL_SUBS: usize = 16;
/// A hash set that shrinks to this size goes back to the linear form. The
/// gap below `MAX_SMALL_SUBS` keeps a set hovering at the threshold from
/// converting back and forth on every call.
const BACK_TO_SMALL: usize = MAX_SMALL_SUBS / 2;

/// The subscribers attached to one filter position.
///
/// Invariant: an empty set owns no heap memory. `absorb_only_child` relies on
/// this when it overwrites a node's empty sets without uncharging them. It
/// is also why a drained index reports 0 bytes.
enum SubSet {
    Small(SmallVec<[SubId; INLINE_SUBS]>),
    /// Boxed so the common small case keeps nodes compact.
    Large(Box<HashSet<SubId>>),
}

impl Default for SubSet {
    fn default() -> Self {
        SubSet::Small(SmallVec::new())
    }
}

impl SubSet {
    fn len(&self) -> usize {
        match self {
            SubSet::Small(ids) => ids.len(),
            SubSet::Large(ids) => ids.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// False if `sub` was already present.
    fn insert(&mut self, sub: SubId) -> bool {
        match self {
            SubSet::Small(ids) => {
                if ids.contains(&sub) {
                    return false;
                }
                if ids.len() < MAX_SMALL_SUBS {
                    ids.push(sub);
                } else {
                    let mut large = HashSet::with_capacity(ids.len() + 1);
                    large.extend(ids.iter().copied());
                    large.insert(sub);
                    *self = SubSet::Large(Box::new(large));
                }
                true
            }
            SubSet::Large(ids) => ids.insert(sub),
        }
    }

    /// False if `sub` was not present.
    fn remove(&mut self, sub: SubId) -> bool {
        match self {
            SubSet::Small(ids) => {
                let Some(at) = ids.iter().position(|&id| id == sub) else {
                    return false;
                };
                ids.swap_remove(at);
                // Going inline once the ids fit gives the empty set no heap.
                if ids.spilled() && (ids.len() <= INLINE_SUBS || ids.len() * 4 <= ids.capacity()) {
                    ids.shrink_to_fit();
                }
                true
            }
            SubSet::Large(ids) => {
                if !ids.remove(&sub) {
                    return false;
                }
                if ids.len() <= BACK_TO_SMALL {
                    *self = SubSet::Small(ids.iter().copied().collect());
                } else if ids.len() * 4 <= ids.capacity() {
                    // Hash tables never shrink on their own. Iteration is
                    // O(capacity), so a drained table would also slow matching.
                    ids.shrink_to(ids.len() * 2);
                }
                true
            }
        }
    }

    fn iter(&self) -> SubIter<'_> {
        match self {
            SubSet::Small(ids) => SubIter::Small(ids.iter()),
            SubSet::Large(ids) => SubIter::Large(ids.iter()),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            SubSet::Small(ids) if ids.spilled() => ids.capacity() * size_of::<SubId>(),
            SubSet::Small(_) => 0,
            SubSet::Large(ids) => size_of::<HashSet<SubId>>() + ids.allocation_size(),
        }
    }
}

enum SubIter<'a> {
    Small(std::slice::Iter<'a, SubId>),
    Large(hashbrown::hash_set::Iter<'a, SubId>),
}

impl Iterator for SubIter<'_> {
    type Item = SubId;

    fn next(&mut self) -> Option<SubId> {
        match self {
            SubIter::Small(ids) => ids.next().copied(),
            SubIter::Large(ids) => ids.next().copied(),
        }
    }
}

// ---------------------------------------------------------------------------
// Exact and prefix filters: byte-level radix tree
// ---------------------------------------------------------------------------

/// Children keyed by the first byte of their label, sorted by it. The key is
/// duplicated beside the pointer so that a binary search stays within one
/// contiguous array instead of chasing two pointers per probe.
type RadixChildren = SmallVec<[(u8, Box<RadixNode>); 2]>;

/// Invariants: a non-root node has a non-empty label and either subscribers
/// or at least two children. Nothing else would justify a node in a
/// path-compressed tree.
struct RadixNode {
    /// The edge from the parent: the bytes this node adds to its parent's
    /// path.
    label: Box<[u8]>,
    /// Subscribers of the prefix this node's path spells.
    prefix: SubSet,
    children: RadixChildren,
}

impl RadixNode {
    fn new(label: Box<[u8]>) -> Self {
        RadixNode {
            label,
            prefix: SubSet::default(),
            children: SmallVec::new(),
        }
    }

    fn has_subs(&self) -> bool {
        !self.prefix.is_empty()
    }

    /// `Ok(index)` of the child whose label starts with `byte`, or
    /// `Err(insertion point)`.
    fn child_index(&self, byte: u8) -> Result<usize, usize> {
        self.children
            .binary_search_by_key(&byte, |&(first, _)| first)
    }

    /// Heap held by this node when boxed, its descendants excluded.
    fn own_heap(&self) -> usize {
        size_of::<RadixNode>()
            + self.label.len()
            + children_heap(&self.children)
            + self.prefix.heap_bytes()
    }
}

// ---------------------------------------------------------------------------
// Exact filters: hash map
// ---------------------------------------------------------------------------

/// Heap of the exact map's table (entries and control bytes), keys and sets
/// excluded.
fn exact_table_heap(map: &HashMap<Box<[u8]>, SubSet>) -> usize {
    map.allocation_size()
}

fn exact_insert(
    map: &mut HashMap<Box<[u8]>, SubSet>,
    topic: &[u8],
    sub: SubId,
    usage: &mut Usage,
) -> bool {
    if let Some(set) = map.get_mut(topic) {
        return usage.track(set, SubSet::heap_bytes, |set| set.insert(sub));
    }
    let mut set = SubSet::default();
    set.insert(sub);
    usage.heap += topic.len() + set.heap_bytes();
    usage.track(map, exact_table_heap, |map| map.insert(topic.into(), set));
    true
}

fn exact_remove(
    map: &mut HashMap<Box<[u8]>, SubSet>,
    topic: &[u8],
    sub: SubId,
    usage: &mut Usage,
) -> bool {
    let Some(set) = map.get_mut(topic) else {
        return false;
    };
    if !usage.track(set, SubSet::heap_bytes, |set| set.remove(sub)) {
        return false;
    }
    if set.is_empty() {
        usage.heap -= topic.len();
        usage.track(map, exact_table_heap, |map| {
            map.remove(topic);
            // Give the table back once it is mostly empty.
            if map.len() * 4 < map.capacity() {
                map.shrink_to(map.len() * 2);
            }
        });
    }
    true
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

fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The node whose path spells exactly `key`. Missing nodes are created and
/// an edge is split where `key` ends or diverges partway along it.
fn radix_node_for<'a>(
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

fn radix_remove(root: &mut RadixNode, key: &[u8], sub: SubId, usage: &mut Usage) -> bool {
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

fn radix_collect(root: &RadixNode, topic: &[u8], collector: &mut Collector<'_>) {
    let mut node = root;
    let mut rest = topic;
    loop {
        collector.emit(&node.prefix);
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

// ---------------------------------------------------------------------------
// Pattern filters: segment trie
// ---------------------------------------------------------------------------

/// Invariant: a non-root node has subscribers in `subs` or `tail`, or at
/// least one child.
#[derive(Default)]
struct PatternNode {
    /// Children for literal segments. Wildcard segments never appear as keys,
    /// so a topic segment spelled `*` or `>` looks up nothing here and goes
    /// only through the `*` child, which matches any one segment.
    literal: HashMap<Box<[u8]>, Box<PatternNode>>,
    star: Option<Box<PatternNode>>,
    /// Patterns that end at this node.
    subs: SubSet,
    /// Patterns that continue from this node with a final `>`.
    tail: SubSet,
}

impl PatternNode {
    fn is_empty(&self) -> bool {
        self.subs.is_empty()
            && self.tail.is_empty()
            && self.literal.is_empty()
            && self.star.is_none()
    }

    /// Heap held by this node when boxed, its descendants excluded (their
    /// keys are the parent's: they live in its map).
    fn own_heap(&self) -> usize {
        size_of::<PatternNode>()
            + literal_heap(&self.literal)
            + self.literal.keys().map(|key| key.len()).sum::<usize>()
            + self.subs.heap_bytes()
            + self.tail.heap_bytes()
    }

    /// The child for pattern segment `segment` (`*` or a literal), created if
    /// missing.
    fn child_or_insert(&mut self, segment: &[u8], usage: &mut Usage) -> &mut PatternNode {
        if segment == ONE_SEGMENT {
            if self.star.is_none() {
                usage.nodes += 1;
                usage.heap += size_of::<PatternNode>();
            }
            return self.star.get_or_insert_with(Box::default);
        }
        if !self.literal.contains_key(segment) {
            usage.nodes += 1;
            usage.heap += size_of::<PatternNode>() + segment.len();
            usage.track(&mut self.literal, literal_heap, |literal| {
                literal.insert(segment.into(), Box::default())
            });
        }
        self.literal
            .get_mut(segment)
            .expect("the child was inserted just above if it was missing")
    }
}

fn literal_heap(literal: &HashMap<Box<[u8]>, Box<PatternNode>>) -> usize {
    literal.allocation_size()
}

/// Splits off the first segment. The remainder is `None` after the last
/// one. Every byte string has at least one segment: "" is one empty segment.
fn split_segment(text: &[u8]) -> (&[u8], Option<&[u8]>) {
    match text.iter().position(|&b| b == SEPARATOR) {
        Some(dot) => (&text[..dot], Some(&text[dot + 1..])),
        None => (text, None),
    }
}

// Validation puts `>` only last. Insert and remove still stop at the first
// `>` wherever it stands, as `Filter::matches` does, so all three agree on
// any text.
fn pattern_insert(root: &mut PatternNode, text: &[u8], sub: SubId, usage: &mut Usage) -> bool {
    let mut node = root;
    let mut rest = text;
    loop {
        let (segment, next) = split_segment(rest);
        if segment == TAIL {
            return usage.track(&mut node.tail, SubSet::heap_bytes, |set| set.insert(sub));
        }
        node = node.child_or_insert(segment, usage);
        match next {
            Some(next) => rest = next,
            None => {
                return usage.track(&mut node.subs, SubSet::heap_bytes, |set| set.insert(sub));
            }
        }
    }
}

/// Recursive so that every node on the path can drop its child once the
/// child is left empty. The depth is the filter's segment count.
fn pattern_remove(node: &mut PatternNode, text: &[u8], sub: SubId, usage: &mut Usage) -> bool {
    let (segment, next) = split_segment(text);
    if segment == TAIL {
        return usage.track(&mut node.tail, SubSet::heap_bytes, |set| set.remove(sub));
    }
    let child = if segment == ONE_SEGMENT {
        node.star.as_deref_mut()
    } else {
        node.literal.get_mut(segment).map(|child| &mut **child)
    };
    let Some(child) = child else {
        return false;
    };
    let removed = match next {
        Some(next) => pattern_remove(child, next, sub, usage),
        None => usage.track(&mut child.subs, SubSet::heap_bytes, |set| set.remove(sub)),
    };
    if !removed || !child.is_empty() {
        return removed;
    }
    let freed = if segment == ONE_SEGMENT {
        node.star.take()
    } else {
        usage.heap -= segment.len();
        usage.track(&mut node.literal, literal_heap, |literal| {
            let freed = literal.remove(segment);
            if literal.len() * 4 <= literal.capacity() {
                // Tables never shrink on their own. Shrinking to zero entries
                // frees the allocation entirely.
                literal.shrink_to(literal.len() * 2);
            }
            freed
        })
    };
    let freed = freed.expect("the child was found above");
    usage.nodes -= 1;
    usage.heap -= freed.own_heap();
    true
}

fn pattern_collect(mut node: &PatternNode, mut rest: &[u8], collector: &mut Collector<'_>) {
    loop {
        // `rest` holds at least one more segment, which is all `>` needs.
        collector.emit(&node.tail);
        let (segment, next) = split_segment(rest);
        let literal = node.literal.get(segment).map(|child| &**child);
        let star = node.star.as_deref();
        let Some(next) = next else {
            for child in [literal, star].into_iter().flatten() {
                collector.emit(&child.subs);
            }
            return;
        };
        rest = next;
        // Only a fork needs the stack. A single path continues in the loop,
        // so literal-only patterns never recurse.
        node = match (literal, star) {
            (Some(literal), Some(star)) => {
                pattern_collect(star, next, collector);
                literal
            }
            (Some(only), None) | (None, Some(only)) => only,
            (None, None) => return,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

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

    fn pattern_census(node: &PatternNode, is_root: bool, census: &mut Census) {
        census.nodes += 1;
        census.pairs += node.subs.len() + node.tail.len();
        census.heap += if is_root {
            node.own_heap() - size_of::<PatternNode>()
        } else {
            node.own_heap()
        };
        assert!(
            is_root || !node.is_empty(),
            "empty pattern node left behind"
        );
        for (key, child) in &node.literal {
            assert!(
                &**key != ONE_SEGMENT && &**key != TAIL,
                "wildcard as literal key"
            );
            pattern_census(child, false, census);
        }
        if let Some(star) = &node.star {
            pattern_census(star, false, census);
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
        fn pattern(node: &PatternNode) {
            set_census(&node.subs);
            set_census(&node.tail);
            node.literal.values().for_each(|child| pattern(child));
            node.star.iter().for_each(|child| pattern(child));
        }
        radix(&index.radix);
        pattern(&index.patterns);
        index.exact.values().for_each(set_census);
    }

    /// Checks the structural invariants and that the running totals equal a
    /// full recount.
    fn audit(index: &RoutingIndex) {
        let mut census = Census {
            nodes: 0,
            heap: 0,
            pairs: 0,
        };
        radix_census(&index.radix, true, &mut census);
        pattern_census(&index.patterns, true, &mut census);
        census.heap += exact_table_heap(&index.exact);
        for (topic, set) in &index.exact {
            assert!(!set.is_empty(), "empty exact entry left behind");
            census.heap += topic.len() + set.heap_bytes();
            census.pairs += set.len();
        }
        sets_census(index);
        assert_eq!(index.node_count(), census.nodes, "node count drifted");
        assert_eq!(index.heap_bytes(), census.heap, "heap accounting drifted");
        assert_eq!(index.len(), census.pairs, "pair count drifted");
    }

    fn assert_baseline(index: &RoutingIndex) {
        let fresh = RoutingIndex::new();
        assert_eq!(index.len(), 0);
        assert!(index.is_empty());
        assert_eq!(index.node_count(), fresh.node_count());
        assert_eq!(index.heap_bytes(), fresh.heap_bytes());
        audit(index);
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

    #[test]
    fn fresh_index_is_two_roots_and_no_heap() {
        let index = RoutingIndex::default();
        assert_eq!(index.node_count(), 2);
        assert_eq!(index.heap_bytes(), 0);
        assert!(index.is_empty());
        audit(&index);
    }

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

    fn random_text(rng: &mut Rng, tokens: &[&str], max_tokens: usize) -> String {
        let n = rng.below(max_tokens + 1);
        (0..n).map(|_| rng.pick(tokens)).collect()
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

    /// Pushes the pair unless present; true if it was a duplicate.
    fn index_insert_unique(pairs: &mut Vec<(Filter, SubId)>, f: Filter, sub: SubId) -> bool {
        if pairs.iter().any(|(g, s)| *g == f && *s == sub) {
            return true;
        }
        pairs.push((f, sub));
        false
    }

    fn differential(seed: u64, operations: usize) {
        let mut rng = Rng(seed);
        let tokens = ["a", "b", "ab", ".", ".", "*", ">"];
        let mut index = RoutingIndex::new();
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

    #[test]
    fn differential_against_filter_matches() {
        for seed in 1..=8u64 {
            differential(seed.wrapping_mul(0x2545_F491_4F6C_DD1D), 4000);
        }
    }

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
}
