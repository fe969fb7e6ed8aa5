//! Per-subscriber queues: what waits for room in libzmq's pipe, within
//! [`QueueConfig`]'s bounds, and what each [`OverflowPolicy`] does when a
//! bound is reached.
//!
//! A queue holds a subscriber's messages and replies in the order they must
//! be sent; once a subscriber has anything queued, everything for it queues
//! behind, so nothing overtakes. Replies have a bound of their own
//! ([`reply_bound`]) and are never dropped to make room for data.

use std::time::Instant;

use super::transport::send_reply;
use super::{Broker, Payload, SendOutcome, Transport};
use crate::config::{Limits, OverflowPolicy, QueueConfig};
use crate::counters::Counters;
use crate::index::SubId;
use crate::subscribers::{Queued, Reply, Subscriber};

/// What `item` counts toward the byte bounds.
pub(super) fn queued_size<P: Payload>(item: &Queued<P>) -> usize {
    match item {
        Queued::Message { topic, payload, .. } => topic.bytes().len() + payload.bytes().len(),
        Queued::Reply(Reply::Ok { filter, .. }) => 16 + filter.text().len(),
        Queued::Reply(Reply::Err(_, text)) => 32 + text.len(),
        Queued::Reply(Reply::Pong) => 4,
    }
}

/// Totals over all subscriber queues, and which subscribers have one.
#[derive(Debug)]
pub(super) struct Queues {
    /// Bytes queued, by [`queued_size`].
    pub(super) bytes: usize,
    /// Messages queued (replies not counted).
    pub(super) messages: usize,
    /// Subscribers whose queue is not empty, each once.
    pub(super) backlog: Vec<SubId>,
    /// The backpressure marks: half of each bound under
    /// [`OverflowPolicy::Backpressure`], unreachable under the other
    /// policies.
    pub(super) mark: Mark,
    /// Subscribers whose queue is past the mark.
    pub(super) over_mark: usize,
}

/// Where backpressure holds publishers back: one subscriber's messages or
/// bytes, or all queues' bytes together, reaching it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Mark {
    pub(super) messages: usize,
    pub(super) bytes: usize,
    pub(super) total_bytes: usize,
}

impl Mark {
    /// Whether one subscriber holding `messages` messages of `bytes` bytes
    /// (queued, and staged where they count) has reached it.
    pub(super) fn reached(&self, messages: usize, bytes: usize) -> bool {
        messages >= self.messages || bytes >= self.bytes
    }
}

impl Queues {
    pub(super) fn new(config: &QueueConfig) -> Self {
        let mark = if config.policy == OverflowPolicy::Backpressure {
            // At least 1: an empty queue never holds publishers back.
            let half = |bound: usize| bound.div_ceil(2).max(1);
            Mark {
                messages: half(config.max_messages),
                bytes: half(config.max_bytes),
                total_bytes: half(config.max_total_bytes),
            }
        } else {
            Mark {
                messages: usize::MAX,
                bytes: usize::MAX,
                total_bytes: usize::MAX,
            }
        };
        Queues {
            bytes: 0,
            messages: 0,
            backlog: Vec::new(),
            mark,
            over_mark: 0,
        }
    }

    /// Keeps `sub.over_mark` and the count of such subscribers in step with
    /// its queue.
    fn update_mark<P>(&mut self, sub: &mut Subscriber<P>) {
        // A peer link never holds publishers back: it drops, and its
        // broker sees the loss.
        if sub.peer.is_some() {
            return;
        }
        // Saturating: forgetting a subscriber empties its queue before
        // accounting for the items one by one.
        let over = self.mark.reached(
            sub.queue.len().saturating_sub(sub.queued_replies),
            sub.queued_bytes,
        );
        if over != sub.over_mark {
            sub.over_mark = over;
            if over {
                self.over_mark += 1;
            } else {
                self.over_mark -= 1;
            }
        }
    }

    /// Accounts for `item` leaving `sub`'s queue (sent or dropped).
    pub(super) fn took<P: Payload>(&mut self, sub: &mut Subscriber<P>, item: &Queued<P>) {
        self.took_sized(sub, item, queued_size(item));
    }

    /// [`took`](Self::took) for an item whose parts a send may have taken:
    /// `size` is its [`queued_size`] from before the send.
    pub(super) fn took_sized<P>(&mut self, sub: &mut Subscriber<P>, item: &Queued<P>, size: usize) {
        self.bytes -= size;
        sub.queued_bytes -= size;
        match item {
            Queued::Message { .. } => self.messages -= 1,
            Queued::Reply(_) => sub.queued_replies -= 1,
        }
        self.update_mark(sub);
    }

