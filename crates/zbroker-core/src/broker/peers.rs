//! The broker in a cluster: its peers' interest in its routing index, its
//! own interest sent over its outgoing links, and messages forwarded one
//! hop (see [`crate::cluster`] and docs/CLUSTERING.md).
//!
//! A peer (the far end of a link served on this broker's cluster endpoint)
//! is a record in the subscriber table with a [`PeerRecord`]: its filters
//! are its broker's interest, its queue is bounded by the cluster queue
//! settings under `drop-new`, and its seq numbers every message routed to
//! it, so its broker sees any loss as a jump. Unlike a subscriber it is
//! addressed by its own routing ids (the cluster endpoint is another
//! socket), expires after `peer_timeout`, and is never cut off.

use std::time::Instant;

use hashbrown::{HashMap, HashSet};

use super::{Broker, Hex, Payload, SendOutcome, Transport};
use crate::cluster::wire::{
    self, LINK_PROTOCOL_VERSION, LinkMessage, SNAPSHOT_CHUNK_FILTERS, WireFilter,
};
use crate::cluster::{Cluster, Identity, Link, LinkId, LinkState};
use crate::counters::PeerFigures;
use crate::filter::Filter;
use crate::index::SubId;

/// What the broker holds about a peer besides its subscriber-like record.
#[derive(Debug)]
pub(crate) struct PeerRecord {
    pub(crate) broker_id: String,
    pub(crate) epoch: u64,
    /// The last interest version applied; `None` while a snapshot is owed
    /// (after HELLO, or after a change arrived out of order).
    pub(crate) version: Option<u64>,
    /// A snapshot being received: the next chunk expected and the filters
    /// so far.
    pub(crate) pending: Option<(u32, Vec<Filter>)>,
    /// Messages handed to libzmq for it.
    pub(crate) forwarded: u64,
    /// Filters of its interest refused by `max_peer_filters`.
    pub(crate) refused_filters: u64,
}

/// One peer as [`Broker::peers`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's broker id.
    pub broker_id: String,
    /// Its epoch.
    pub epoch: u64,
    /// Filters of its interest held here.
    pub interest: usize,
    /// Messages forwarded to it.
    pub forwarded: u64,
    /// Messages for it dropped (its queue was full, or its link broke).
    pub dropped: u64,
    /// Messages waiting in its queue.
    pub queued: usize,
    /// Filters of its interest refused by `max_peer_filters`.
    pub refused_filters: u64,
}

/// How many forgotten peers' sequence numbers are remembered, so a peer
/// that comes back (same epoch) sees what it missed as a gap.
const MAX_TOMBSTONES: usize = 4096;

impl<P: Payload> Broker<P> {
    /// Makes this broker a cluster member named `me`: from now on local
    /// filters are its interest, sent over every link added with
    /// [`add_link`](Self::add_link), and [`on_peer_message`] serves its
    /// peers' links. Idempotent; the first identity stays.
    ///
    /// [`on_peer_message`]: Self::on_peer_message
    pub fn enable_cluster(&mut self, me: Identity, now: Instant) {
        if self.cluster.is_some() {
            return;
        }
        let settings = &self.config.cluster;
        let mut cluster = Cluster::new(me, settings.ping_interval, settings.peer_timeout, now);
        for (_, sub) in self.subs.iter() {
            for filter in &sub.filters {
                cluster.note(true, filter);
            }
        }
        if let Some(front) = &self.xpub {
            for filter in front.filters() {
                cluster.note(true, &filter);
            }
        }
        cluster.outbox.clear();
        self.cluster = Some(cluster);
    }

    /// The member list is known (static peers, or the registry's first
    /// list): from now on the broker waits only for the listed peers'
    /// interest before reading publishers (see
    /// [`cluster_warming`](Self::cluster_warming)).
    pub fn members_known(&mut self) {
        if let Some(cluster) = &mut self.cluster {
            cluster.members_known = true;
        }
    }

