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
//! * **Pattern filters** live in a segment radix tree: a path-compressed
//!   trie over `.`-separated segments. An edge carries a label of one or
//!   more whole segments (literal or `*`, joined by `.`; never `>`), and a
//!   node exists only at the root, where edges branch, or where patterns
//!   end: its `subs` set holds the patterns that end there, its `tail` set
//!   those whose next and last segment is `>`. Children are keyed by the
//!   first segment of their label: the literal ones, with that segment's
//!   hash beside each pointer, in a small array that becomes a hash table
//!   past eight, and the one starting with `*` on its own. A topic follows,
//!   at each node, at most two edges, the literal child named by its next
//!   segment and the `*` child, and each only as far as the label's
//!   segments match the topic's (`*` matches any one segment; a run of
//!   literal segments is compared as one byte string). Every node reached
//!   emits its `tail` set while at least one topic segment remains, since
//!   `>` needs one or more segments. The nodes reached exactly at the
//!   topic's last segment emit their `subs` sets.
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
//! length. Emitting costs one step per matching (filter, subscriber) pair,
//! so a subscriber matched by three filters costs three steps and is
//! reported once.
//!
//! The pattern walk costs, per visited node, one hash of the topic's next
//! segment and one lookup (a table probe, or a scan of at most eight stored
//! hashes), then one comparison per edge label it follows, linear in the
//! label's bytes. Every node it visits, and every label segment it gets
//! past, is a distinct pattern prefix that matches the topic's leading
//! segments. A matching prefix of `d` segments picks, per segment, the
//! topic's literal or `*`, so there are at most 2^d of them: for patterns of
//! at most `S` segments (the broker's `--max-pattern-segments`) the walk
//! visits at most min(2^(S+1) - 1, pattern nodes held) nodes and gets past
//! at most min(2^(S+1), pattern segments held) label segments, plus one
//! failed comparison per edge tried, whatever the topic's length.
//!
//! Nothing else is touched. Subscriptions under another first byte, a
//! diverging edge label, another literal segment, or deeper than the topic
//! reaches are never visited, and neither are subscribers hanging off nodes
//! the walk does not emit. A million unrelated subscriptions therefore leave
//! a match's cost unchanged; the only things that grow with them are the
//! branch search at a node (a binary search in the radix tree, an expected
//! constant-time hash lookup for patterns) and, for prefixes that share the
//! topic's leading bytes, the branching nodes described above. The one kind
//! of non-matching subscription that does cost anything is a pattern sharing
//! a matching prefix with the topic (`a.*.x` against `a.b.y`). The walk
//! follows its segments as far as they match, but never reaches its
//! subscribers. At worst, `K` patterns of `S` segments that each match the
//! topic up to their last segment (`a.*.a.nomatch`, `a.a.*.nomatch`, ...)
//! cost `K` label comparisons of up to `S` segments each per match, while
//! matching nothing: the reason for the broker's cap on pattern segments,
//! and for the match cache (benches/matching.rs, `pattern_worst_case`).
//!
//! # Match cache
//!
//! A match whose pattern walk was costly caches its pattern part, the
//! pattern subscribers that match the topic, keyed by the topic; the next
//! match of that topic emits them without walking. Costly means at least 64
//! units of work, one per edge followed, per `*` label segment and per
//! literal run, and one per 8 bytes of a run compared: several times what
//! topics of a few segments against ordinary patterns take, so in the
//! common case the cache stays empty. The cache holds at most
//! [`MATCH_CACHE_CAPACITY`] (256) topics, each at most 2 KiB (topic bytes
//! plus 4 bytes per subscriber), and evicts by CLOCK (a second chance for
//! topics hit since the hand last passed). It stays exact: a pattern insert
//! adds its subscriber to the cached topics the pattern matches, and a
//! pattern removal drops the cached topics it matches, so while the cache
//! holds topics both cost up to 256 [`Filter::matches`] calls. Exact and
//! prefix filters never touch it. While it is empty, a match does not even
//! hash the topic for it; once it is not, every match pays that hash and a
//! probe. Its memory, at most about 1 MiB, is not part of
//! [`RoutingIndex::heap_bytes`]: [`RoutingIndex::cache_heap_bytes`] reports
//! it. It is freed as soon as no pattern filter is left.
//!
//! A subscriber found through several of its filters is reported once:
//! each match stamps the subscriber's slot in a dense array with a
//! per-call epoch, so no set or sort is built per call.
//! [`RoutingIndex::matches`] allocates nothing once the caller's output
//! vector has grown to size, cache hits included. The exception is a costly
//! walk that puts its topic into the cache, and even then only while the
//! cache's slots are first filled or a reused buffer must grow.
//!
//! # Memory
//!
//! A pattern node is 120 bytes (64-bit targets) plus its label's bytes. A
//! new pattern of `B` bytes adds at most two nodes, the leaf that holds all
//! its remaining segments as one label and the node that splits an existing
//! edge where it diverges, so at most about `B + 240` bytes, plus 16 bytes
//! for its entry in its parent's child array or table (more while those
//! grow by doubling): memory grows with a pattern's bytes, not with its
//! segments. A 1 KiB pattern of 512 segments costs 1,143 bytes; a typical
//! pattern of a few segments 140 to 280 bytes.
//!
//! Removal frees every node left with neither subscribers nor children. It
//! merges a radix or pattern node left with no subscribers and a single
//! child back into that child, and it shrinks child tables and subscriber
//! sets that have become mostly empty. After every pair has been removed,
//! the index is back to its two fixed roots and holds no heap memory (the
//! stamp array aside, see [`RoutingIndex::heap_bytes`]), and its match
//! cache is empty and freed.
//!
//! # Recursion
//!
//! Insert, remove and drop never recurse: they loop along the one path
//! they change, and dropping a pattern node first moves its descendants
//! onto a heap stack. Matching recurses only at pattern forks, nodes where
//! both the `*` child and the literal child continue along the topic. Each
//! node adds at least one segment, so the depth is at most the number of
//! nodes on one root-to-leaf path: at most min(topic segments, `S`) for
//! patterns of at most `S` segments. A fork's frame is about 300 bytes in
//! an optimised build (three times that unoptimised), so the broker's hard
//! cap of 1024 pattern segments bounds the stack matching needs to about
//! 320 KiB (1 MiB unoptimised), and its default of 16 to a few KiB.

