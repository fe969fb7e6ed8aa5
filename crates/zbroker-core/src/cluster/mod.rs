//! A cluster of brokers: interest propagation over a full mesh, one hop
//! for every message (docs/CLUSTERING.md has the design and its limits).
//!
//! Every broker keeps, for each peer, one outgoing **link**: it connects
//! to the peer's cluster endpoint, says [`Hello`](wire::LinkMessage::Hello),
//! tells the peer its [interest](interest::InterestTable) (the union of its
//! local filters, as a snapshot and then change by change), pings it, and
//! receives on that same link the messages published at the peer that its
//! interest matches. On its own cluster endpoint it serves the other side
//! of its peers' links: each peer's interest sits in the broker's routing
//! index under an id of its own, like a subscriber's filters, so a local
//! message goes once to every peer whose interest matches, through a
//! bounded queue. A message that came from a peer goes to local
//! subscribers only: at most one hop.
//!
//! This module holds the pieces that need no broker: the wire format
//! ([`wire`]), the interest table ([`interest`]) and the state of the
//! outgoing links ([`Link`]); the broker (`broker::peers`) ties them to
//! the routing index and the subscriber table.

use std::time::{Duration, Instant};

use crate::filter::Filter;

pub mod interest;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod wire;

pub use interest::InterestTable;

/// Names an outgoing link for the life of the link; ids of removed links
/// are not reused while the broker runs.
pub type LinkId = u64;

/// Who a broker is in its cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Unique among the members.
    pub broker_id: String,
    /// Different at every start: peers learn from it that this broker's
    /// state starts over.
    pub epoch: u64,
}

/// What an outgoing link knows of the peer at its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Never answered yet.
    Connecting,
    /// Answered within the peer timeout.
    Up,
    /// Answered once, silent for the peer timeout since.
    Down,
    /// The peer refused the link for good (another protocol version, or
    /// the endpoint is this broker itself).
    Refused(String),
}

/// One outgoing link to a peer, as the broker sees it.
#[derive(Clone, Debug)]
pub struct Link {
    pub(crate) id: LinkId,
    pub(crate) endpoint: String,
    pub(crate) state: LinkState,
    /// The peer's id and epoch, from its last PONG.
    pub(crate) peer: Option<(String, u64)>,
    /// HELLO and a full snapshot are owed: the link is new, the peer asked
    /// (RESET), restarted, or a change could not be sent.
    pub(crate) needs_hello: bool,
    pub(crate) last_ping: Option<Instant>,
    pub(crate) last_heard: Option<Instant>,
    pub(crate) created: Instant,
    /// The last FORWARD seq received from the peer's current epoch.
    pub(crate) last_seq: u64,
    pub(crate) stats: LinkStats,
}

/// What one outgoing link counted since it was added.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Messages received from the peer (FORWARD).
    pub received: u64,
    /// Times a FORWARD seq jumped: the peer dropped messages for this
    /// broker (each time, every local subscriber is shown a gap).
    pub gaps: u64,
    /// Messages the jumps skipped.
    pub lost: u64,
    /// HELLOs (with snapshots) sent.
    pub hellos: u64,
    /// Interest changes sent one by one.
    pub interest_changes: u64,
}

impl Link {
    /// The link's id.
    pub fn id(&self) -> LinkId {
        self.id
    }
    /// The peer endpoint it connects to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
    /// What it knows of the peer.
    pub fn state(&self) -> &LinkState {
        &self.state
    }
    /// The peer's broker id, once it answered.
    pub fn peer_id(&self) -> Option<&str> {
        self.peer.as_ref().map(|(id, _)| id.as_str())
    }
    /// Its counters.
    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }
}

/// The cluster side of a broker: its identity, its interest, its outgoing
/// links and the interest changes not sent yet.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub(crate) me: Identity,
    pub(crate) interest: InterestTable,
    /// Changes to `interest` since the last flush, in order, with the
    /// version each produced.
    pub(crate) outbox: Vec<(u64, bool, Filter)>,
    pub(crate) links: Vec<Link>,
    next_link: LinkId,
    pub(crate) ping_interval: Duration,
    pub(crate) peer_timeout: Duration,
    /// Scratch buffer for encoding.
    pub(crate) buf: Vec<u8>,
    /// When the broker joined: publishers wait at most `peer_timeout` from
    /// here for the peers' interest.
    pub(crate) started: Instant,
    /// The member list is known (static peers at once, etcd's first list).
    pub(crate) members_known: bool,
    /// Every peer's interest arrived, or the wait ran out.
    pub(crate) warm: bool,
}

impl Cluster {
    pub(crate) fn new(
        me: Identity,
        ping_interval: Duration,
        peer_timeout: Duration,
        now: Instant,
    ) -> Self {
        Cluster {
            me,
            interest: InterestTable::new(),
            outbox: Vec::new(),
            links: Vec::new(),
            next_link: 1,
            ping_interval,
            peer_timeout,
            buf: Vec::new(),
            started: now,
            members_known: false,
            warm: false,
        }
    }

    /// A local holder of `filter` more (`add`) or fewer; queues the change
    /// for the peers when the union changed.
    pub(crate) fn note(&mut self, add: bool, filter: &Filter) {
        let changed = if add {
            self.interest.add(filter)
        } else {
            self.interest.remove(filter)
        };
        if changed {
            // Links owing a snapshot will send the whole table anyway.
            if self.links.iter().any(|l| !l.needs_hello) {
                self.outbox
                    .push((self.interest.version(), add, filter.clone()));
            }
        }
    }

    pub(crate) fn add_link(&mut self, endpoint: &str, now: Instant) -> LinkId {
        let id = self.next_link;
        self.next_link += 1;
        self.links.push(Link {
            id,
            endpoint: endpoint.to_string(),
            state: LinkState::Connecting,
            peer: None,
            needs_hello: true,
            last_ping: None,
            last_heard: None,
            created: now,
            last_seq: 0,
            stats: LinkStats::default(),
        });
        id
    }

    pub(crate) fn link_mut(&mut self, id: LinkId) -> Option<&mut Link> {
        self.links.iter_mut().find(|l| l.id == id)
    }
}