    /// Whether a broker that just joined must still hold its publishers
    /// back: until the member list is known and every peer's link has
    /// delivered its interest snapshot, or `peer_timeout` has passed since
    /// the start. A message read earlier would reach local subscribers
    /// only, with no gap anywhere to show it: a restarted broker's
    /// publishers (with what they queued meanwhile) are the common case.
    /// Always false unclustered.
    pub fn cluster_warming(&mut self, now: Instant) -> bool {
        let Some(cluster) = &self.cluster else {
            return false;
        };
        if cluster.warm {
            return false;
        }
        let linked = |link: &Link| {
            matches!(link.state, LinkState::Refused(_))
                || link.peer.as_ref().is_some_and(|(id, _)| {
                    self.peer_ids
                        .get(id)
                        .and_then(|&sid| self.subs.get(sid))
                        .and_then(|s| s.peer.as_ref())
                        .is_some_and(|p| p.version.is_some())
                })
        };
        let ready = cluster.members_known && cluster.links.iter().all(linked);
        let waited = now.saturating_duration_since(cluster.started) >= cluster.peer_timeout;
        if ready || waited {
            let missing: Vec<&str> = cluster
                .links
                .iter()
                .filter(|l| !linked(l))
                .map(|l| l.endpoint.as_str())
                .collect();
            if missing.is_empty() {
                tracing::info!("every peer's interest is in: reading publishers");
            } else {
                tracing::warn!(
                    ?missing,
                    "reading publishers without these peers' interest (silent for the peer \
                     timeout): their subscribers miss what is published until they link"
                );
            }
            if let Some(cluster) = &mut self.cluster {
                cluster.warm = true;
            }
            return false;
        }
        true
    }

    /// This broker's identity, once clustered.
    pub fn identity(&self) -> Option<&Identity> {
        self.cluster.as_ref().map(|c| &c.me)
    }

    /// Adds an outgoing link to the peer at `endpoint`; the event loop
    /// connects a socket for it and passes what arrives to
    /// [`on_link_message`](Self::on_link_message). `None` unless clustered.
    pub fn add_link(&mut self, endpoint: &str, now: Instant) -> Option<LinkId> {
        let cluster = self.cluster.as_mut()?;
        tracing::info!(endpoint, "peer link added");
        Some(cluster.add_link(endpoint, now))
    }

    /// Removes an outgoing link (its peer left the membership).
    pub fn remove_link(&mut self, link: LinkId) {
        if let Some(cluster) = &mut self.cluster
            && let Some(at) = cluster.links.iter().position(|l| l.id == link)
        {
            let gone = cluster.links.remove(at);
            tracing::info!(endpoint = gone.endpoint, peer = ?gone.peer_id(), "peer link removed");
        }
    }

    /// The outgoing link `link` (re)connected: the peer may hold nothing
    /// for this broker, so HELLO and a snapshot go now rather than after
    /// the peer's RESET.
    pub fn on_link_connected(&mut self, link: LinkId, out: &mut impl Transport<P>) {
        if let Some(state) = self.cluster.as_mut().and_then(|c| c.link_mut(link)) {
            state.needs_hello = true;
        }
        self.flush_interest(out);
    }

    /// The outgoing links.
    pub fn links(&self) -> &[Link] {
        self.cluster.as_ref().map_or(&[], |c| &c.links)
    }

    /// The local interest: distinct filters held by local subscribers and
    /// SUB sockets, what the peers are told.
    pub fn interest_len(&self) -> usize {
        self.cluster.as_ref().map_or(0, |c| c.interest.len())
    }

    /// The local interest's version: changes peers were told of since
    /// start.
    pub fn interest_version(&self) -> u64 {
        self.cluster.as_ref().map_or(0, |c| c.interest.version())
    }

    /// How many local holders (subscribers, and SUB sockets on the XPUB
    /// front) `filter` has in the interest.
    pub fn interest_holders(&self, filter: &Filter) -> u32 {
        self.cluster
            .as_ref()
            .map_or(0, |c| c.interest.count(filter))
    }

    /// The local interest, each filter once (for tests and `zbroker stats`).
    pub fn interest(&self) -> impl Iterator<Item = &Filter> {
        self.cluster.iter().flat_map(|c| c.interest.filters())
    }