use std::fmt;
use std::hash::BuildHasher;
use std::mem::size_of;

use hashbrown::{DefaultHashBuilder, HashMap, HashSet, HashTable};
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
///   specification), each once, whether or not the match cache answered;
/// * after every pair has been removed, [`node_count`](Self::node_count) and
///   [`heap_bytes`](Self::heap_bytes) are back to a fresh index's values
///   (2 nodes and 0 bytes), and so are [`cache_len`](Self::cache_len) and
///   [`cache_heap_bytes`](Self::cache_heap_bytes) (0 and 0).
pub struct RoutingIndex {
    /// Exact filters by topic.
    exact: HashMap<Box<[u8]>, SubSet>,
    /// Root of the prefix radix tree; its label is always empty and it is
    /// never pruned or merged.
    radix: RadixNode,
    /// Root of the pattern segment tree; its label is always empty and it is
    /// never pruned or merged.
    patterns: PatternNode,
    /// Hashes literal segments for every pattern child table.
    hasher: DefaultHashBuilder,
    /// (pattern filter, subscriber) pairs held.
    pattern_pairs: usize,
    /// Pattern parts of costly matches; cleared once `pattern_pairs` is 0.
    cache: MatchCache,
    /// Pattern walks taking at least this many units of work are cached:
    /// `CACHE_MIN_STEPS`, which tests lower to cache every walk.
    cache_min_steps: usize,
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
            patterns: PatternNode::new(Box::default()),
            hasher: DefaultHashBuilder::default(),
            pattern_pairs: 0,
            cache: MatchCache::new(),
            cache_min_steps: CACHE_MIN_STEPS,
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
    /// cover `sub`. A new pattern pair also costs O(cached topics x pattern
    /// length) while the match cache holds topics (see the module docs).
    pub fn insert(&mut self, filter: &Filter, sub: SubId) -> bool {
        let usage = &mut self.usage;
        let added = match filter.kind() {
            FilterKind::Pattern => {
                let added =
                    pattern_insert(&mut self.patterns, filter.text(), sub, &self.hasher, usage);
                if added {
                    self.pattern_pairs += 1;
                    self.cache.pattern_added(filter, sub);
                }
                added
            }
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
    /// It also merges a radix or pattern node left with no subscribers and
    /// one child into that child, so the structure looks as if the pair had
    /// never been inserted. Costs O(filter length) plus expected O(1) in the
    /// filter's subscriber set, even when thousands of subscribers share the
    /// filter. The cost does not grow with the number of subscribers. A
    /// pattern pair also costs O(cached topics x pattern length) while the
    /// match cache holds topics.
    pub fn remove(&mut self, filter: &Filter, sub: SubId) -> bool {
        let usage = &mut self.usage;
        let removed = match filter.kind() {
            FilterKind::Pattern => {
                let removed =
                    pattern_remove(&mut self.patterns, filter.text(), sub, &self.hasher, usage);
                if removed {
                    self.pattern_pairs -= 1;
                    if self.pattern_pairs == 0 {
                        self.cache.clear();
                    } else {
                        self.cache.pattern_removed(filter);
                    }
                }
                removed
            }
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
    /// length + matching pairs), plus the pattern walk: one child lookup per
    /// pattern node whose pattern prefix matches the topic's leading
    /// segments and one comparison per label segment followed, or a cache
    /// hit instead. It is independent of the number of subscriptions that
    /// do not match (see the module docs). It allocates only when `out`
    /// must grow, or when a costly walk puts the topic into the match cache.
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
        // Patterns first, so that what they add to `out` is exactly what the
        // cache stores for the topic.
        if self.pattern_pairs > 0 {
            if let Some(subs) = self.cache.get(topic) {
                collector.emit(subs.iter().copied());
            } else {
                let mut steps = 0;
                pattern_collect(
                    &self.patterns,
                    topic,
                    &self.hasher,
                    &mut collector,
                    &mut steps,
                );
                if steps >= self.cache_min_steps {
                    self.cache.insert(topic, collector.out);
                }
            }
        }
        if let Some(set) = self.exact.get(topic) {
            collector.emit(set.iter());
        }
        radix_collect(&self.radix, topic, &mut collector);
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
    /// sized like the broker's subscriber table and kept for reuse, and the
    /// match cache, which [`cache_heap_bytes`](Self::cache_heap_bytes)
    /// reports. An empty index reports 0, because the roots live inline in
    /// the index, and the count returns to 0 once every pair has been
    /// removed.
    pub fn heap_bytes(&self) -> usize {
        self.usage.heap
    }

    /// Topics the match cache holds: 0 to [`MATCH_CACHE_CAPACITY`]. It
    /// stays 0 unless some pattern walk was costly (see the module docs),
    /// and returns to 0 once no pattern filter is left.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Heap bytes held by the match cache: its slots, its table and the
    /// buffers of its topics and subscriber lists, free slots' kept buffers
    /// included. About 1 MiB at the very most; 0 while the cache has never
    /// been used or once no pattern filter is left. Not part of
    /// [`heap_bytes`](Self::heap_bytes). O(cache capacity) to compute.
    pub fn cache_heap_bytes(&self) -> usize {
        self.cache.heap_bytes()
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

/// Feeds subscribers into the output, dropping repeats within one call.
struct Collector<'a> {
    seen: &'a mut [u32],
    epoch: u32,
    out: &'a mut Vec<SubId>,
}

impl Collector<'_> {
    fn emit(&mut self, subs: impl Iterator<Item = SubId>) {
        for sub in subs {
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

// ---------------------------------------------------------------------------
// Pattern filters: path-compressed segment trie
// ---------------------------------------------------------------------------

/// Literal children a node keeps in a small array, searched linearly, before
/// it switches to a hash table. A node exists only where patterns branch or
/// end, and most branch two or three ways, so most never need a table.
const MAX_FEW_LITERALS: usize = 8;
/// A table that shrinks to this many children goes back to the array; the gap
/// below `MAX_FEW_LITERALS` keeps a node at the threshold from converting on
/// every call.
const BACK_TO_FEW_LITERALS: usize = MAX_FEW_LITERALS / 2;

/// A literal child and the hash of its first label segment, its key. The
/// hash is kept beside the pointer so that a lookup compares keys without
/// touching any child but the one it finds, and a table grows without
/// rehashing labels.
type LiteralChild = (u64, Box<PatternNode>);
/// One child inline: an edge split gives the new node one child, and leaves,
/// most nodes, need none.
type FewLiterals = SmallVec<[LiteralChild; 1]>;
/// Keyed by the stored hash; the child holds the key's bytes in its label.
type ManyLiterals = HashTable<LiteralChild>;

/// The literal children of a pattern node, keyed by the first segment of
/// their label (never `*` or `>`: a label starting with `*` belongs to the
/// `star` child, and `>` never appears in a label).
enum Literals {
    Few(FewLiterals),
    /// Boxed so that the common small case keeps nodes compact.
    Many(Box<ManyLiterals>),
}

impl Default for Literals {
    fn default() -> Self {
        Literals::Few(SmallVec::new())
    }
}

/// Hash of a literal segment: the key of a literal child.
fn segment_hash(hasher: &DefaultHashBuilder, segment: &[u8]) -> u64 {
    hasher.hash_one(segment)
}

/// Whether `label`'s first segment is `segment`.
fn starts_with_segment(label: &[u8], segment: &[u8]) -> bool {
    label.starts_with(segment) && label.get(segment.len()).is_none_or(|&b| b == SEPARATOR)
}

/// Whether `entry` is the child keyed by `segment`, whose hash is `hash`.
fn is_keyed(entry: &LiteralChild, segment: &[u8], hash: u64) -> bool {
    entry.0 == hash && starts_with_segment(&entry.1.label, segment)
}

impl Literals {
    fn len(&self) -> usize {
        match self {
            Literals::Few(children) => children.len(),
            Literals::Many(children) => children.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The child keyed by `segment`. Hashes `segment` only if there are
    /// children to look at.
    #[inline(always)]
    fn get(&self, segment: &[u8], hasher: &DefaultHashBuilder) -> Option<&PatternNode> {
        if self.is_empty() {
            return None;
        }
        let hash = segment_hash(hasher, segment);
        let entry = match self {
            Literals::Few(children) => children.iter().find(|entry| is_keyed(entry, segment, hash)),
            Literals::Many(children) => children.find(hash, |entry| is_keyed(entry, segment, hash)),
        };
        entry.map(|(_, child)| &**child)
    }

    fn get_mut(
        &mut self,
        segment: &[u8],
        hasher: &DefaultHashBuilder,
    ) -> Option<&mut Box<PatternNode>> {
        let hash = segment_hash(hasher, segment);
        let entry = match self {
            Literals::Few(children) => children
                .iter_mut()
                .find(|entry| is_keyed(entry, segment, hash)),
            Literals::Many(children) => {
                children.find_mut(hash, |entry| is_keyed(entry, segment, hash))
            }
        };
        entry.map(|(_, child)| child)
    }

    /// Adds `child`, whose first segment no other child has.
    fn insert(&mut self, child: Box<PatternNode>, hasher: &DefaultHashBuilder) {
        let entry = (segment_hash(hasher, split_segment(&child.label).0), child);
        let rehash = |entry: &LiteralChild| entry.0;
        match self {
            Literals::Few(children) if children.len() < MAX_FEW_LITERALS => children.push(entry),
            Literals::Few(children) => {
                let mut table = HashTable::with_capacity(children.len() + 1);
                for entry in children.drain(..).chain([entry]) {
                    table.insert_unique(entry.0, entry, rehash);
                }
                *self = Literals::Many(Box::new(table));
            }
            Literals::Many(children) => {
                children.insert_unique(entry.0, entry, rehash);
            }
        }
    }

    /// Takes out the child keyed by `segment`, and gives back memory once
    /// the children are mostly gone.
    fn remove(&mut self, segment: &[u8], hasher: &DefaultHashBuilder) -> Option<Box<PatternNode>> {
        let hash = segment_hash(hasher, segment);
        match self {
            Literals::Few(children) => {
                let at = children
                    .iter()
                    .position(|entry| is_keyed(entry, segment, hash))?;
                let (_, child) = children.swap_remove(at);
                if children.spilled()
                    && (children.len() <= children.inline_size()
                        || children.len() * 4 <= children.capacity())
                {
                    children.shrink_to_fit();
                }
                Some(child)
            }
            Literals::Many(children) => {
                let found = children.find_entry(hash, |entry| is_keyed(entry, segment, hash));
                let ((_, child), _) = found.ok()?.remove();
                if children.len() <= BACK_TO_FEW_LITERALS {
                    *self = Literals::Few(children.drain().collect());
                } else if children.len() * 4 <= children.capacity() {
                    // Tables never shrink on their own.
                    children.shrink_to(children.len() * 2, |entry| entry.0);
                }
                Some(child)
            }
        }
    }

    /// Every child with its stored key hash.
    #[cfg(test)]
    fn entries(&self) -> impl Iterator<Item = (u64, &PatternNode)> {
        let (few, many) = match self {
            Literals::Few(children) => (Some(children.iter()), None),
            Literals::Many(children) => (None, Some(children.iter())),
        };
        few.into_iter()
            .flatten()
            .chain(many.into_iter().flatten())
            .map(|(hash, child)| (*hash, &**child))
    }

    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = &PatternNode> {
        self.entries().map(|(_, child)| child)
    }

    /// Moves every child onto `stack`.
    // The boxes move as they are: unboxing would copy each node out of its
    // allocation, only for the drop or merge that follows to free it.
    #[expect(clippy::vec_box)]
    fn drain_into(&mut self, stack: &mut Vec<Box<PatternNode>>) {
        match std::mem::take(self) {
            Literals::Few(children) => stack.extend(children.into_iter().map(|(_, child)| child)),
            Literals::Many(children) => stack.extend(children.into_iter().map(|(_, child)| child)),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Literals::Few(children) if children.spilled() => {
                children.capacity() * size_of::<LiteralChild>()
            }
            Literals::Few(_) => 0,
            Literals::Many(children) => size_of::<ManyLiterals>() + children.allocation_size(),
        }
    }
}

/// A node of the path-compressed segment trie.
///
/// Invariants: a non-root node has subscribers in `subs` or `tail`, or at
/// least two children (literal or `*`). Its label is one or more whole
/// pattern segments joined by `.`, none of them `>`. The root's label is
/// empty and means no segment at all; any other empty label is one empty
/// segment. Nothing else would justify a node in a path-compressed tree.
struct PatternNode {
    /// The edge from the parent: the segments this node adds to its
    /// parent's path, `*` included, joined by `.`.
    label: Box<[u8]>,
    /// Children whose label starts with a literal segment. Wildcards never
    /// appear as keys, so a topic segment spelled `*` or `>` looks up
    /// nothing here and goes only through the `*` child, which matches any
    /// one segment.
    literal: Literals,
    /// The child whose label starts with `*`.
    star: Option<Box<PatternNode>>,
    /// Patterns that end at this node.
    subs: SubSet,
    /// Patterns that continue from this node with a final `>`.
    tail: SubSet,
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
    fn new(label: Box<[u8]>) -> Self {
        PatternNode {
            label,
            literal: Literals::default(),
            star: None,
            subs: SubSet::default(),
            tail: SubSet::default(),
        }
    }

    fn has_subs(&self) -> bool {
        !self.subs.is_empty() || !self.tail.is_empty()
    }

    fn child_count(&self) -> usize {
        self.literal.len() + usize::from(self.star.is_some())
    }

    #[expect(clippy::vec_box, reason = "see `Literals::drain_into`")]
    fn move_children_to(&mut self, stack: &mut Vec<Box<PatternNode>>) {
        stack.extend(self.star.take());
        self.literal.drain_into(stack);
    }

    /// The child whose label starts with pattern segment `segment` (`*` or
    /// a literal).
    fn child(&self, segment: &[u8], hasher: &DefaultHashBuilder) -> Option<&PatternNode> {
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
    fn own_heap(&self) -> usize {
        size_of::<PatternNode>()
            + self.label.len()
            + self.literal.heap_bytes()
            + self.subs.heap_bytes()
            + self.tail.heap_bytes()
    }
}

/// Splits off the first segment. The remainder is `None` after the last
/// one. Every byte string has at least one segment: "" is one empty segment.
fn split_segment(text: &[u8]) -> (&[u8], Option<&[u8]>) {
    match text.iter().position(|&b| b == SEPARATOR) {
        Some(dot) => (&text[..dot], Some(&text[dot + 1..])),
        None => (text, None),
    }
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
fn pattern_node_for<'a>(
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
                split_pattern_edge(child, at, hasher, usage);
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
fn split_pattern_edge(
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
/// joining their labels with a separator. This undoes the
/// `split_pattern_edge` that the child's departed sibling once required. The
/// merged node keeps `node`'s first segment, so the parent's key holds.
fn absorb_only_pattern_child(node: &mut PatternNode, usage: &mut Usage) {
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

fn pattern_insert(
    root: &mut PatternNode,
    text: &[u8],
    sub: SubId,
    hasher: &DefaultHashBuilder,
    usage: &mut Usage,
) -> bool {
    // A duplicate pair finds its node already in place, so a false result
    // never leaves freshly created nodes behind.
    let (body, tail) = split_tail(text);
    let node = pattern_node_for(root, body, hasher, usage);
    let set = if tail { &mut node.tail } else { &mut node.subs };
    usage.track(set, SubSet::heap_bytes, |set| set.insert(sub))
}

/// Iterative, like `radix_remove`: it walks with the parent in hand, and
/// path compression means cleanup never reaches above the target's parent.
/// A non-root parent without subscribers had at least two children, so
/// losing one leaves it at least one; if exactly one, it merges into it.
fn pattern_remove(
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
                    absorb_only_pattern_child(parent, usage);
                }
            }
            1 => absorb_only_pattern_child(child, usage),
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
fn pattern_collect(
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
            pattern_collect(star, star_rest, hasher, collector, steps);
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

// ---------------------------------------------------------------------------
// Match cache: the pattern part of costly matches, by topic
// ---------------------------------------------------------------------------

/// Topics the match cache holds at most. Every pattern insert or removal
/// checks each cached topic against the pattern, so this bounds what a
/// pattern SUB or UNSUB costs while the cache is in use: at most 256
/// `Filter::matches` calls. Hot topics whose pattern walk is costly are few
/// in a broker; 256 keeps their entries resident while that check stays a
/// few microseconds for topics of ordinary length.
pub const MATCH_CACHE_CAPACITY: usize = 256;

/// A pattern walk that took fewer units of work than this (one per edge
/// followed, per `*` label segment and per literal run, and one per 8 bytes
/// of a run compared) is about as cheap as a cache lookup plus an insert's
/// copy, so its topic is not cached. Ordinary topics (a handful of segments,
/// a fork or two) stay well below it, 15 for a 4-segment topic matched by
/// nine overlapping patterns, which keeps the cache empty, and its lookups
/// skipped, in the common case. The worst case of the module docs passes
/// it from 16 segments on (76).
const CACHE_MIN_STEPS: usize = 64;

/// Largest entry cached: topic bytes plus 4 bytes per subscriber. A slot's
/// buffers never grow past this each, since they are reused for later
/// entries, so the whole cache holds at most `MATCH_CACHE_CAPACITY` x 4 KiB
/// (1 MiB) plus about 21 KiB of slots and table.
const CACHE_MAX_ENTRY_BYTES: usize = 2048;

fn cache_entry_fits(topic_len: usize, subs: usize) -> bool {
    topic_len + subs * size_of::<SubId>() <= CACHE_MAX_ENTRY_BYTES
}

/// One cached topic. A slot that is not `live` keeps its buffers for reuse.
#[derive(Default)]
struct CacheSlot {
    hash: u64,
    live: bool,
    /// Set by a hit, cleared as the clock hand passes: a second chance.
    referenced: bool,
    topic: Vec<u8>,
    /// The pattern subscribers that match `topic`, each once.
    subs: Vec<SubId>,
}

/// Topic -> pattern subscribers for topics whose pattern walk was costly.
///
/// Exact: every pattern insert adds its subscriber to the entries whose
/// topic it matches, and every pattern removal drops those entries (the
/// subscriber may still match through another pattern, so it cannot just be
/// taken out). Exact and prefix filters never touch it. Eviction is CLOCK:
/// the hand passes over the slots, clearing reference bits, and takes the
/// first slot that is free or was not hit since the last pass.
struct MatchCache {
    /// At most `MATCH_CACHE_CAPACITY`, allocated on the first insert.
    slots: Vec<CacheSlot>,
    /// Live slot numbers, keyed by their topic's hash.
    table: HashTable<u32>,
    hasher: DefaultHashBuilder,
    /// Next slot the clock looks at.
    hand: usize,
}

impl MatchCache {
    fn new() -> Self {
        MatchCache {
            slots: Vec::new(),
            table: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            hand: 0,
        }
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn heap_bytes(&self) -> usize {
        let buffers: usize = self
            .slots
            .iter()
            .map(|slot| slot.topic.capacity() + slot.subs.capacity() * size_of::<SubId>())
            .sum();
        self.slots.capacity() * size_of::<CacheSlot>() + self.table.allocation_size() + buffers
    }

    /// The cached pattern subscribers of `topic`. Allocates nothing.
    fn get(&mut self, topic: &[u8]) -> Option<&[SubId]> {
        if self.table.is_empty() {
            return None;
        }
        let hash = self.hasher.hash_one(topic);
        let slots = &mut self.slots;
        let &at = self
            .table
            .find(hash, |&at| slots[at as usize].topic == topic)?;
        let slot = &mut slots[at as usize];
        slot.referenced = true;
        Some(&slot.subs)
    }

    /// Caches `subs` for `topic`, which is not cached, if the entry is small
    /// enough. Reuses a free or evicted slot's buffers, so once the cache
    /// has filled, an insert allocates only to grow a buffer.
    fn insert(&mut self, topic: &[u8], subs: &[SubId]) {
        if !cache_entry_fits(topic.len(), subs.len()) {
            return;
        }
        let hash = self.hasher.hash_one(topic);
        let at = self.free_slot();
        let slot = &mut self.slots[at];
        slot.topic.clear();
        slot.topic.reserve_exact(topic.len());
        slot.topic.extend_from_slice(topic);
        slot.subs.clear();
        slot.subs.reserve_exact(subs.len());
        slot.subs.extend_from_slice(subs);
        slot.hash = hash;
        slot.live = true;
        slot.referenced = false;
        let slots = &self.slots;
        self.table
            .insert_unique(hash, at as u32, |&at| slots[at as usize].hash);
    }

    /// A slot that is not live: a new one until the cache is full, then
    /// whatever the clock hand picks, evicted.
    fn free_slot(&mut self) -> usize {
        if self.slots.len() < MATCH_CACHE_CAPACITY {
            if self.slots.is_empty() {
                self.slots.reserve_exact(MATCH_CACHE_CAPACITY);
                // Twice the entries: then deletions' tombstones are cleared
                // by rehashing in place, and the table never grows again.
                let slots = &self.slots;
                self.table
                    .reserve(2 * MATCH_CACHE_CAPACITY, |&at| slots[at as usize].hash);
            }
            self.slots.push(CacheSlot::default());
            return self.slots.len() - 1;
        }
        loop {
            let at = self.hand;
            self.hand = (at + 1) % self.slots.len();
            let slot = &mut self.slots[at];
            if !slot.live {
                return at;
            }
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            self.unlink(at);
            return at;
        }
    }

    /// Drops live slot `at` from the table; its buffers stay for reuse.
    fn unlink(&mut self, at: usize) {
        let slot = &mut self.slots[at];
        debug_assert!(slot.live);
        slot.live = false;
        self.table
            .find_entry(slot.hash, |&other| other as usize == at)
            .expect("a live slot is in the table")
            .remove();
    }

    /// `filter` (a pattern) was just added for `sub`: every cached topic it
    /// matches gains `sub`, unless already there. An entry that would grow
    /// past the size limit is dropped instead.
    fn pattern_added(&mut self, filter: &Filter, sub: SubId) {
        for at in 0..self.slots.len() {
            let slot = &mut self.slots[at];
            if !slot.live || !filter.matches(&slot.topic) || slot.subs.contains(&sub) {
                continue;
            }
            if cache_entry_fits(slot.topic.len(), slot.subs.len() + 1) {
                if slot.subs.len() == slot.subs.capacity() {
                    // Doubling, but never past what the entry may hold, so
                    // the buffer stays within the size limit too.
                    let room = (CACHE_MAX_ENTRY_BYTES - slot.topic.len()) / size_of::<SubId>();
                    let more = slot.subs.len().max(4).min(room - slot.subs.len());
                    slot.subs.reserve_exact(more);
                }
                slot.subs.push(sub);
            } else {
                self.unlink(at);
            }
        }
    }

    /// `filter` (a pattern) was just removed for some subscriber: every
    /// cached topic it matches is dropped.
    fn pattern_removed(&mut self, filter: &Filter) {
        for at in 0..self.slots.len() {
            let slot = &self.slots[at];
            if slot.live && filter.matches(&slot.topic) {
                self.unlink(at);
            }
        }
    }

    /// Frees everything: used once no pattern is left, so that a drained
    /// index holds no cache memory either.
    fn clear(&mut self) {
        self.slots = Vec::new();
        self.table = HashTable::new();
        self.hand = 0;
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
    fn audit(index: &RoutingIndex) {
        let mut census = Census {
            nodes: 0,
            heap: 0,
            pairs: 0,
        };
        radix_census(&index.radix, true, &mut census);
        pattern_census(&index.patterns, &index.hasher, &mut census);
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
        pattern_collect(
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

    fn assert_baseline(index: &RoutingIndex) {
        let fresh = RoutingIndex::new();
        assert_eq!(index.len(), 0);
        assert!(index.is_empty());
        assert_eq!(index.node_count(), fresh.node_count());
        assert_eq!(index.heap_bytes(), fresh.heap_bytes());
        assert_eq!(index.cache_len(), 0);
        assert_eq!(index.cache_heap_bytes(), 0);
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

    fn pattern_of(text: &str) -> Filter {
        long_pattern(text)
    }

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
        pattern_collect(
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
}
