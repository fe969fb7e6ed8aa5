//! Reporting each matching subscriber once per match, without building a
//! set: every match stamps a subscriber's slot in a dense array with that
//! call's epoch, and a slot already carrying the epoch was reported.

use super::SubId;

/// Feeds subscribers into the output, dropping repeats within one call.
pub(crate) struct Collector<'a> {
    pub(crate) seen: &'a mut [u32],
    pub(crate) epoch: u32,
    pub(crate) out: &'a mut Vec<SubId>,
}

impl Collector<'_> {
    /// Pushes each of `subs` not yet reported by this call.
    pub(crate) fn emit(&mut self, subs: impl Iterator<Item = SubId>) {
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