    /// The peers whose links this broker serves, with their figures.
    pub fn peers(&self) -> impl Iterator<Item = PeerInfo> + '_ {
        self.subs.iter().filter_map(|(_, sub)| {
            let peer = sub.peer.as_ref()?;
            Some(PeerInfo {
                broker_id: peer.broker_id.clone(),
                epoch: peer.epoch,
                interest: sub.filters.len(),
                forwarded: peer.forwarded,
                dropped: sub.dropped,
                queued: sub.queue.len(),
                refused_filters: peer.refused_filters,
            })
        })
    }

    /// Per-peer figures for the metrics: each outgoing link, merged with
    /// the served link of the same broker id, then peers served only.
    pub(super) fn peer_figures(&self) -> Vec<PeerFigures> {
        let mut figures: Vec<PeerFigures> = self
            .links()
            .iter()
            .map(|link| PeerFigures {
                peer: link.peer_id().unwrap_or(&link.endpoint).to_string(),
                endpoint: link.endpoint.clone(),
                up: u64::from(link.state == LinkState::Up),
                received: link.stats.received,
                lost: link.stats.lost,
                ..PeerFigures::default()
            })
            .collect();
        for peer in self.peers() {
            let at = match figures.iter().position(|f| f.peer == peer.broker_id) {
                Some(at) => at,
                None => {
                    figures.push(PeerFigures {
                        peer: peer.broker_id.clone(),
                        ..PeerFigures::default()
                    });
                    figures.len() - 1
                }
            };
            let entry = &mut figures[at];
            entry.interest_entries = peer.interest as u64;
            entry.forwarded = peer.forwarded;
            entry.dropped = peer.dropped;
            entry.queued = peer.queued as u64;
        }
        figures
    }

    /// A peer's interest as held here (for tests).
    pub fn peer_interest(&self, broker_id: &str) -> Option<impl Iterator<Item = &Filter>> {
        let id = *self.peer_ids.get(broker_id)?;
        Some(self.subs.get(id)?.filters.iter())
    }

    /// Handles one message on the cluster endpoint from the peer at
    /// `routing_id`: HELLO, interest, snapshots and PING. `frames` holds
    /// its first frames, `frame_count` how many it had.
    pub fn on_peer_message(
        &mut self,
        routing_id: &[u8],
        frames: &[&[u8]],
        frame_count: usize,
        now: Instant,
        out: &mut impl Transport<P>,
    ) {
        self.send_routed(out);
        if self.cluster.is_none() {
            return;
        }
        let message = match frames.first().map(|f| wire::decode(f)) {
            Some(Ok(message)) if frame_count == 1 => message,
            Some(Ok(_)) => {
                self.peer_protocol_error(routing_id, "a peer message of several frames", now, out);
                return;
            }
            Some(Err(e)) => {
                self.peer_protocol_error(routing_id, &e.to_string(), now, out);
                return;
            }
            None => return,
        };
        let id = self.subs.lookup_peer(routing_id);
        if let Some(sub) = id.and_then(|id| self.subs.get_mut(id)) {
            sub.last_heard = now;
        }
        match (message, id) {
            (
                LinkMessage::Hello {
                    version,
                    broker_id,
                    epoch,
                },
                _,
            ) => self.on_hello(routing_id, version, broker_id, epoch, now, out),
            (
                LinkMessage::Interest {
                    version,
                    add,
                    filter,
                },
                Some(id),
            ) => self.on_interest_change(id, version, add, filter, out),
            (
                LinkMessage::Snapshot {
                    version,
                    part,
                    last,
                    filters,
                },
                Some(id),
            ) => self.on_snapshot_chunk(id, version, part, last, &filters, out),
            (LinkMessage::Ping { version }, Some(id)) => {
                let (me, held) = match (&self.cluster, self.subs.get(id)) {
                    (Some(c), Some(sub)) => {
                        (c.me.clone(), sub.peer.as_ref().and_then(|p| p.version))
                    }
                    _ => return,
                };
                // Everything the peer sent before this PING has arrived:
                // holding another version means a change or a snapshot
                // chunk was lost on the way.
                if held != Some(version) {
                    self.reset_peer(id, "interest behind the PING's version", out);
                } else {
                    let pong = LinkMessage::Pong {
                        broker_id: &me.broker_id,
                        epoch: me.epoch,
                        version,
                    };
                    self.send_to_peer(routing_id, &pong, out);
                }
            }
            (
                LinkMessage::Interest { .. }
                | LinkMessage::Snapshot { .. }
                | LinkMessage::Ping { .. },
                None,
            ) => {
                // A link this broker holds nothing for (it restarted, or
                // forgot a silent peer): the peer starts over.
                let reset = LinkMessage::Reset {
                    reason: "no state for this link; send HELLO",
                };
                self.send_to_peer(routing_id, &reset, out);
            }
            (_, _) => {
                self.peer_protocol_error(routing_id, "a message only links receive", now, out);
            }
        }
        self.remove_gone();
        self.flush_interest(out);
    }

    fn on_hello(
        &mut self,
        routing_id: &[u8],
        version: u16,
        broker_id: &str,
        epoch: u64,
        now: Instant,
        out: &mut impl Transport<P>,
    ) {
        let Some(me) = self.cluster.as_ref().map(|c| c.me.broker_id.clone()) else {
            return;
        };
        let refusal = if version != LINK_PROTOCOL_VERSION {
            Some(format!(
                "link protocol version {version}; this broker speaks {LINK_PROTOCOL_VERSION}"
            ))
        } else if broker_id == me {
            Some("this endpoint is the broker itself".to_string())
        } else {
            None
        };
        if let Some(reason) = refusal {
            if broker_id != me {
                tracing::warn!(peer = broker_id, "refused a peer link: {reason}");
            }
            self.send_to_peer(routing_id, &LinkMessage::Refused { reason: &reason }, out);
            return;
        }
        // The record this peer had, under this connection or another one.
        let existing = self
            .subs
            .lookup_peer(routing_id)
            .or_else(|| self.peer_ids.get(broker_id).copied());
        let id = match existing {
            Some(id) => {
                let Some(sub) = self.subs.get_mut(id) else {
                    return;
                };
                let Some(peer) = sub.peer.as_mut() else {
                    return;
                };
                let same_epoch = peer.epoch == epoch && peer.broker_id == broker_id;
                if !same_epoch {
                    tracing::info!(
                        peer = broker_id,
                        old_epoch = peer.epoch,
                        epoch,
                        "peer restarted: its state starts over"
                    );
                    peer.epoch = epoch;
                    // Its old queue means nothing to its new epoch.
                    self.drop_queue(id);
                    if let Some(sub) = self.subs.get_mut(id) {
                        sub.last_seq = 0;
                    }
                }
                if self.subs.rename_peer(id, routing_id) {
                    tracing::info!(peer = broker_id, "peer link reconnected");
                }
                id
            }
            None => {
                let id = self.subs.insert_peer(routing_id, now);
                let tombstone = self.peer_tombstones.remove(broker_id);
                if let Some(sub) = self.subs.get_mut(id) {
                    // Back with the same epoch after being forgotten:
                    // what was not routed to it meanwhile is lost, which
                    // its broker sees as a jump of one.
                    if let Some((old_epoch, last_seq)) = tombstone
                        && old_epoch == epoch
                    {
                        sub.last_seq = last_seq + 1;
                    }
                    sub.peer = Some(Box::new(PeerRecord {
                        broker_id: broker_id.to_string(),
                        epoch,
                        version: None,
                        pending: None,
                        forwarded: 0,
                        refused_filters: 0,
                    }));
                }
                self.peer_ids.insert(broker_id.to_string(), id);
                self.counters.peer_hellos += 1;
                tracing::info!(peer = broker_id, epoch, "peer connected its link");
                id
            }
        };
        if let Some(peer) = self.subs.get_mut(id).and_then(|s| s.peer.as_mut()) {
            // Its interest stays as it was until the snapshot replaces it,
            // so nothing it wants is missed meanwhile.
            peer.version = None;
            peer.pending = None;
        }
    }

    fn on_interest_change(
        &mut self,
        id: SubId,
        version: u64,
        add: bool,
        filter: WireFilter<'_>,
        out: &mut impl Transport<P>,
    ) {
        let max_len = self
            .config
            .limits
            .max_filter_len
            .max(crate::config::MAX_LENGTH_SETTING);
        let in_order = self
            .subs
            .get(id)
            .and_then(|s| s.peer.as_ref())
            .is_some_and(|p| p.version.is_some_and(|v| v + 1 == version) && p.pending.is_none());
        let Some(filter) = filter.to_filter(max_len) else {
            self.counters.peer_malformed += 1;
            return;
        };
        if !in_order {
            self.reset_peer(id, "an interest change out of order", out);
            return;
        }
        if add {
            self.add_peer_filter(id, filter);
        } else {
            self.remove_peer_filter(id, &filter);
        }
        if let Some(peer) = self.subs.get_mut(id).and_then(|s| s.peer.as_mut()) {
            peer.version = Some(version);
        }
        self.counters.peer_interest_changes += 1;
    }

    fn on_snapshot_chunk(
        &mut self,
        id: SubId,
        version: u64,
        part: u32,
        last: bool,
        filters: &[WireFilter<'_>],
        out: &mut impl Transport<P>,
    ) {
        let max_len = self
            .config
            .limits
            .max_filter_len
            .max(crate::config::MAX_LENGTH_SETTING);
        let max_filters = self.config.cluster.max_peer_filters;
        let Some(peer) = self.subs.get_mut(id).and_then(|s| s.peer.as_mut()) else {
            return;
        };
        let expected = peer.pending.as_ref().map_or(0, |(next, _)| *next);
        if part != expected || filters.len() > SNAPSHOT_CHUNK_FILTERS {
            self.reset_peer(id, "a snapshot chunk out of order", out);
            return;
        }
        let (next, pending) = peer.pending.get_or_insert_with(|| (0, Vec::new()));
        *next += 1;
        for filter in filters {
            match filter.to_filter(max_len) {
                Some(filter) if pending.len() < max_filters => pending.push(filter),
                Some(_) => peer.refused_filters += 1,
                None => self.counters.peer_malformed += 1,
            }
        }
        if !last {
            return;
        }
        let Some((_, wanted)) = peer.pending.take() else {
            return;
        };
        peer.version = Some(version);
        let wanted: HashSet<Filter> = wanted.into_iter().collect();
        let stale: Vec<Filter> = self
            .subs
            .get(id)
            .map(|s| s.filters.difference(&wanted).cloned().collect())
            .unwrap_or_default();
        for filter in &stale {
            self.remove_peer_filter(id, filter);
        }
        for filter in wanted {
            self.add_peer_filter(id, filter);
        }
        self.counters.peer_snapshots += 1;
        if let Some(peer) = self.subs.get(id).and_then(|s| s.peer.as_ref()) {
            tracing::debug!(
                peer = peer.broker_id,
                filters = self.subs.get(id).map_or(0, |s| s.filters.len()),
                "peer interest snapshot applied"
            );
        }
    }

    fn add_peer_filter(&mut self, id: SubId, filter: Filter) {
        let max = self.config.cluster.max_peer_filters;
        let Some(sub) = self.subs.get_mut(id) else {
            return;
        };
        if sub.filters.contains(&filter) {
            return;
        }
        if sub.filters.len() >= max {
            if let Some(peer) = sub.peer.as_mut() {
                peer.refused_filters += 1;
                tracing::warn!(
                    peer = peer.broker_id,
                    "refused a filter of a peer's interest: it holds the limit of {max}; \
                     raise --cluster-max-peer-filters"
                );
            }
            return;
        }
        self.index.insert(&filter, id);
        sub.filters.insert(filter);
    }

    fn remove_peer_filter(&mut self, id: SubId, filter: &Filter) {
        if let Some(sub) = self.subs.get_mut(id)
            && sub.filters.remove(filter)
        {
            self.index.remove(filter, id);
        }
    }

    /// The peer's link state is inconsistent: it must send HELLO and a
    /// snapshot again. Its interest stays meanwhile.
    fn reset_peer(&mut self, id: SubId, why: &str, out: &mut impl Transport<P>) {
        let Some(sub) = self.subs.get_mut(id) else {
            return;
        };
        if let Some(peer) = sub.peer.as_mut() {
            peer.version = None;
            peer.pending = None;
        }
        self.counters.peer_resets += 1;
        let routing_id = sub.routing_id.clone();
        self.send_to_peer(&routing_id, &LinkMessage::Reset { reason: why }, out);
    }

    fn peer_protocol_error(
        &mut self,
        routing_id: &[u8],
        why: &str,
        now: Instant,
        out: &mut impl Transport<P>,
    ) {
        self.counters.peer_malformed += 1;
        self.command_log.warn(
            now,
            format_args!("a peer link ({}) sent {why}", Hex(routing_id)),
        );
        let reason = format!("unreadable: {why}");
        self.send_to_peer(routing_id, &LinkMessage::Reset { reason: &reason }, out);
    }

    fn send_to_peer(
        &mut self,
        routing_id: &[u8],
        message: &LinkMessage<'_>,
        out: &mut impl Transport<P>,
    ) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        cluster.buf.clear();
        message.encode_into(&mut cluster.buf);
        // Best effort: a control reply lost to a full pipe is repaired by
        // the next PING or RESET.
        let _ = out.to_peer(routing_id, &cluster.buf);
    }

    /// Empties a record's queue, counting its messages as lost.
    fn drop_queue(&mut self, id: SubId) {
        let Some(sub) = self.subs.get_mut(id) else {
            return;
        };
        for item in std::mem::take(&mut sub.queue) {
            self.queues.took(sub, &item);
            super::queues::count_drop(&mut self.counters, sub, &item);
        }
        if sub.in_backlog {
            sub.in_backlog = false;
            self.queues.backlog.retain(|&b| b != id);
        }
    }

    /// Remembers a forgotten peer's last seq, so that if it comes back in
    /// the same epoch it sees the messages it was not routed as a gap.
    pub(super) fn bury_peer(&mut self, broker_id: &str, epoch: u64, last_seq: u64) {
        self.peer_ids.remove(broker_id);
        if self.peer_tombstones.len() >= MAX_TOMBSTONES {
            self.peer_tombstones.clear();
        }
        self.peer_tombstones
            .insert(broker_id.to_string(), (epoch, last_seq));
        tracing::info!(
            peer = broker_id,
            "peer link down: its interest is forgotten"
        );
    }

    /// Handles one message on the outgoing link `link`: a FORWARD (header,
    /// topic and payload in `frames`, three of `frame_count`), PONG, RESET
    /// or REFUSED.
    pub fn on_link_message(
        &mut self,
        link: LinkId,
        frames: &mut [P],
        frame_count: usize,
        now: Instant,
        out: &mut impl Transport<P>,
    ) {
        self.send_routed(out);
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        let Some(header) = frames.first() else {
            return;
        };
        let message = match wire::decode(header.bytes()) {
            Ok(message) => message,
            Err(e) => {
                self.counters.peer_malformed += 1;
                self.command_log
                    .warn(now, format_args!("a peer link sent {e}"));
                return;
            }
        };
        let Some(state) = cluster.links.iter_mut().find(|l| l.id == link) else {
            return;
        };
        state.last_heard = Some(now);
        let was_up = state.state == LinkState::Up;
        if matches!(state.state, LinkState::Connecting | LinkState::Down) {
            state.state = LinkState::Up;
        }
        // Messages skipped by a FORWARD's seq, if it is one.
        let mut forward = None;
        match message {
            LinkMessage::Forward { seq } => {
                let expected = state.last_seq + 1;
                // The first seq after a (re)start of either side sets the
                // base; a late one (lower) is delivered and not counted.
                let skipped = if state.last_seq == 0 {
                    0
                } else {
                    seq.saturating_sub(expected)
                };
                state.last_seq = state.last_seq.max(seq);
                state.stats.received += 1;
                if skipped > 0 {
                    state.stats.gaps += 1;
                    state.stats.lost += skipped;
                }
                forward = Some(skipped);
            }
            LinkMessage::Pong {
                broker_id, epoch, ..
            } => {
                let known = state.peer.as_ref().map(|(id, e)| (id.as_str(), *e));
                if known != Some((broker_id, epoch)) {
                    // The first answer names the peer; a later one with
                    // another epoch means it restarted and holds nothing
                    // (the first answer needs no HELLO: a peer without one
                    // answers PING with RESET instead).
                    if known.is_some() {
                        tracing::info!(
                            endpoint = state.endpoint,
                            peer = broker_id,
                            "peer restarted (new epoch): sending HELLO and interest again"
                        );
                        state.needs_hello = true;
                    }
                    state.peer = Some((broker_id.to_string(), epoch));
                    state.last_seq = 0;
                }
            }
            LinkMessage::Reset { reason } => {
                tracing::debug!(endpoint = state.endpoint, reason, "peer asked for HELLO");
                state.needs_hello = true;
            }
            LinkMessage::Refused { reason } => {
                // Its own endpoint in a shared peer list is expected.
                if !reason.contains("itself") {
                    tracing::warn!(endpoint = state.endpoint, reason, "peer refused the link");
                }
                state.state = LinkState::Refused(reason.to_string());
            }
            LinkMessage::Hello { .. }
            | LinkMessage::Interest { .. }
            | LinkMessage::Snapshot { .. }
            | LinkMessage::Ping { .. } => {
                self.counters.peer_malformed += 1;
            }
        }
        if !was_up && state.state == LinkState::Up {
            tracing::info!(endpoint = state.endpoint, peer = ?state.peer_id(), "link to peer answered: up");
        }
        if let Some(skipped) = forward {
            self.counters.peer_received += 1;
            if skipped > 0 {
                self.counters.peer_lost += skipped;
                self.show_gap_to_all();
            }
            match frames {
                [_, topic, payload, ..] if frame_count == 3 => {
                    self.route_from_peer(topic, payload, now, out);
                    self.send_routed(out);
                    self.remove_gone();
                }
                _ => self.counters.peer_malformed += 1,
            }
        }
        self.flush_interest(out);
    }

    /// An upstream loss this broker cannot attribute: every local
    /// subscriber with a filter skips one seq, so each sees a gap on its
    /// next message.
    fn show_gap_to_all(&mut self) {
        // Staged deliveries take their seqs from `last_seq`: a skip must
        // not happen under them (every caller sent them first).
        debug_assert_eq!(self.staged.deliveries, 0);
        self.subs.for_each_mut(|sub| {
            if sub.peer.is_none() && !sub.filters.is_empty() {
                sub.last_seq += 1;
            }
        });
    }

    /// Routes a message a peer forwarded: to local subscribers and the XPUB
    /// front only, never to another peer.
    fn route_from_peer(
        &mut self,
        topic: &mut P,
        payload: &mut P,
        now: Instant,
        out: &mut impl Transport<P>,
    ) {
        let payload_len = payload.bytes().len() as u64;
        self.index.matches(topic.bytes(), &mut self.matched);
        let subs = &self.subs;
        self.matched
            .retain(|&id| subs.get(id).is_none_or(|s| s.peer.is_none()));
        let to_xpub = self.send_to_xpub(topic.bytes(), payload, payload_len, out);
        if self.matched.is_empty() {
            if !to_xpub {
                self.counters.peer_unmatched += 1;
            }
            return;
        }
        self.stage(topic, payload, payload_len, now, out);
    }

    /// Sends what the links owe: HELLO and snapshots, and the interest
    /// changes since the last call. Cheap when there are none.
    pub(super) fn flush_interest(&mut self, out: &mut impl Transport<P>) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        if cluster.outbox.is_empty() && !cluster.links.iter().any(|l| l.needs_hello) {
            return;
        }
        let outbox = std::mem::take(&mut cluster.outbox);
        let Cluster {
            me,
            interest,
            links,
            buf,
            ..
        } = cluster;
        for link in links.iter_mut() {
            if matches!(link.state, LinkState::Refused(_)) {
                continue;
            }
            if !link.needs_hello {
                for (version, add, filter) in &outbox {
                    let change = LinkMessage::Interest {
                        version: *version,
                        add: *add,
                        filter: WireFilter::of(filter),
                    };
                    if send_on_link(out, link.id, buf, &change) != SendOutcome::Sent {
                        // The change is lost on this link: a snapshot
                        // replaces it.
                        link.needs_hello = true;
                        break;
                    }
                    link.stats.interest_changes += 1;
                }
            }
            if link.needs_hello && send_hello(me, interest, link, buf, out) {
                link.needs_hello = false;
                link.stats.hellos += 1;
                self.counters.peer_snapshots_sent += 1;
            }
        }
    }

    /// [`flush_interest`](Self::flush_interest), then the PINGs that are
    /// due; marks peers silent for `peer_timeout` down. Returns when the
    /// next PING is due.
    pub(super) fn flush_cluster(
        &mut self,
        now: Instant,
        out: &mut impl Transport<P>,
    ) -> Option<Instant> {
        self.flush_interest(out);
        let cluster = self.cluster.as_mut()?;
        let mut next = None::<Instant>;
        let Cluster {
            links,
            buf,
            ping_interval,
            peer_timeout,
            interest,
            ..
        } = cluster;
        for link in links.iter_mut() {
            if matches!(link.state, LinkState::Refused(_)) {
                continue;
            }
            let due = link.last_ping.map_or(now, |at| at + *ping_interval);
            if now >= due {
                let ping = LinkMessage::Ping {
                    version: interest.version(),
                };
                // A PING refused (not connected yet) is retried at the
                // next interval; silence is judged on answers, not sends.
                let _ = send_on_link(out, link.id, buf, &ping);
                link.last_ping = Some(now);
            }
            let heard = link.last_heard.unwrap_or(link.created);
            if link.state == LinkState::Up && now.saturating_duration_since(heard) >= *peer_timeout
            {
                tracing::warn!(
                    endpoint = link.endpoint,
                    peer = ?link.peer_id(),
                    "peer silent for {} ms: down",
                    peer_timeout.as_millis()
                );
                link.state = LinkState::Down;
                self.counters.peer_downs += 1;
            }
            let ping_at = link.last_ping.map_or(now, |at| at + *ping_interval);
            next = Some(next.map_or(ping_at, |n: Instant| n.min(ping_at)));
        }
        next
    }
}

