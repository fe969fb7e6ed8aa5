//! The literal children of a pattern node: a small array searched linearly,
//! which becomes a hash table past eight children. Each child is keyed by
//! the first segment of its label, whose hash is stored beside it.

use std::hash::BuildHasher;
use std::mem::size_of;

use hashbrown::{DefaultHashBuilder, HashTable};
use smallvec::SmallVec;

use super::{PatternNode, split_segment, starts_with_segment};

/// Literal children a node keeps in a small array, searched linearly, before
/// it switches to a hash table. A node exists only where patterns branch or
/// end, and most branch two or three ways, so most never need a table.
pub(crate) const MAX_FEW_LITERALS: usize = 8;
/// A table that shrinks to this many children goes back to the array; the gap
/// below `MAX_FEW_LITERALS` keeps a node at the threshold from converting on
/// every call.
pub(crate) const BACK_TO_FEW_LITERALS: usize = MAX_FEW_LITERALS / 2;

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
pub(crate) enum Literals {
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
pub(crate) fn segment_hash(hasher: &DefaultHashBuilder, segment: &[u8]) -> u64 {
    hasher.hash_one(segment)
}

/// Whether `entry` is the child keyed by `segment`, whose hash is `hash`.
fn is_keyed(entry: &LiteralChild, segment: &[u8], hash: u64) -> bool {
    entry.0 == hash && starts_with_segment(&entry.1.label, segment)
}

impl Literals {
    pub(crate) fn len(&self) -> usize {
        match self {
            Literals::Few(children) => children.len(),
            Literals::Many(children) => children.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The child keyed by `segment`. Hashes `segment` only if there are
    /// children to look at.
    #[inline(always)]
    pub(crate) fn get(&self, segment: &[u8], hasher: &DefaultHashBuilder) -> Option<&PatternNode> {
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

    pub(crate) fn get_mut(
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
    pub(crate) fn insert(&mut self, child: Box<PatternNode>, hasher: &DefaultHashBuilder) {
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
    pub(crate) fn remove(
        &mut self,
        segment: &[u8],
        hasher: &DefaultHashBuilder,
    ) -> Option<Box<PatternNode>> {
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
    pub(crate) fn entries(&self) -> impl Iterator<Item = (u64, &PatternNode)> {
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
    pub(crate) fn iter(&self) -> impl Iterator<Item = &PatternNode> {
        self.entries().map(|(_, child)| child)
    }

    /// Moves every child onto `stack`.
    // The boxes move as they are: unboxing would copy each node out of its
    // allocation, only for the drop or merge that follows to free it.
    #[expect(clippy::vec_box)]
    pub(crate) fn drain_into(&mut self, stack: &mut Vec<Box<PatternNode>>) {
        match std::mem::take(self) {
            Literals::Few(children) => stack.extend(children.into_iter().map(|(_, child)| child)),
            Literals::Many(children) => stack.extend(children.into_iter().map(|(_, child)| child)),
        }
    }

    pub(crate) fn heap_bytes(&self) -> usize {
        match self {
            Literals::Few(children) if children.spilled() => {
                children.capacity() * size_of::<LiteralChild>()
            }
            Literals::Few(_) => 0,
            Literals::Many(children) => size_of::<ManyLiterals>() + children.allocation_size(),
        }
    }
}
