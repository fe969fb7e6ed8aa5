//! The XPUB front: unchanged ZeroMQ SUB sockets as subscribers.
//!
//! A SUB socket connected to the broker's XPUB socket subscribes by prefix
//! and receives `[topic, payload]`, exactly what a PUB socket would send
//! it. libzmq's XPUB filters per connection by itself; the broker only needs
//! the union of all those prefixes, to send a message to the XPUB socket
//! once, and only when some SUB wants it. With `ZMQ_XPUB_VERBOSER` libzmq
//! passes up every subscribe and every unsubscribe notice (including the
//! ones for a connection that closes), so a reference count per prefix is
//! that union: a prefix is in the routing index, under the front's own
//! [`SubId`], while its count is above zero.
//!
//! Notices obey the limits commands do, where they can: a prefix over
//! `max_filter_len`, or a new one past `max_filters_total` or
//! `max_index_bytes`, is refused and counted (the SUB cannot be told; it
//! gets nothing for that prefix). A notice the broker cannot read (neither
//! `0x01` nor `0x00` first) is counted as malformed. One known limit of a
//! count without connection identities: a refused subscribe that is later
//! unsubscribed by the same SUB, after another SUB subscribed the same
//! prefix successfully, takes one count from the other.

use std::time::Instant;

use hashbrown::HashMap;

use super::commands::index_full;
use super::{Broker, Payload, SendOutcome, Transport};
use crate::filter::{Filter, FilterKind};
use crate::index::SubId;

/// What a SUB socket's subscription notice asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice<'a> {
    /// `0x01` + prefix: receive topics starting with the prefix.
    Subscribe(&'a [u8]),
    /// `0x00` + prefix: stop.
    Unsubscribe(&'a [u8]),
}

impl<'a> Notice<'a> {
    /// Reads a notice as libzmq's XPUB passes it up; `None` for anything
    /// else (an empty message, or a first byte other than 0 or 1).
    pub fn parse(message: &'a [u8]) -> Option<Notice<'a>> {
        match message.split_first() {
            Some((1, prefix)) => Some(Notice::Subscribe(prefix)),
            Some((0, prefix)) => Some(Notice::Unsubscribe(prefix)),
            _ => None,
        }
    }
}

/// What the broker did with one notice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoticeOutcome {
    /// The count changed; `routed` says whether the prefix is now in the
    /// routing index (it enters at the first subscribe and leaves at the
    /// last unsubscribe).
    Counted {
        /// The prefix is routed to the front after this notice.
        routed: bool,
    },
    /// A subscribe over a limit: the SUB gets nothing for this prefix.
    Refused(String),
    /// An unsubscribe for a prefix no SUB holds.
    NotSubscribed,
    /// Not a subscription notice.
    Malformed,
}

/// The front's state in the core: its id in the routing index and the
/// count of SUB subscriptions per prefix.
#[derive(Debug)]
pub(super) struct XpubFront {
    pub(super) id: SubId,
    counts: HashMap<Box<[u8]>, u32>,
}

impl XpubFront {
    pub(super) fn new(id: SubId) -> Self {
        XpubFront {
            id,
            counts: HashMap::new(),
        }
    }

    /// Distinct prefixes held now.
    pub(super) fn prefixes(&self) -> usize {
        self.counts.len()
    }

    /// The prefixes held, as filters.
    pub(super) fn filters(&self) -> impl Iterator<Item = Filter> + '_ {
        self.counts
            .keys()
            .filter_map(|prefix| Filter::new(FilterKind::Prefix, prefix, usize::MAX).ok())
    }
}

impl<P: Payload> Broker<P> {
    /// Opens the XPUB front: from now on [`on_xpub_notice`] keeps its
    /// prefixes and a matching message goes once to
    /// [`Transport::to_xpub`]. Idempotent.
    ///
    /// [`on_xpub_notice`]: Broker::on_xpub_notice
    pub fn open_xpub_front(&mut self) {
        if self.xpub.is_none() {
            let id = self.subs.reserve();
            self.xpub = Some(XpubFront::new(id));
        }
    }

