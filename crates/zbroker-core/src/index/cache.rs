//! The match cache: the pattern part of costly matches, by topic.
//!
//! Only the pattern walk can cost more than the topic's length, so only its
//! result is cached, and only for topics whose walk was costly. The cache
//! stays exact as patterns come and go, holds at most
//! `MATCH_CACHE_CAPACITY` topics of bounded size, and evicts by CLOCK.

use std::hash::BuildHasher;
use std::mem::size_of;

use hashbrown::{DefaultHashBuilder, HashTable};

use super::{MATCH_CACHE_CAPACITY, SubId};
use crate::filter::Filter;

/// A pattern walk that took fewer units of work than this (one per edge
/// followed, per `*` label segment and per literal run, and one per 8 bytes
/// of a run compared) is about as cheap as a cache lookup plus an insert's
/// copy, so its topic is not cached. Ordinary topics (a handful of segments,
/// a fork or two) stay well below it, 15 for a 4-segment topic matched by
/// nine overlapping patterns, which keeps the cache empty, and its lookups
/// skipped, in the common case. The worst case of the index's module docs
/// passes it from 16 segments on (76).
pub(crate) const CACHE_MIN_STEPS: usize = 64;

/// Largest entry cached: topic bytes plus 4 bytes per subscriber. A slot's
/// buffers never grow past this each, since they are reused for later
/// entries, so the whole cache holds at most `MATCH_CACHE_CAPACITY` x 4 KiB
/// (1 MiB) plus about 21 KiB of slots and table.
pub(crate) const CACHE_MAX_ENTRY_BYTES: usize = 2048;

/// Whether an entry of `subs` subscribers for a topic of `topic_len` bytes
/// is small enough to cache.
pub(crate) fn cache_entry_fits(topic_len: usize, subs: usize) -> bool {
    topic_len + subs * size_of::<SubId>() <= CACHE_MAX_ENTRY_BYTES
}

/// One cached topic. A slot that is not `live` keeps its buffers for reuse.
#[derive(Default)]
pub(crate) struct CacheSlot {
    pub(crate) hash: u64,
    pub(crate) live: bool,
    /// Set by a hit, cleared as the clock hand passes: a second chance.
    referenced: bool,
    pub(crate) topic: Vec<u8>,
    /// The pattern subscribers that match `topic`, each once.
    pub(crate) subs: Vec<SubId>,
}

/// Topic -> pattern subscribers for topics whose pattern walk was costly.
///
/// Exact: every pattern insert adds its subscriber to the entries whose
/// topic it matches, and every pattern removal drops those entries (the
/// subscriber may still match through another pattern, so it cannot just be
/// taken out). Exact and prefix filters never touch it. Eviction is CLOCK:
/// the hand passes over the slots, clearing reference bits, and takes the
/// first slot that is free or was not hit since the last pass.
pub(crate) struct MatchCache {
    /// At most `MATCH_CACHE_CAPACITY`, allocated on the first insert.
    pub(crate) slots: Vec<CacheSlot>,
    /// Live slot numbers, keyed by their topic's hash.
    pub(crate) table: HashTable<u32>,
    pub(crate) hasher: DefaultHashBuilder,
    /// Next slot the clock looks at.
    hand: usize,
}

impl MatchCache {
    pub(crate) fn new() -> Self {
        MatchCache {
            slots: Vec::new(),
            table: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            hand: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        let buffers: usize = self
            .slots
            .iter()
            .map(|slot| slot.topic.capacity() + slot.subs.capacity() * size_of::<SubId>())
            .sum();
        self.slots.capacity() * size_of::<CacheSlot>() + self.table.allocation_size() + buffers
    }

    /// The cached pattern subscribers of `topic`. Allocates nothing.
    pub(crate) fn get(&mut self, topic: &[u8]) -> Option<&[SubId]> {
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
    pub(crate) fn insert(&mut self, topic: &[u8], subs: &[SubId]) {
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
    pub(crate) fn pattern_added(&mut self, filter: &Filter, sub: SubId) {
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
    pub(crate) fn pattern_removed(&mut self, filter: &Filter) {
        for at in 0..self.slots.len() {
            let slot = &self.slots[at];
            if slot.live && filter.matches(&slot.topic) {
                self.unlink(at);
            }
        }
    }

    /// Frees everything: used once no pattern is left, so that a drained
    /// index holds no cache memory either.
    pub(crate) fn clear(&mut self) {
        self.slots = Vec::new();
        self.table = HashTable::new();
        self.hand = 0;
    }
}
