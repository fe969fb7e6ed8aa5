//! Exact filters: a hash map from topic to subscribers. One hash of the
//! topic finds them, whatever else the index holds, so exact filters need no
//! tree.

use hashbrown::HashMap;

use super::SubId;
use super::subscriber_set::SubSet;
use super::usage::Usage;

/// Exact filters by topic. An entry exists only while its set is non-empty.
pub(crate) type ExactFilters = HashMap<Box<[u8]>, SubSet>;

/// Heap of the exact map's table (entries and control bytes), keys and sets
/// excluded.
pub(crate) fn table_heap(map: &ExactFilters) -> usize {
    map.allocation_size()
}

/// Adds `sub` under `topic`. False if the pair was already present, in which
/// case nothing changes.
pub(crate) fn insert(map: &mut ExactFilters, topic: &[u8], sub: SubId, usage: &mut Usage) -> bool {
    if let Some(set) = map.get_mut(topic) {
        return usage.track(set, SubSet::heap_bytes, |set| set.insert(sub));
    }
    let mut set = SubSet::default();
    set.insert(sub);
    usage.heap += topic.len() + set.heap_bytes();
    usage.track(map, table_heap, |map| map.insert(topic.into(), set));
    true
}

/// Removes `sub` from `topic`, and the entry once no subscriber is left.
/// False if the pair was not present, in which case nothing changes.
pub(crate) fn remove(map: &mut ExactFilters, topic: &[u8], sub: SubId, usage: &mut Usage) -> bool {
    let Some(set) = map.get_mut(topic) else {
        return false;
    };
    if !usage.track(set, SubSet::heap_bytes, |set| set.remove(sub)) {
        return false;
    }
    if set.is_empty() {
        usage.heap -= topic.len();
        usage.track(map, table_heap, |map| {
            map.remove(topic);
            // Give the table back once it is mostly empty.
            if map.len() * 4 < map.capacity() {
                map.shrink_to(map.len() * 2);
            }
        });
    }
    true
}
