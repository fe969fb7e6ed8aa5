//! The subscriber table: one record per connected subscriber, addressed by
//! a dense [`SubId`] (for the routing index) and by its ZeroMQ routing id
//! (for commands arriving on the ROUTER socket).

use std::collections::VecDeque;
use std::time::Instant;

use hashbrown::{HashMap, HashSet};
use smallvec::SmallVec;

use crate::broker::TokenBucket;
use crate::filter::Filter;
use crate::index::SubId;
use crate::protocol::ErrorCode;

/// A ROUTER routing id; libzmq's generated ids are 5 bytes, so they stay
/// inline.
pub type RoutingId = SmallVec<[u8; 8]>;

/// Something waiting in a subscriber's queue, in the order it must be sent.
#[derive(Debug)]
pub enum Queued<P> {
    /// A routed message with the seq it was given when routed.
    Message {
        /// The subscriber's sequence number for it.
        seq: u64,
        /// Shared topic frame.
        topic: P,
        /// Shared payload frame.
        payload: P,
    },
    /// A reply to a command, queued behind earlier messages.
    Reply(Reply),
}

/// A reply the broker owes a subscriber.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `[OK, SUB|UNSUB, kind, filter]`.
    Ok {
        /// SUB (true) or UNSUB.
        subscribe: bool,
        /// The filter that took effect.
        filter: Filter,
    },
    /// `[ERR, code, text]`.
    Err(ErrorCode, String),
    /// `[PONG]`.
    Pong,
}

/// What the broker knows about one subscriber, read through
/// [`Broker::subscriber`](crate::broker::Broker::subscriber); only the
/// broker changes it.
#[derive(Debug)]
pub struct Subscriber<P> {
    /// Its ROUTER routing id.
    pub(crate) routing_id: RoutingId,
    /// Its CURVE key (Z85), under CURVE: whose filter quota it draws on.
    pub(crate) key: Option<Box<str>>,
    /// The filters it holds; each is also in the routing index.
    pub(crate) filters: HashSet<Filter>,
    /// The last seq assigned (0: none yet).
    pub(crate) last_seq: u64,
    /// When it last sent a command.
    pub(crate) last_heard: Instant,
    /// Messages and replies waiting for room in libzmq's pipe, oldest first.
    pub(crate) queue: VecDeque<Queued<P>>,
    /// Bytes held by `queue` (topics, payloads, reply frames).
    pub(crate) queued_bytes: usize,
    /// Since when its queue has been full without the consumer taking
    /// anything, if it has.
    pub(crate) full_since: Option<Instant>,
    /// Listed in the broker's backlog (of subscribers with queued items).
    pub(crate) in_backlog: bool,
    /// Its queue is past the backpressure mark (half its bounds), which
    /// holds publishers back.
    pub(crate) over_mark: bool,
    /// Routed messages it lost to a full queue.
    pub(crate) dropped: u64,
    /// Replies among `queue`.
    pub(crate) queued_replies: usize,
    /// Its command rate limit.
    pub(crate) command_tokens: TokenBucket,
    /// Indices of the broker's staged messages routed to it and not sent
    /// yet, in order; empty between the broker's calls.
    pub(crate) staged: Vec<u32>,
    /// Topic and payload bytes of those, under the backpressure policy
    /// (zero under the others).
    pub(crate) staged_bytes: usize,
    /// Set when the record is a peer broker's link rather than a
    /// subscriber (see `broker::peers`).
    pub(crate) peer: Option<Box<crate::broker::PeerRecord>>,
}

impl<P> Subscriber<P> {
    fn new(routing_id: &[u8], now: Instant) -> Self {
        Subscriber {
            routing_id: RoutingId::from_slice(routing_id),
            key: None,
            filters: HashSet::new(),
            last_seq: 0,
            last_heard: now,
            queue: VecDeque::new(),
            queued_bytes: 0,
            full_since: None,
            in_backlog: false,
            over_mark: false,
            dropped: 0,
            queued_replies: 0,
            // Full whatever the capacity: the first command refills it down
            // to the capacity the limits allow.
            command_tokens: TokenBucket::new(f64::MAX, now),
            staged: Vec::new(),
            staged_bytes: 0,
            peer: None,
        }
    }

    /// The last seq assigned to it (0: none yet). Every message routed to
    /// it takes the next one, delivered or dropped.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The filters it holds, each once, in no particular order; each is
    /// also in the routing index.
    pub fn filters(&self) -> impl ExactSizeIterator<Item = &Filter> {
        self.filters.iter()
    }

    /// What waits for room in libzmq's pipe, in the order it will be sent:
    /// messages in seq order, replies behind what was queued before them.
    pub fn queue(&self) -> impl ExactSizeIterator<Item = &Queued<P>> {
        self.queue.iter()
    }

    /// How many of [`queue`](Self::queue)'s items are replies.
    pub fn queued_replies(&self) -> usize {
        self.queued_replies
    }

    /// What [`queue`](Self::queue) holds, in the bytes counted against the
    /// queue bounds.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Routed messages it lost to a full queue or a cut-off; each shows as
    /// a gap in its seqs.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Deliveries routed to it and not sent yet (see
    /// [`Broker::route_publish`](crate::broker::Broker::route_publish)):
    /// the messages given its last this many seqs.
    pub fn staged_deliveries(&self) -> usize {
        self.staged.len()
    }

