//! Node and heap accounting: the running totals every structure charges
//! its changes to, as it makes them.

/// Running totals behind `node_count` and `heap_bytes`, updated by every
/// structural change so neither needs a walk.
pub(crate) struct Usage {
    pub(crate) nodes: usize,
    pub(crate) heap: usize,
}

impl Usage {
    /// Runs `op` on `target` and charges the change in `measure(target)`. A
    /// container's growth and shrinkage are decided inside the collection, so
    /// measuring both sides is the only exact way to account for it.
    pub(crate) fn track<T: ?Sized, R>(
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
