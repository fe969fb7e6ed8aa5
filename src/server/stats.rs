//! What the server reports: the core's counters plus what only the event
//! loop knows (connections, refusals, libzmq's queues), published once a
//! tick for [`StatsHandle`] readers on other threads.

use std::sync::{Arc, Mutex};
use zbroker_core::counters::MembershipFigures;

use super::Server;
use crate::metrics::{Connections, Snapshot};

/// Reads the broker's latest counters from any thread; refreshed every
/// timer tick (at most a second apart, more often with a short
/// `sub_timeout`).
#[derive(Clone, Debug, Default)]
pub struct StatsHandle(Arc<Mutex<Snapshot>>);

impl StatsHandle {
    /// The counters as of the last tick.
    pub fn snapshot(&self) -> Snapshot {
        // The lock is only held to clone or replace the snapshot whole, so
        // a poisoned one still holds a complete snapshot.
        match self.0.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the snapshot readers see.
    pub(crate) fn publish(&self, snapshot: Snapshot) {
        match self.0.lock() {
            Ok(mut guard) => *guard = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
    }
}

impl Server {
    /// The core's counters plus what the event loop knows of connections.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let mut snapshot = self.core.snapshot();
        snapshot.connections = Connections {
            publishers: self.publisher_watch.open,
            subscribers: self.subscriber_watch.open,
            xpub_subscribers: self.xpub_watch.as_ref().map_or(0, |w| w.open),
            handshake_failures: self.publisher_watch.handshake_failures
                + self.subscriber_watch.handshake_failures
                + self.xpub_watch.as_ref().map_or(0, |w| w.handshake_failures),
            auth_denied: self.zap.as_ref().map_or(0, |z| z.denied),
            key_reloads: self.key_reloads,
            key_reload_failures: self.key_reload_failures,
            publisher_refusals: self.publisher_watch.refusals.clone(),
            subscriber_refusals: self.subscriber_watch.refusals.clone(),
        };
        snapshot.libzmq_queued_bytes = self.libzmq_queued_bytes;
        snapshot.xpub_sub_drops = self.xpub_sub_drops;
        if let Some(cluster) = &self.cluster {
            snapshot.membership = match &self.membership {
                Some(m) => MembershipFigures {
                    members: m.members,
                    registry_up: u64::from(m.registry_up),
                    registry_losses: m.registry_losses,
                },
                None => MembershipFigures {
                    members: cluster.links.len() as u64,
                    registry_up: 1,
                    registry_losses: 0,
                },
            };
        }
        snapshot
    }
}
