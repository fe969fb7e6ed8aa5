//! Subscriber commands: who may hold which filters, within which limits,
//! and what each command is answered.
//!
//! Every message from a subscriber is answered with `OK`, `PONG` or `ERR`,
//! except garbage from a stranger past the shared rate limit (see
//! [`rate_limit`](super::rate_limit)). A reply to a tracked subscriber goes
//! out behind whatever it has queued, never ahead of it.

use std::time::Instant;

use hashbrown::HashMap;

use super::queues::reply_bound;
use super::transport::send_reply;
use super::{Broker, Hex, Payload, SendOutcome, Transport};
use crate::config::Limits;
use crate::filter::Filter;
use crate::index::{RoutingIndex, SubId};
use crate::protocol::{self, Command, CommandError, ErrorCode};
use crate::subscribers::{Queued, Reply};

impl<P: Payload> Broker<P> {
    /// What to answer a subscriber's message (`None`: nothing, for garbage
    /// from a stranger past the rate limit), and who it is (`None`: a
    /// routing id the broker does not track).
    pub(super) fn decide(
        &mut self,
        routing_id: &[u8],
        key: Option<&str>,
        frames: &[&[u8]],
        frame_count: usize,
        now: Instant,
    ) -> (Option<SubId>, Option<Reply>) {
        let known = self.subs.lookup(routing_id);
        if let Some(id) = known {
            if let Some(sub) = self.subs.get_mut(id) {
                sub.last_heard = now;
            }
            // Every message costs a token, well-formed or not, so garbage
            // cannot buy more replies than commands can.
            if !self.take_command_token(id, now) {
                self.counters.refused_rate += 1;
                let text = format!(
                    "more than {} commands per second; slow down",
                    self.config.limits.max_commands_per_sec
                );
                return (known, Some(Reply::Err(ErrorCode::Limit, text)));
            }
        }
        let parsed = if frame_count > frames.len() {
            Err(CommandError::TooManyFrames(frame_count))
        } else {
            protocol::parse_command(frames, self.config.limits.max_filter_len)
        };
        let command = match parsed {
            Ok(command) => command,
            Err(e) => {
                self.counters.malformed_commands += 1;
                if known.is_none() && !self.take_stranger_token(now) {
                    self.counters.refused_rate += 1;
                    return (None, None);
                }
                self.command_log.warn(
                    now,
                    format_args!("refused a command from {}: {e}", Hex(routing_id)),
                );
                return (known, Some(Reply::Err(e.code(), e.to_string())));
            }
        };
        let id = match known {
            Some(id) => id,
            None if self.subs.len() >= self.config.limits.max_subscribers => {
                self.counters.refused_limit += 1;
                let text = format!(
                    "the broker holds its limit of {} subscribers; try again later",
                    self.config.limits.max_subscribers
                );
                return (None, Some(Reply::Err(ErrorCode::Limit, text)));
            }
            None => {
                let id = self.subs.insert(routing_id, now);
                if let Some(sub) = self.subs.get_mut(id) {
                    sub.key = key.map(Into::into);
                }
                id
            }
        };
        self.counters.commands += 1;
        let reply = match command {
            Command::Ping => Reply::Pong,
            Command::Subscribe(filter) => match &self.acl {
                Some(acl) if !acl.may_subscribe(key, &filter) => {
                    self.counters.refused_unauthorized += 1;
                    Reply::Err(
                        ErrorCode::Unauthorized,
                        format!("this key may not subscribe to {filter}"),
                    )
                }
                _ => self.subscribe(id, filter),
            },
            Command::Unsubscribe(filter) => self.unsubscribe(id, filter),
        };
        (Some(id), Some(reply))
    }

