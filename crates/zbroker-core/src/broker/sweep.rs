//! The sweep [`Broker::tick`] runs a few times per `sub_timeout`, and
//! where subscribers are let go.
//!
//! A subscriber silent for `sub_timeout` is expired: told so, best effort,
//! and forgotten. Under the `disconnect` and `backpressure` overflow
//! policies a subscriber that stays stuck for `disconnect_after` is cut
//! off: it loses its filters and queue but keeps its record, so it can be
//! told why once its pipe drains. One found unreachable is forgotten at
//! the end of the call that found it.

use std::time::Instant;

use crate::cluster::Cluster;
use crate::filter::Filter;

use super::commands::release_key_filters;
use super::queues::{count_drop, reply_bound};
use super::transport::send_reply;
use super::{Broker, Hex, Payload, Transport};
use crate::config::OverflowPolicy;
use crate::index::SubId;
use crate::protocol::ErrorCode;
use crate::subscribers::{Queued, Reply};

impl<P: Payload> Broker<P> {
    /// Tells every subscriber silent for `sub_timeout` that it expired,
    /// best effort, and forgets it.
    pub(super) fn expire_silent(&mut self, now: Instant, out: &mut impl Transport<P>) {
        let timeout = self.config.sub_timeout;
        let peer_timeout = self.config.cluster.peer_timeout;
        self.gone.extend(
            self.subs
                .iter()
                .filter(|(_, sub)| {
                    let limit = if sub.peer.is_some() {
                        peer_timeout
                    } else {
                        timeout
                    };
                    now.saturating_duration_since(sub.last_heard) >= limit
                })
                .map(|(id, _)| id),
        );
        for &id in &self.gone {
            if let Some(sub) = self.subs.get(id)
                && sub.peer.is_none()
            {
                // Best effort: if it is alive after all, it learns it must
                // subscribe again.
                let text = format!(
                    "expired: no command for {} ms; subscribe again",
                    timeout.as_millis()
                );
                send_reply(out, &sub.routing_id, &Reply::Err(ErrorCode::Limit, text));
            }
        }
        for id in std::mem::take(&mut self.gone) {
            let peer = self.subs.get(id).is_some_and(|s| s.peer.is_some());
            if self.forget(id) {
                if peer {
                    self.counters.peer_expired += 1;
                } else {
                    self.counters.expired_subscribers += 1;
                }
            }
        }
    }

    /// Under `backpressure`, starts the cut-off clock of every subscriber
    /// holding publishers back.
    pub(super) fn start_backpressure_clocks(&mut self, now: Instant) {
        if self.config.queue.policy == OverflowPolicy::Backpressure {
            // A subscriber holding publishers back starts the clock here:
            // one past its own mark, or, while all queues together are past
            // theirs, any with messages queued. Taking anything (in
            // `flush`) stops it.
            let all_over = self.queues.bytes >= self.queues.mark.total_bytes;
            for &id in &self.queues.backlog {
                if let Some(sub) = self.subs.get_mut(id)
                    && sub.peer.is_none()
                    && (sub.over_mark || all_over && sub.queue.len() > sub.queued_replies)
                    && sub.full_since.is_none()
                {
                    sub.full_since = Some(now);
                }
            }
        }
    }

    /// Under `disconnect` and `backpressure`, cuts off every subscriber
    /// whose clock has run for `disconnect_after`.
    pub(super) fn cut_off_slow(&mut self, now: Instant) {
        if matches!(
            self.config.queue.policy,
            OverflowPolicy::Disconnect | OverflowPolicy::Backpressure
        ) {
            let cutoff = self.config.queue.disconnect_after;
            let slow: Vec<SubId> = self
                .queues
                .backlog
                .iter()
                .copied()
                .filter(|&id| {
                    self.subs
                        .get(id)
                        .and_then(|s| s.full_since)
                        .is_some_and(|since| now.saturating_duration_since(since) >= cutoff)
                })
                .collect();
            for id in slow {
                self.cut_off(id, now);
            }
        }
    }

    /// The `disconnect` policy (and `backpressure`'s bound): a subscriber
    /// whose queue stayed full, or that held publishers back taking
    /// nothing, loses its filters and queue, and is told so once its pipe
    /// drains.
    fn cut_off(&mut self, id: SubId, now: Instant) {
        let Some(sub) = self.subs.get_mut(id) else {
            return;
        };
        for filter in sub.filters.drain() {
            self.index.remove(&filter, id);
            note_interest(&mut self.cluster, false, &filter);
        }
        for item in std::mem::take(&mut sub.queue) {
            self.queues.took(sub, &item);
            count_drop(&mut self.counters, sub, &item);
        }
        sub.full_since = None;
        self.counters.slow_disconnects += 1;
        tracing::warn!(
            subscriber = %Hex(&sub.routing_id),
            dropped = sub.dropped,
            "cut off a slow subscriber: its queue stayed full, or it held publishers back taking nothing"
        );
        if sub.in_backlog {
            sub.in_backlog = false;
            self.queues.backlog.retain(|&b| b != id);
        }
        let text = "cut-off: slow consumer, filters and queue dropped; subscribe again";
        self.queues.push(
            &self.config.queue,
            reply_bound(&self.config.limits),
            &mut self.counters,
            id,
            sub,
            Queued::Reply(Reply::Err(ErrorCode::Limit, text.into())),
            now,
        );
    }

    /// Frees the subscribers collected in `gone`, counting them unreachable.
    pub(super) fn remove_gone(&mut self) {
        while let Some(id) = self.gone.pop() {
            if self.forget(id) {
                self.counters.unreachable_subscribers += 1;
            }
        }
    }

    /// Frees a subscriber: its filters, its queue (counted as dropped) and its
    /// id. False if it was already gone (an id can be listed twice).
    fn forget(&mut self, id: SubId) -> bool {
        let Some(mut sub) = self.subs.remove(id) else {
            return false;
        };
        for filter in &sub.filters {
            self.index.remove(filter, id);
            if sub.peer.is_none() {
                note_interest(&mut self.cluster, false, filter);
            }
        }
        if let Some(peer) = &sub.peer {
            self.bury_peer(&peer.broker_id, peer.epoch, sub.last_seq);
        }
        if let Some(key) = sub.key.as_deref() {
            release_key_filters(&mut self.filters_per_key, key, sub.filters.len());
        }
        for item in std::mem::take(&mut sub.queue) {
            self.queues.took(&mut sub, &item);
            if matches!(item, Queued::Message { .. }) {
                self.counters.dropped_subscriber_gone += 1;
            }
        }
        if sub.in_backlog {
            self.queues.backlog.retain(|&b| b != id);
        }
        tracing::debug!(subscriber = %Hex(&sub.routing_id), "forgot a subscriber");
        true
    }
}

/// Tells the cluster side (if any) that a local holder of `filter` came
/// (`add`) or went.
pub(super) fn note_interest(cluster: &mut Option<Cluster>, add: bool, filter: &Filter) {
    if let Some(cluster) = cluster {
        cluster.note(add, filter);
    }
}