    /// Whether the record is a peer broker's link.
    pub fn is_peer(&self) -> bool {
        self.peer.is_some()
    }

    /// Topic and payload bytes of its staged deliveries under the
    /// backpressure policy, where they count toward the mark; zero under
    /// the others.
    pub fn staged_bytes(&self) -> usize {
        self.staged_bytes
    }
}

/// Subscribers by [`SubId`] and by routing id. Ids of removed subscribers
/// are reused, so the id space stays as small as the peak subscriber count.
///
/// Peer links live here too, under routing ids of their own (they arrive
/// on another socket, whose ids may collide with subscribers').
#[derive(Debug)]
pub(crate) struct SubscriberTable<P> {
    slots: Vec<Option<Subscriber<P>>>,
    free: Vec<SubId>,
    by_routing_id: HashMap<RoutingId, SubId>,
    by_peer_routing_id: HashMap<RoutingId, SubId>,
}

impl<P> Default for SubscriberTable<P> {
    fn default() -> Self {
        SubscriberTable {
            slots: Vec::new(),
            free: Vec::new(),
            by_routing_id: HashMap::new(),
            by_peer_routing_id: HashMap::new(),
        }
    }
}

impl<P> SubscriberTable<P> {
    /// Number of subscribers (peers not counted).
    pub(crate) fn len(&self) -> usize {
        self.by_routing_id.len()
    }

    /// Number of peer links.
    pub(crate) fn peer_count(&self) -> usize {
        self.by_peer_routing_id.len()
    }

    /// The id of the peer link with this routing id on the cluster socket.
    pub(crate) fn lookup_peer(&self, routing_id: &[u8]) -> Option<SubId> {
        self.by_peer_routing_id.get(routing_id).copied()
    }

    /// Adds a peer link's record; the caller has checked it is not present.
    pub(crate) fn insert_peer(&mut self, routing_id: &[u8], now: Instant) -> SubId {
        let id = self.insert_slot(Subscriber::new(routing_id, now));
        self.by_peer_routing_id
            .insert(RoutingId::from_slice(routing_id), id);
        id
    }

    /// Moves a peer's record to a new connection. True if it moved.
    pub(crate) fn rename_peer(&mut self, id: SubId, routing_id: &[u8]) -> bool {
        let Some(record) = self.slots.get_mut(id as usize).and_then(Option::as_mut) else {
            return false;
        };
        if record.routing_id[..] == *routing_id {
            return false;
        }
        self.by_peer_routing_id.remove(&record.routing_id[..]);
        record.routing_id = RoutingId::from_slice(routing_id);
        self.by_peer_routing_id
            .insert(RoutingId::from_slice(routing_id), id);
        true
    }

    /// Calls `f` on every record, peers included.
    pub(crate) fn for_each_mut(&mut self, mut f: impl FnMut(&mut Subscriber<P>)) {
        self.slots.iter_mut().flatten().for_each(&mut f);
    }

    fn insert_slot(&mut self, record: Subscriber<P>) -> SubId {
        match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(record);
                id
            }
            None => {
                self.slots.push(Some(record));
                SubId::try_from(self.slots.len() - 1).expect("max_subscribers fits in u32")
            }
        }
    }

    /// The id of the subscriber with this routing id.
    pub(crate) fn lookup(&self, routing_id: &[u8]) -> Option<SubId> {
        self.by_routing_id.get(routing_id).copied()
    }

    /// Adds a subscriber; the caller has checked it is not present.
    pub(crate) fn insert(&mut self, routing_id: &[u8], now: Instant) -> SubId {
        let id = self.insert_slot(Subscriber::new(routing_id, now));
        self.by_routing_id
            .insert(RoutingId::from_slice(routing_id), id);
        id
    }

    /// An id no subscriber will get, for a front the routing index names
    /// like a subscriber (its slot stays empty).
    pub(crate) fn reserve(&mut self) -> SubId {
        self.slots.push(None);
        SubId::try_from(self.slots.len() - 1).expect("max_subscribers fits in u32")
    }

    /// Removes and returns a subscriber.
    pub(crate) fn remove(&mut self, id: SubId) -> Option<Subscriber<P>> {
        let record = self.slots.get_mut(id as usize)?.take()?;
        if record.peer.is_some() {
            self.by_peer_routing_id.remove(&record.routing_id[..]);
        } else {
            self.by_routing_id.remove(&record.routing_id[..]);
        }
        self.free.push(id);
        Some(record)
    }

    /// The subscriber with this id.
    pub(crate) fn get(&self, id: SubId) -> Option<&Subscriber<P>> {
        self.slots.get(id as usize)?.as_ref()
    }

    /// The subscriber with this id, mutably.
    pub(crate) fn get_mut(&mut self, id: SubId) -> Option<&mut Subscriber<P>> {
        self.slots.get_mut(id as usize)?.as_mut()
    }

    /// Every subscriber with its id.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (SubId, &Subscriber<P>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i as SubId, s.as_ref()?)))
    }
}