    /// Applies one subscription notice from the XPUB socket.
    ///
    /// ```
    /// use std::rc::Rc;
    /// use std::time::Instant;
    /// use zbroker_core::broker::{Broker, NoticeOutcome, SendOutcome, Transport};
    /// use zbroker_core::config::BrokerConfig;
    ///
    /// #[derive(Default)]
    /// struct Xpub(Vec<Vec<u8>>);
    /// impl Transport<Rc<[u8]>> for Xpub {
    ///     fn deliver(&mut self, _: &[u8], _: u64, _: &[u8], _: &mut Rc<[u8]>, _: bool) -> SendOutcome {
    ///         SendOutcome::Sent
    ///     }
    ///     fn reply(&mut self, _: &[u8], _: &[&[u8]]) -> SendOutcome { SendOutcome::Sent }
    ///     fn to_xpub(&mut self, topic: &[u8], _: &mut Rc<[u8]>, _: bool) -> SendOutcome {
    ///         self.0.push(topic.to_vec());
    ///         SendOutcome::Sent
    ///     }
    /// }
    ///
    /// let now = Instant::now();
    /// let mut broker = Broker::new(BrokerConfig::default(), now);
    /// broker.open_xpub_front();
    /// // Two SUB sockets subscribe to "D", one unsubscribes again.
    /// broker.on_xpub_notice(b"\x01D", now);
    /// broker.on_xpub_notice(b"\x01D", now);
    /// assert_eq!(broker.on_xpub_notice(b"\x00D", now), NoticeOutcome::Counted { routed: true });
    /// let mut out = Xpub::default();
    /// for topic in [&b"D"[..], b"project-1"] {
    ///     let mut frames: [Rc<[u8]>; 2] = [Rc::from(topic), Rc::from(&b"event"[..])];
    ///     broker.on_publish(None, &mut frames, 2, now, &mut out).unwrap();
    /// }
    /// assert_eq!(out.0, vec![b"D".to_vec()]);
    /// ```
    pub fn on_xpub_notice(&mut self, message: &[u8], now: Instant) -> NoticeOutcome {
        let Some(front) = &mut self.xpub else {
            return NoticeOutcome::Malformed;
        };
        let outcome = match Notice::parse(message) {
            None => {
                self.counters.xpub_malformed_notices += 1;
                NoticeOutcome::Malformed
            }
            Some(Notice::Subscribe(prefix)) => {
                if let Some(count) = front.counts.get_mut(prefix) {
                    *count += 1;
                    self.counters.xpub_subscribes += 1;
                    return NoticeOutcome::Counted { routed: true };
                }
                let limits = &self.config.limits;
                let refusal = if prefix.len() > limits.max_filter_len {
                    Some(format!(
                        "a prefix of {} bytes is over the limit of {}",
                        prefix.len(),
                        limits.max_filter_len
                    ))
                } else {
                    index_full(&self.index, limits)
                };
                match (refusal, Filter::new(FilterKind::Prefix, prefix, usize::MAX)) {
                    (None, Ok(filter)) => {
                        self.index.insert(&filter, front.id);
                        super::sweep::note_interest(&mut self.cluster, true, &filter);
                        front.counts.insert(prefix.into(), 1);
                        self.counters.xpub_subscribes += 1;
                        NoticeOutcome::Counted { routed: true }
                    }
                    (refusal, filter) => {
                        let why = refusal.unwrap_or_else(|| match filter {
                            Err(e) => e.to_string(),
                            Ok(_) => String::new(),
                        });
                        self.counters.xpub_refused_notices += 1;
                        NoticeOutcome::Refused(why)
                    }
                }
            }
            Some(Notice::Unsubscribe(prefix)) => match front.counts.get_mut(prefix) {
                None => {
                    self.counters.xpub_unknown_unsubscribes += 1;
                    NoticeOutcome::NotSubscribed
                }
                Some(count) if *count > 1 => {
                    *count -= 1;
                    self.counters.xpub_unsubscribes += 1;
                    NoticeOutcome::Counted { routed: true }
                }
                Some(_) => {
                    front.counts.remove(prefix);
                    if let Ok(filter) = Filter::new(FilterKind::Prefix, prefix, usize::MAX) {
                        self.index.remove(&filter, front.id);
                        super::sweep::note_interest(&mut self.cluster, false, &filter);
                    }
                    self.counters.xpub_unsubscribes += 1;
                    NoticeOutcome::Counted { routed: false }
                }
            },
        };
        if let NoticeOutcome::Refused(why) = &outcome {
            self.command_log.warn(
                now,
                format_args!("refused a SUB socket's subscription: {why}"),
            );
        }
        outcome
    }