/// Encodes `message` into `buf` and sends it on the outgoing link `link`.
fn send_on_link<P>(
    out: &mut impl Transport<P>,
    link: LinkId,
    buf: &mut Vec<u8>,
    message: &LinkMessage<'_>,
) -> SendOutcome {
    buf.clear();
    message.encode_into(buf);
    out.to_link(link, buf)
}

/// Sends HELLO and the whole interest in chunks on `link`. False if a send
/// was refused (the link is not connected, or its pipe is full): the link
/// still owes it.
fn send_hello<P>(
    me: &Identity,
    interest: &crate::cluster::InterestTable,
    link: &Link,
    buf: &mut Vec<u8>,
    out: &mut impl Transport<P>,
) -> bool {
    let hello = LinkMessage::Hello {
        version: LINK_PROTOCOL_VERSION,
        broker_id: &me.broker_id,
        epoch: me.epoch,
    };
    if send_on_link(out, link.id, buf, &hello) != SendOutcome::Sent {
        return false;
    }
    let filters: Vec<&Filter> = interest.filters().collect();
    // An empty interest is one empty last chunk: the peer must still learn
    // that it holds nothing.
    let chunks = filters.len().div_ceil(SNAPSHOT_CHUNK_FILTERS).max(1);
    for part in 0..chunks {
        let start = part * SNAPSHOT_CHUNK_FILTERS;
        let chunk = &filters[start..(start + SNAPSHOT_CHUNK_FILTERS).min(filters.len())];
        let snapshot = LinkMessage::Snapshot {
            version: interest.version(),
            part: u32::try_from(part).unwrap_or(u32::MAX),
            last: part + 1 == chunks,
            filters: chunk.iter().map(|f| WireFilter::of(f)).collect(),
        };
        if send_on_link(out, link.id, buf, &snapshot) != SendOutcome::Sent {
            return false;
        }
    }
    true
}

/// For [`HashMap`] users in the broker.
pub(super) type PeerIds = HashMap<String, SubId>;
/// Forgotten peers: epoch and last seq, by broker id.
pub(super) type PeerTombstones = HashMap<String, (u64, u64)>;