    fn subscribe(&mut self, id: SubId, filter: Filter) -> Reply {
        let limits = &self.config.limits;
        let Some(sub) = self.subs.get_mut(id) else {
            return Reply::Err(ErrorCode::Limit, "subscriber was removed".into());
        };
        if !sub.filters.contains(&filter) {
            let key_filters = sub
                .key
                .as_deref()
                .map_or(0, |key| self.filters_per_key.get(key).copied().unwrap_or(0));
            let segments = filter.pattern_segments();
            let refusal = if sub.filters.len() >= limits.max_filters_per_subscriber {
                Some(format!(
                    "this subscriber holds its limit of {} filters",
                    limits.max_filters_per_subscriber
                ))
            } else if segments > limits.max_pattern_segments {
                Some(format!(
                    "a pattern of {segments} segments is over the limit of {}",
                    limits.max_pattern_segments
                ))
            } else if key_filters >= limits.max_filters_per_key {
                Some(format!(
                    "this key's subscribers hold its limit of {} filters",
                    limits.max_filters_per_key
                ))
            } else {
                index_full(&self.index, limits)
            };
            if let Some(text) = refusal {
                self.counters.refused_limit += 1;
                return Reply::Err(ErrorCode::Limit, text);
            }
            self.index.insert(&filter, id);
            super::sweep::note_interest(&mut self.cluster, true, &filter);
            sub.filters.insert(filter.clone());
            if let Some(key) = &sub.key {
                match self.filters_per_key.get_mut(&**key) {
                    Some(held) => *held += 1,
                    None => {
                        self.filters_per_key.insert(key.clone(), 1);
                    }
                }
            }
        }
        Reply::Ok {
            subscribe: true,
            filter,
        }
    }

    fn unsubscribe(&mut self, id: SubId, filter: Filter) -> Reply {
        let Some(sub) = self.subs.get_mut(id) else {
            return Reply::Err(ErrorCode::Limit, "subscriber was removed".into());
        };
        if !sub.filters.remove(&filter) {
            return Reply::Err(
                ErrorCode::NotSubscribed,
                format!("not subscribed to {filter}"),
            );
        }
        self.index.remove(&filter, id);
        super::sweep::note_interest(&mut self.cluster, false, &filter);
        if let Some(key) = sub.key.as_deref() {
            release_key_filters(&mut self.filters_per_key, key, 1);
        }
        Reply::Ok {
            subscribe: false,
            filter,
        }
    }

    /// Sends `reply` in order behind whatever the subscriber has queued, or
    /// straight away to a routing id the broker does not track.
    pub(super) fn reply(
        &mut self,
        id: Option<SubId>,
        routing_id: &[u8],
        reply: Reply,
        now: Instant,
        out: &mut impl Transport<P>,
    ) {
        let Some((id, sub)) = id.and_then(|id| Some((id, self.subs.get_mut(id)?))) else {
            // Untracked peers get one best-effort try: queueing for them
            // would let anyone make the broker hold memory.
            send_reply(out, routing_id, &reply);
            return;
        };
        if sub.queue.is_empty() {
            match send_reply(out, &sub.routing_id, &reply) {
                SendOutcome::Sent => return,
                SendOutcome::Unreachable => {
                    self.gone.push(id);
                    return;
                }
                SendOutcome::WouldBlock => {}
            }
        }
        self.queues.push(
            &self.config.queue,
            reply_bound(&self.config.limits),
            &mut self.counters,
            id,
            sub,
            Queued::Reply(reply),
            now,
        );
    }
}

/// Gives `count` filters back to `key`'s quota; forgets the key at zero, so
/// the map holds only keys with filters.
pub(super) fn release_key_filters(map: &mut HashMap<Box<str>, usize>, key: &str, count: usize) {
    if let Some(held) = map.get_mut(key) {
        *held = held.saturating_sub(count);
        if *held == 0 {
            map.remove(key);
        }
    }
}

/// Why the routing index takes no new filter, from anyone: its heap holds
/// `max_index_bytes`, or it holds `max_filters_total` filters.
pub(super) fn index_full(index: &RoutingIndex, limits: &Limits) -> Option<String> {
    if index.heap_bytes() >= limits.max_index_bytes {
        Some(format!(
            "the broker's routing index holds its limit of {} bytes",
            limits.max_index_bytes
        ))
    } else if index.len() >= limits.max_filters_total {
        Some(format!(
            "the broker holds its limit of {} filters",
            limits.max_filters_total
        ))
    } else {
        None
    }
}