    /// Distinct prefixes the XPUB front's SUB sockets hold now.
    pub fn xpub_prefixes(&self) -> usize {
        self.xpub.as_ref().map_or(0, XpubFront::prefixes)
    }

    /// Takes the front's id out of `matched` and sends the message to the
    /// XPUB socket if it was there. `last_use` when no subscriber matched
    /// besides the front.
    pub(super) fn send_to_xpub(
        &mut self,
        topic: &[u8],
        payload: &mut P,
        payload_len: u64,
        out: &mut impl Transport<P>,
    ) -> bool {
        let Some(front) = &self.xpub else {
            return false;
        };
        let Some(at) = self.matched.iter().position(|&id| id == front.id) else {
            return false;
        };
        self.matched.swap_remove(at);
        let last_use = self.matched.is_empty();
        match out.to_xpub(topic, payload, last_use) {
            SendOutcome::Sent => {
                self.counters.xpub_delivered += 1;
                self.counters.delivered_bytes += payload_len;
            }
            SendOutcome::WouldBlock | SendOutcome::Unreachable => {
                self.counters.xpub_dropped += 1;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use super::*;
    use crate::config::BrokerConfig;

    /// Records deliveries per routing id and what reached the XPUB front.
    #[derive(Default)]
    struct Out {
        delivered: Vec<(Vec<u8>, Vec<u8>)>,
        xpub: Vec<(Vec<u8>, bool)>,
    }

    impl Transport<Rc<[u8]>> for Out {
        fn deliver(
            &mut self,
            to: &[u8],
            _: u64,
            topic: &[u8],
            _: &mut Rc<[u8]>,
            _: bool,
        ) -> SendOutcome {
            self.delivered.push((to.to_vec(), topic.to_vec()));
            SendOutcome::Sent
        }
        fn reply(&mut self, _: &[u8], _: &[&[u8]]) -> SendOutcome {
            SendOutcome::Sent
        }
        fn to_xpub(&mut self, topic: &[u8], _: &mut Rc<[u8]>, last_use: bool) -> SendOutcome {
            self.xpub.push((topic.to_vec(), last_use));
            SendOutcome::Sent
        }
    }

    fn publish(broker: &mut Broker<Rc<[u8]>>, topic: &[u8], out: &mut Out) -> usize {
        let mut frames: [Rc<[u8]>; 2] = [Rc::from(topic), Rc::from(&b"x"[..])];
        broker
            .on_publish(None, &mut frames, 2, Instant::now(), out)
            .unwrap()
    }

    fn broker() -> Broker<Rc<[u8]>> {
        let mut broker = Broker::new(BrokerConfig::default(), Instant::now());
        broker.open_xpub_front();
        broker
    }

    #[test]
    fn a_prefix_is_routed_while_any_sub_holds_it() {
        let mut b = broker();
        let now = Instant::now();
        let mut out = Out::default();
        assert_eq!(publish(&mut b, b"D", &mut out), 0);
        b.on_xpub_notice(b"\x01D", now);
        b.on_xpub_notice(b"\x01D", now);
        assert_eq!(b.xpub_prefixes(), 1);
        assert_eq!(b.subscription_count(), 1, "one index entry for both");
        assert_eq!(publish(&mut b, b"D.x", &mut out), 1);
        assert_eq!(
            b.on_xpub_notice(b"\x00D", now),
            NoticeOutcome::Counted { routed: true }
        );
        assert_eq!(publish(&mut b, b"D", &mut out), 1);
        assert_eq!(
            b.on_xpub_notice(b"\x00D", now),
            NoticeOutcome::Counted { routed: false }
        );
        assert_eq!(publish(&mut b, b"D", &mut out), 0);
        assert_eq!(b.subscription_count(), 0);
        assert_eq!(out.xpub.len(), 2);
        assert_eq!(
            b.on_xpub_notice(b"\x00D", now),
            NoticeOutcome::NotSubscribed
        );
        let c = b.counters();
        assert_eq!(
            (
                c.xpub_subscribes,
                c.xpub_unsubscribes,
                c.xpub_unknown_unsubscribes
            ),
            (2, 2, 1)
        );
        assert_eq!((c.xpub_delivered, c.unmatched), (2, 2));
    }

    #[test]
    fn the_front_gets_a_message_once_next_to_dealer_subscribers() {
        let mut b = broker();
        let now = Instant::now();
        let mut out = Out::default();
        b.on_command(
            b"dealer",
            None,
            &[b"SUB", b"prefix", b"net."],
            3,
            now,
            &mut out,
        );
        b.on_xpub_notice(b"\x01net", now);
        b.on_xpub_notice(b"\x01net.a", now);
        b.on_xpub_notice(b"\x01", now);
        assert_eq!(publish(&mut b, b"net.a", &mut out), 2);
        assert_eq!(out.delivered, vec![(b"dealer".to_vec(), b"net.a".to_vec())]);
        // Once, however many prefixes match; shared, since the dealer
        // still needs the payload.
        assert_eq!(out.xpub, vec![(b"net.a".to_vec(), false)]);
        assert_eq!(publish(&mut b, b"other", &mut out), 1);
        assert_eq!(out.xpub[1], (b"other".to_vec(), true), "the last use");
    }

    #[test]
    fn notices_obey_the_limits() {
        let mut config = BrokerConfig::default();
        config.limits.max_filter_len = 4;
        config.limits.max_filters_total = 2;
        let now = Instant::now();
        let mut b = Broker::<Rc<[u8]>>::new(config, now);
        assert_eq!(
            b.on_xpub_notice(b"\x01a", now),
            NoticeOutcome::Malformed,
            "closed"
        );
        b.open_xpub_front();
        assert!(matches!(
            b.on_xpub_notice(b"\x01abcde", now),
            NoticeOutcome::Refused(_)
        ));
        b.on_xpub_notice(b"\x01a", now);
        b.on_xpub_notice(b"\x01b", now);
        assert!(matches!(
            b.on_xpub_notice(b"\x01c", now),
            NoticeOutcome::Refused(_)
        ));
        // A prefix already held costs nothing more: still counted.
        assert_eq!(
            b.on_xpub_notice(b"\x01a", now),
            NoticeOutcome::Counted { routed: true }
        );
        assert_eq!(b.on_xpub_notice(b"", now), NoticeOutcome::Malformed);
        assert_eq!(b.on_xpub_notice(b"\x02a", now), NoticeOutcome::Malformed);
        let c = b.counters();
        assert_eq!(
            (
                c.xpub_refused_notices,
                c.xpub_malformed_notices,
                c.xpub_subscribes
            ),
            (2, 2, 3)
        );
        assert_eq!(b.xpub_prefixes(), 2);
    }
}
