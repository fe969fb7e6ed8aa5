//! The command rate limit: a token bucket per tracked subscriber, and one
//! shared by every peer the broker does not track.
//!
//! Every message from a tracked subscriber costs a token, well-formed or
//! not, so garbage cannot buy more replies than commands can. Strangers
//! have no record to hold a bucket of their own, so their garbage shares one:
//! past it, it is dropped unanswered.

use std::time::Instant;

use super::{Broker, Payload};
use crate::config::BrokerConfig;
use crate::index::SubId;

/// Tokens refilled at a steady rate up to a capacity; one is spent per
/// command.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    /// A bucket holding `tokens`, as of `now`.
    pub(crate) fn new(tokens: f64, now: Instant) -> Self {
        TokenBucket {
            tokens,
            refilled_at: now,
        }
    }

    /// Refills for the time since the last call, at `rate` per second up to
    /// `capacity`, then spends a token if there is a whole one. False: the
    /// bucket is empty and nothing was spent.
    fn take(&mut self, rate: f64, capacity: f64, now: Instant) -> bool {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(capacity);
        self.refilled_at = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// The command rate the limits allow, at least 1.
pub(super) fn config_rate(config: &BrokerConfig) -> u32 {
    config.limits.max_commands_per_sec.max(1)
}

impl<P: Payload> Broker<P> {
    /// The strangers' shared bucket: `max_commands_per_sec`, no burst.
    pub(super) fn take_stranger_token(&mut self, now: Instant) -> bool {
        let rate = f64::from(config_rate(&self.config));
        self.stranger_tokens.take(rate, rate, now)
    }

    /// A subscriber's own bucket: `max_commands_per_sec` sustained. The
    /// bucket holds a second's worth plus a full filter set, so a client
    /// re-subscribing everything after a reconnect is never refused.
    pub(super) fn take_command_token(&mut self, id: SubId, now: Instant) -> bool {
        let limits = &self.config.limits;
        let rate = f64::from(limits.max_commands_per_sec);
        let capacity = rate + limits.max_filters_per_subscriber as f64;
        let Some(sub) = self.subs.get_mut(id) else {
            return false;
        };
        sub.command_tokens.take(rate, capacity, now)
    }
}