    /// Appends `item` to `sub`'s queue within the configured bounds, applying
    /// the overflow policy when they are reached. Returns false if it dropped
    /// `item`.
    #[allow(clippy::too_many_arguments)] // all of it is the push's context
    pub(super) fn push<P: Payload>(
        &mut self,
        config: &QueueConfig,
        max_replies: usize,
        counters: &mut Counters,
        id: SubId,
        sub: &mut Subscriber<P>,
        item: Queued<P>,
        now: Instant,
    ) -> bool {
        let size = queued_size(&item);
        let is_message = matches!(item, Queued::Message { .. });
        // Replies have their own bound rather than the message limits, so a
        // client waiting for its OK gets it even behind a full queue.
        let fits = |queues: &Queues, sub: &Subscriber<P>| {
            queues.bytes + size <= config.max_total_bytes
                && if is_message {
                    sub.queue.len() - sub.queued_replies < config.max_messages
                        && sub.queued_bytes + size <= config.max_bytes
                } else {
                    sub.queued_replies < max_replies
                }
        };
        // drop-old makes room for a message by dropping the oldest queued
        // *messages*: a queued reply answers a command and is never dropped
        // for data, and a reply over its own bound is simply refused.
        if config.policy == OverflowPolicy::DropOld && is_message {
            while !fits(self, sub) {
                let Some(oldest) = sub
                    .queue
                    .iter()
                    .position(|q| matches!(q, Queued::Message { .. }))
                else {
                    break;
                };
                let Some(old) = sub.queue.remove(oldest) else {
                    break;
                };
                self.took(sub, &old);
                count_drop(counters, sub, &old);
            }
        }
        if !fits(self, sub) {
            count_drop(counters, sub, &item);
            // "Full" means a backlog that is not draining; a message too
            // large for an empty queue is dropped but says nothing about
            // the consumer's speed.
            if config.policy == OverflowPolicy::Disconnect
                && is_message
                && !sub.queue.is_empty()
                && sub.full_since.is_none()
            {
                sub.full_since = Some(now);
            }
            return false;
        }
        if !sub.in_backlog {
            sub.in_backlog = true;
            self.backlog.push(id);
        }
        sub.queued_bytes += size;
        self.bytes += size;
        if is_message {
            self.messages += 1;
        } else {
            sub.queued_replies += 1;
        }
        sub.queue.push_back(item);
        self.update_mark(sub);
        true
    }
}

/// Replies one subscriber may have queued: a full re-subscribe's worth (as
/// the token bucket allows in one burst) plus `max_queued_replies`, so an
/// honest client re-subscribing everything always gets every OK.
pub(super) fn reply_bound(limits: &Limits) -> usize {
    limits.max_filters_per_subscriber + limits.max_queued_replies
}

/// Counts `item` as lost to a full queue (or a cut-off).
pub(super) fn count_drop<P>(counters: &mut Counters, sub: &mut Subscriber<P>, item: &Queued<P>) {
    if matches!(item, Queued::Message { .. }) {
        counters.dropped_queue_full += 1;
        sub.dropped += 1;
    } else {
        counters.dropped_replies += 1;
    }
}

impl<P: Payload> Broker<P> {
    /// Sends what waits in subscriber queues, oldest first, until libzmq
    /// refuses more; subscribers found unreachable are listed in `gone`.
    pub(super) fn send_queued(&mut self, out: &mut impl Transport<P>) {
        let mut i = 0;
        while let Some(&id) = self.queues.backlog.get(i) {
            let Some(sub) = self.subs.get_mut(id) else {
                self.queues.backlog.swap_remove(i);
                continue;
            };
            let mut progressed = false;
            while let Some(item) = sub.queue.front_mut() {
                // Measured first: the send takes a queued message's parts.
                let size = queued_size(item);
                let outcome = match item {
                    Queued::Message {
                        seq,
                        topic,
                        payload,
                    } => {
                        let payload_len = payload.bytes().len() as u64;
                        let outcome = match &mut sub.peer {
                            None => {
                                out.deliver(&sub.routing_id, *seq, topic.bytes(), payload, true)
                            }
                            Some(peer) => {
                                let outcome = out.forward(
                                    &sub.routing_id,
                                    *seq,
                                    topic.bytes(),
                                    payload,
                                    true,
                                );
                                if outcome == SendOutcome::Sent {
                                    peer.forwarded += 1;
                                }
                                outcome
                            }
                        };
                        if outcome == SendOutcome::Sent {
                            super::staging::count_sent(
                                &mut self.counters,
                                sub.peer.is_some(),
                                payload_len,
                            );
                        }
                        outcome
                    }
                    Queued::Reply(reply) => send_reply(out, &sub.routing_id, reply),
                };
                match outcome {
                    SendOutcome::Sent => {
                        let Some(item) = sub.queue.pop_front() else {
                            break;
                        };
                        self.queues.took_sized(sub, &item, size);
                        progressed = true;
                    }
                    SendOutcome::WouldBlock => break,
                    SendOutcome::Unreachable => {
                        // The failed send may have taken the item's parts:
                        // account for it here, at its size from before.
                        if let Some(item) = sub.queue.pop_front() {
                            self.queues.took_sized(sub, &item, size);
                            if matches!(item, Queued::Message { .. }) {
                                self.counters.dropped_subscriber_gone += 1;
                            }
                        }
                        self.gone.push(id);
                        break;
                    }
                }
            }
            // A consumer that took anything is not stuck: the clock
            // restarts at its next drop (`disconnect`) or at the next tick
            // that finds it holding publishers back (`backpressure`).
            if progressed {
                sub.full_since = None;
            }
            if sub.queue.is_empty() {
                sub.in_backlog = false;
                self.queues.backlog.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }
}
