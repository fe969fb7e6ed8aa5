//! Staging: deliveries routed by [`Broker::route_publish`] wait here, each
//! with its seq already taken, until [`Broker::send_routed`] sends them one
//! subscriber at a time.
//!
//! Staging changes when a delivery leaves, never what a subscriber
//! receives or in which order: every other call that takes a transport
//! sends what is staged first, and at most [`MAX_STAGED_DELIVERIES`] or
//! [`MAX_STAGED_MESSAGES`] wait.

use std::time::Instant;

use super::queues::reply_bound;
use super::{Broker, Payload, SendOutcome, Transport};
use crate::config::OverflowPolicy;
use crate::index::SubId;
use crate::subscribers::Queued;

/// Counts one delivery handed to libzmq: to a subscriber, or forwarded to
/// a peer.
pub(super) fn count_sent(counters: &mut crate::counters::Counters, peer: bool, payload_len: u64) {
    if peer {
        counters.peer_forwarded += 1;
    } else {
        counters.delivered += 1;
        counters.delivered_bytes += payload_len;
    }
}

/// Messages routed by [`Broker::route_publish`] and not sent yet.
///
/// Deliveries are sent per subscriber, all of one subscriber's in a row:
/// libzmq's I/O thread then finds a run of messages in that subscriber's
/// pipe and writes them with one `send()`, where message-by-message fan-out
/// wakes it, and makes a system call, for every delivery.
#[derive(Debug)]
pub(super) struct Staged<P> {
    messages: Vec<StagedMessage<P>>,
    /// The staged topics' bytes back to back: read once per message rather
    /// than through the FFI once per delivery.
    topic_bytes: Vec<u8>,
    /// Subscribers with staged deliveries (a non-empty `Subscriber::staged`),
    /// each once, in the order of their first.
    subscribers: Vec<SubId>,
    /// Deliveries staged, over all subscribers.
    pub(super) deliveries: usize,
    /// When the last message was staged: the time its queueing is dated.
    pub(super) routed_at: Option<Instant>,
    /// Topic and payload bytes of all staged deliveries, under the
    /// backpressure policy (zero under the others).
    bytes: usize,
    /// A subscriber's staged and queued messages or bytes together, or
    /// all of them, reach the backpressure mark.
    pub(super) over_mark: bool,
}

/// One staged message, shared by all its deliveries.
#[derive(Debug)]
struct StagedMessage<P> {
    topic: P,
    payload: P,
    /// Deliveries still to send or queue: the last one takes the parts
    /// rather than sharing them.
    uses: usize,
    payload_len: u64,
    /// Where the topic is in `Staged::topic_bytes`.
    topic_at: std::ops::Range<usize>,
}

impl<P> Default for Staged<P> {
    fn default() -> Self {
        Staged {
            messages: Vec::new(),
            topic_bytes: Vec::new(),
            subscribers: Vec::new(),
            deliveries: 0,
            routed_at: None,
            bytes: 0,
            over_mark: false,
        }
    }
}

/// At most this many deliveries are staged by [`Broker::route_publish`]
/// before they are sent: bounds the delay staging adds (a few
/// milliseconds) while leaving runs long enough to batch libzmq's writes
/// (40 messages per subscriber at a fan-out of 100).
pub const MAX_STAGED_DELIVERIES: usize = 4096;
/// At most this many messages are staged by [`Broker::route_publish`]
/// before their deliveries are sent.
pub const MAX_STAGED_MESSAGES: usize = 1024;

