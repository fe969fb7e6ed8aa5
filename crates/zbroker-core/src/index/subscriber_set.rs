//! The set of subscribers held at one filter position (an exact topic, a
//! radix node, a pattern node's `subs` or `tail`): a few ids scanned
//! linearly in the common case, a hash set once more than 16 share a
//! filter.

use std::mem::size_of;

use hashbrown::HashSet;
use smallvec::SmallVec;

use super::SubId;

/// Ids kept inline before a small set spills to the heap.
const INLINE_SUBS: usize = 4;
/// Largest size of the linear-scan representation. Past it, a hash set is
/// used, so that one filter shared by thousands of subscribers still
/// inserts and removes in O(1).
pub(crate) const MAX_SMALL_SUBS: usize = 16;
/// A hash set that shrinks to this size goes back to the linear form. The
/// gap below `MAX_SMALL_SUBS` keeps a set hovering at the threshold from
/// converting back and forth on every call.
pub(crate) const BACK_TO_SMALL: usize = MAX_SMALL_SUBS / 2;

/// The subscribers attached to one filter position.
///
/// Invariant: an empty set owns no heap memory. Both trees'
/// `absorb_only_child` rely on this when they overwrite a node's empty sets
/// without uncharging them. It is also why a drained index reports 0 bytes.
pub(crate) enum SubSet {
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
    pub(crate) fn len(&self) -> usize {
        match self {
            SubSet::Small(ids) => ids.len(),
            SubSet::Large(ids) => ids.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// False if `sub` was already present.
    pub(crate) fn insert(&mut self, sub: SubId) -> bool {
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
    pub(crate) fn remove(&mut self, sub: SubId) -> bool {
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

    pub(crate) fn iter(&self) -> SubIter<'_> {
        match self {
            SubSet::Small(ids) => SubIter::Small(ids.iter()),
            SubSet::Large(ids) => SubIter::Large(ids.iter()),
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            SubSet::Small(ids) if ids.spilled() => ids.capacity() * size_of::<SubId>(),
            SubSet::Small(_) => 0,
            SubSet::Large(ids) => size_of::<HashSet<SubId>>() + ids.allocation_size(),
        }
    }
}

pub(crate) enum SubIter<'a> {
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
