//! A new ACL while the broker runs (a key-list reload): what the old one
//! allowed and the new one does not is taken back at once.
//!
//! Every filter a subscriber holds is checked against the new ACL with the
//! subscriber's key; one no longer allowed (the key was removed from the
//! list, or the filter is outside what the key may now subscribe to) leaves
//! the routing index and the subscriber is told, one notice per filter:
//! `[ERR, unauthorized, "revoked: KIND:FILTER ..."]`, queued behind what it
//! has, so nothing routed before the cut is overtaken. Everything else a
//! subscriber holds stays, and its seqs go on: a reload disturbs no one it
//! does not concern. Publishes are checked against the new ACL from the
//! next one on.

use std::sync::Arc;
use std::time::Instant;

use super::commands::release_key_filters;
use super::sweep::note_interest;
use super::{Broker, Payload, Transport};
use crate::acl::Acl;
use crate::filter::Filter;
use crate::index::SubId;
use crate::protocol::ErrorCode;
use crate::subscribers::Reply;

/// What a new ACL took back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    /// Subscribers that lost at least one filter.
    pub subscribers: usize,
    /// Filters cut, over all subscribers.
    pub filters: usize,
}

impl<P: Payload> Broker<P> {
    /// Enforces `acl` from now on, cutting what it no longer allows (see
    /// the module docs). Returns what was cut.
    pub fn replace_acl(
        &mut self,
        acl: Arc<Acl>,
        now: Instant,
        out: &mut impl Transport<P>,
    ) -> Revoked {
        self.send_routed(out);
        let mut revoked = Revoked::default();
        let mut cuts: Vec<(SubId, Vec<Filter>)> = Vec::new();
        for (id, sub) in self.subs.iter() {
            if sub.peer.is_some() {
                continue;
            }
            let lost: Vec<Filter> = sub
                .filters
                .iter()
                .filter(|f| !acl.may_subscribe(sub.key.as_deref(), f))
                .cloned()
                .collect();
            if !lost.is_empty() {
                cuts.push((id, lost));
            }
        }
        self.acl = Some(acl);
        for (id, lost) in cuts {
            revoked.subscribers += 1;
            revoked.filters += lost.len();
            for filter in lost {
                self.revoke(id, &filter, now, out);
            }
        }
        self.remove_gone();
        self.flush_interest(out);
        if revoked.filters > 0 {
            tracing::warn!(
                subscribers = revoked.subscribers,
                filters = revoked.filters,
                "the new key lists took filters back"
            );
        }
        revoked
    }

    /// Cuts one filter of subscriber `id` and tells it.
    fn revoke(&mut self, id: SubId, filter: &Filter, now: Instant, out: &mut impl Transport<P>) {
        let Some(sub) = self.subs.get_mut(id) else {
            return;
        };
        if !sub.filters.remove(filter) {
            return;
        }
        self.index.remove(filter, id);
        note_interest(&mut self.cluster, false, filter);
        if let Some(key) = sub.key.as_deref() {
            release_key_filters(&mut self.filters_per_key, key, 1);
        }
        let routing_id = sub.routing_id.clone();
        self.counters.revoked_filters += 1;
        let text = format!(
            "revoked: {filter} is no longer allowed for this key (the broker's key lists were \
             reloaded); do not subscribe to it again"
        );
        self.reply(
            Some(id),
            &routing_id,
            Reply::Err(ErrorCode::Unauthorized, text),
            now,
            out,
        );
    }
}
