//! A broker's interest: the union of its local subscribers' filters,
//! reference-counted, which is all its peers need to know.
//!
//! A filter held by a thousand local subscribers is one entry with a count
//! of a thousand: peers hear of it once, when the first subscriber takes it
//! ([`InterestTable::add`] returns true), and once more when the last one
//! lets it go. Every such change bumps the table's version, which links
//! carry so a receiver can tell a missed change from a delivered one.

use hashbrown::HashMap;

use crate::filter::Filter;

/// Reference-counted filters with a version that counts the changes peers
/// see.
#[derive(Debug, Default)]
pub struct InterestTable {
    counts: HashMap<Filter, u32>,
    version: u64,
}

impl InterestTable {
    /// An empty table at version 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// One more local holder of `filter`. True when it is new to the table:
    /// peers must hear of it (and the version went up by one).
    pub fn add(&mut self, filter: &Filter) -> bool {
        if let Some(count) = self.counts.get_mut(filter) {
            *count += 1;
            return false;
        }
        self.counts.insert(filter.clone(), 1);
        self.version += 1;
        true
    }

    /// One holder fewer. True when it was the last: peers must hear that
    /// it is gone (and the version went up by one). Removing a filter the
    /// table does not hold changes nothing.
    pub fn remove(&mut self, filter: &Filter) -> bool {
        match self.counts.get_mut(filter) {
            None => false,
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            Some(_) => {
                self.counts.remove(filter);
                self.version += 1;
                true
            }
        }
    }

    /// Local holders of `filter`.
    pub fn count(&self, filter: &Filter) -> u32 {
        self.counts.get(filter).copied().unwrap_or(0)
    }

    /// The distinct filters held, each once, in no particular order: what a
    /// snapshot sends.
    pub fn filters(&self) -> impl ExactSizeIterator<Item = &Filter> {
        self.counts.keys()
    }

    /// Distinct filters held.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// Whether no filter is held.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Changes peers have been told of since the start (adds of new
    /// filters and removals of last holders).
    pub fn version(&self) -> u64 {
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::FilterKind;

    #[test]
    fn a_thousand_holders_are_one_entry_and_one_change_each_way() {
        let filter = Filter::new(FilterKind::Prefix, b"D", 64).unwrap();
        let mut table = InterestTable::new();
        let added: Vec<bool> = (0..1000).map(|_| table.add(&filter)).collect();
        assert_eq!(added.iter().filter(|&&new| new).count(), 1);
        assert_eq!((table.len(), table.version()), (1, 1));
        let removed: Vec<bool> = (0..1000).map(|_| table.remove(&filter)).collect();
        assert_eq!(removed.iter().filter(|&&last| last).count(), 1);
        assert!(removed[999]);
        assert_eq!((table.len(), table.version()), (0, 2));
        assert!(!table.remove(&filter), "nothing left to remove");
        assert_eq!(table.version(), 2);
    }
}
