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
//! In short, a match costs time linear in the topic's length for exact and
//! prefix filters; for pattern filters, a step per pattern-trie node and
//! label segment whose pattern prefix matches the topic's leading segments,
//! at most min(2^(S+1) - 1, pattern nodes held) nodes for patterns of at
//! most `S` segments, or one probe once the match cache holds the topic; and
//! a step per matching (filter, subscriber) pair reported. None of this
//! grows with the number of subscribers, which enters only through the
//! search at a branching node (a binary search over at most 256 radix
//! children, an expected constant-time probe among pattern children). The
//! details follow.
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

mod cache;
mod collector;
mod exact;
mod pattern;
mod prefix;
mod subscriber_set;
mod usage;

#[cfg(test)]
mod tests;

use std::fmt;

use hashbrown::DefaultHashBuilder;

use crate::filter::{Filter, FilterKind};

use cache::{CACHE_MIN_STEPS, MatchCache};
use collector::Collector;
use exact::ExactFilters;
use pattern::PatternNode;
use prefix::RadixNode;
use usage::Usage;

/// Dense subscriber handle: a slot number in the broker's subscriber table.
///
/// The index keeps one stamp word per slot up to the largest id it has seen,
/// so ids should be small and reused, not random.
pub type SubId = u32;

/// Topics the match cache holds at most. Every pattern insert or removal
/// checks each cached topic against the pattern, so this bounds what a
/// pattern SUB or UNSUB costs while the cache is in use: at most 256
/// [`Filter::matches`] calls. Hot topics whose pattern walk is costly are few
/// in a broker; 256 keeps their entries resident while that check stays a
/// few microseconds for topics of ordinary length.
pub const MATCH_CACHE_CAPACITY: usize = 256;

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
///
/// ```
/// use zbroker_core::filter::{Filter, FilterKind};
/// use zbroker_core::index::RoutingIndex;
///
/// let filter = |kind, text: &str| Filter::new(kind, text.as_bytes(), 1024).unwrap();
/// let mut index = RoutingIndex::new();
/// // Both of subscriber 1's filters match `net.a.port`.
/// assert!(index.insert(&filter(FilterKind::Pattern, "net.*.port"), 1));
/// assert!(index.insert(&filter(FilterKind::Exact, "net.a.port"), 1));
/// assert!(index.insert(&filter(FilterKind::Prefix, "net."), 2));
///
/// let mut out = Vec::new();
/// index.matches(b"net.a.port", &mut out);
/// out.sort_unstable(); // the order is unspecified
/// assert_eq!(out, [1, 2], "each subscriber once");
/// index.matches(b"net.a.addr", &mut out);
/// assert_eq!(out, [2]);
/// index.matches(b"disk.a.port", &mut out);
/// assert!(out.is_empty());
/// ```
pub struct RoutingIndex {
    /// Exact filters by topic.
    exact: ExactFilters,
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
            exact: ExactFilters::new(),
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
                    pattern::insert(&mut self.patterns, filter.text(), sub, &self.hasher, usage);
                if added {
                    self.pattern_pairs += 1;
                    self.cache.pattern_added(filter, sub);
                }
                added
            }
            FilterKind::Exact => exact::insert(&mut self.exact, filter.text(), sub, usage),
            FilterKind::Prefix => prefix::insert(&mut self.radix, filter.text(), sub, usage),
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
                    pattern::remove(&mut self.patterns, filter.text(), sub, &self.hasher, usage);
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
            FilterKind::Exact => exact::remove(&mut self.exact, filter.text(), sub, usage),
            FilterKind::Prefix => prefix::remove(&mut self.radix, filter.text(), sub, usage),
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
                pattern::collect(
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
        prefix::collect(&self.radix, topic, &mut collector);
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