impl<P: Payload> Broker<P> {
    /// Stages `topic` and `payload` for every subscriber in `matched`,
    /// giving each its next seq, and sends what is staged once a bound is
    /// reached. Returns how many subscribers it was routed to.
    pub(super) fn stage(
        &mut self,
        topic: &mut P,
        payload: &mut P,
        payload_len: u64,
        now: Instant,
        out: &mut impl Transport<P>,
    ) -> usize {
        let topic_bytes = topic.bytes();
        let staged = &mut self.staged;
        let message = u32::try_from(staged.messages.len()).expect("MAX_STAGED_MESSAGES fits");
        let topic_start = staged.topic_bytes.len();
        staged.topic_bytes.extend_from_slice(topic_bytes);
        let topic_at = topic_start..staged.topic_bytes.len();
        let backpressure = self.config.queue.policy == OverflowPolicy::Backpressure;
        // What one queued delivery of it counts (see `queued_size`).
        let size = topic_bytes.len() + payload_len as usize;
        for &id in &self.matched {
            let Some(sub) = self.subs.get_mut(id) else {
                debug_assert!(false, "routing index names a removed subscriber");
                continue;
            };
            sub.last_seq += 1;
            if sub.staged.is_empty() {
                staged.subscribers.push(id);
            }
            sub.staged.push(message);
            // Staged deliveries reach the queue only when the batch is
            // sent, so the marks count them too.
            if backpressure && sub.peer.is_none() {
                let mark = &self.queues.mark;
                sub.staged_bytes += size;
                staged.bytes += size;
                if mark.reached(
                    sub.staged.len() + sub.queue.len() - sub.queued_replies,
                    sub.queued_bytes + sub.staged_bytes,
                ) || self.queues.bytes + staged.bytes >= mark.total_bytes
                {
                    staged.over_mark = true;
                }
            }
        }
        // Moved, not shared: the caller's frames are only refilled, and a
        // share would cost two more reference counts (content and the
        // connection's metadata) taken here and dropped at the next receive.
        staged.messages.push(StagedMessage {
            topic: topic.take(),
            payload: payload.take(),
            uses: self.matched.len(),
            payload_len,
            topic_at,
        });
        staged.routed_at = Some(now);
        let routed = self.matched.len();
        staged.deliveries += routed;
        self.counters.routed += routed as u64;
        if staged.deliveries >= MAX_STAGED_DELIVERIES
            || staged.messages.len() >= MAX_STAGED_MESSAGES
        {
            self.send_routed(out);
        }
        routed
    }

    /// Sends what is staged, dated `now` where it queues: per subscriber, in
    /// order, straight to libzmq while it takes them and into the
    /// subscriber's queue from the first it refuses. Subscribers found
    /// unreachable are listed in `gone`.
    pub(super) fn send_staged(&mut self, now: Instant, out: &mut impl Transport<P>) {
        let staged = &mut self.staged;
        for &id in &staged.subscribers {
            let Some(sub) = self.subs.get_mut(id) else {
                debug_assert!(false, "a subscriber was removed with deliveries staged");
                continue;
            };
            let list = std::mem::take(&mut sub.staged);
            let first_seq = sub.last_seq + 1 - list.len() as u64;
            // Deliveries sent, or dropped because the peer is gone; the
            // rest are queued.
            let mut done = 0;
            if sub.queue.is_empty() {
                for &message in &list {
                    let message = &mut staged.messages[message as usize];
                    let topic = &staged.topic_bytes[message.topic_at.clone()];
                    let seq = first_seq + done as u64;
                    let last_use = message.uses == 1;
                    let outcome = match &mut sub.peer {
                        None => {
                            out.deliver(&sub.routing_id, seq, topic, &mut message.payload, last_use)
                        }
                        Some(peer) => {
                            let outcome = out.forward(
                                &sub.routing_id,
                                seq,
                                topic,
                                &mut message.payload,
                                last_use,
                            );
                            if outcome == SendOutcome::Sent {
                                peer.forwarded += 1;
                            }
                            outcome
                        }
                    };
                    match outcome {
                        SendOutcome::Sent => {
                            message.uses -= 1;
                            count_sent(&mut self.counters, sub.peer.is_some(), message.payload_len);
                            done += 1;
                        }
                        SendOutcome::WouldBlock => break,
                        SendOutcome::Unreachable => {
                            self.counters.dropped_subscriber_gone += (list.len() - done) as u64;
                            done = list.len();
                            self.gone.push(id);
                            break;
                        }
                    }
                }
            }
            for (i, &message) in list.iter().enumerate().skip(done) {
                let message = &mut staged.messages[message as usize];
                message.uses -= 1;
                let (topic, payload) = if message.uses == 0 {
                    (message.topic.take(), message.payload.take())
                } else {
                    (message.topic.share(), message.payload.share())
                };
                let item = Queued::Message {
                    seq: first_seq + i as u64,
                    topic,
                    payload,
                };
                let bounds = if sub.peer.is_some() {
                    &self.peer_queue
                } else {
                    &self.config.queue
                };
                self.queues.push(
                    bounds,
                    reply_bound(&self.config.limits),
                    &mut self.counters,
                    id,
                    sub,
                    item,
                    now,
                );
            }
            // Hand the list back emptied, keeping its capacity: steady-state
            // routing does not allocate.
            sub.staged = list;
            sub.staged.clear();
            sub.staged_bytes = 0;
        }
        staged.subscribers.clear();
        staged.messages.clear();
        staged.topic_bytes.clear();
        staged.deliveries = 0;
        staged.bytes = 0;
        staged.over_mark = false;
    }
}
