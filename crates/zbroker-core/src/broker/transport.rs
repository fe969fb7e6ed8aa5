//! The boundary between the core and the sockets: what the core holds of a
//! message ([`Payload`]), what it asks of the event loop ([`Transport`]),
//! and what the event loop answers ([`SendOutcome`]).

use std::rc::Rc;
use std::sync::Arc;

use crate::protocol;
use crate::subscribers::Reply;

/// A message part the core can hold on to and fan out.
///
/// `share` must be cheap: it is called once per subscriber whose delivery has
/// to wait in a queue, so it must not copy large payloads.
pub trait Payload: Sized {
    /// The part's bytes.
    fn bytes(&self) -> &[u8];
    /// Another handle on the same bytes.
    fn share(&mut self) -> Self;
    /// The part itself, moved out; `self` is left empty (or, where moving
    /// costs more than sharing, still holding the bytes) and is not read
    /// again until it is refilled.
    fn take(&mut self) -> Self {
        self.share()
    }
}

/// Shares by reference count; never copies the bytes.
impl Payload for Rc<[u8]> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn share(&mut self) -> Self {
        Rc::clone(self)
    }
}

/// Shares by atomic reference count; never copies the bytes.
impl Payload for Arc<[u8]> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn share(&mut self) -> Self {
        Arc::clone(self)
    }
}

/// What became of one attempted send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// libzmq took the whole message.
    Sent,
    /// The peer's pipe is full (`EAGAIN`); nothing was sent, try later.
    WouldBlock,
    /// The peer is gone (`EHOSTUNREACH`); it will never take anything.
    Unreachable,
}

/// Where the core's output goes. Implementations must never block.
///
/// The core calls it synchronously, from inside the call it was handed to,
/// and never keeps it.
pub trait Transport<P> {
    /// Sends the two-part delivery `[MSG|seq|topic, payload]` to the
    /// subscriber with `routing_id`. It sends a [`Payload::share`] of
    /// `payload`, or, when `last_use` says no later delivery needs it,
    /// may send `payload` itself ([`Payload::take`]); on
    /// [`SendOutcome::WouldBlock`] it must leave `payload` as it was.
    fn deliver(
        &mut self,
        routing_id: &[u8],
        seq: u64,
        topic: &[u8],
        payload: &mut P,
        last_use: bool,
    ) -> SendOutcome;
    /// Sends a reply, one frame per slice, to `routing_id`.
    fn reply(&mut self, routing_id: &[u8], frames: &[&[u8]]) -> SendOutcome;
    /// Sends `[topic, payload]` to the XPUB front, once for all its SUB
    /// sockets, under the same sharing rules as [`deliver`]; called only
    /// after [`Broker::open_xpub_front`](super::Broker::open_xpub_front).
    /// A transport without that front never gets the call; the default
    /// says it is unreachable.
    ///
    /// [`deliver`]: Transport::deliver
    fn to_xpub(&mut self, topic: &[u8], payload: &mut P, last_use: bool) -> SendOutcome {
        let _ = (topic, payload, last_use);
        SendOutcome::Unreachable
    }
    /// Sends `FORWARD` to the peer whose link arrives at `routing_id` on
    /// the cluster endpoint: the header [`forward_header`] encodes for
    /// `seq`, then `topic`, then `payload` under the same sharing rules as
    /// [`deliver`]. Called only once the broker is clustered.
    ///
    /// [`deliver`]: Transport::deliver
    /// [`forward_header`]: crate::cluster::wire::forward_header
    fn forward(
        &mut self,
        routing_id: &[u8],
        seq: u64,
        topic: &[u8],
        payload: &mut P,
        last_use: bool,
    ) -> SendOutcome {
        let _ = (routing_id, seq, topic, payload, last_use);
        SendOutcome::Unreachable
    }
    /// Sends one link frame to the peer at `routing_id` on the cluster
    /// endpoint (a PONG or RESET on its link).
    fn to_peer(&mut self, routing_id: &[u8], frame: &[u8]) -> SendOutcome {
        let _ = (routing_id, frame);
        SendOutcome::Unreachable
    }
    /// Sends one link frame on this broker's outgoing link `link`.
    fn to_link(&mut self, link: crate::cluster::LinkId, frame: &[u8]) -> SendOutcome {
        let _ = (link, frame);
        SendOutcome::Unreachable
    }
}

/// Puts `reply` in its protocol v1 frames and hands them to `out`.
pub(super) fn send_reply<P>(out: &mut impl Transport<P>, to: &[u8], reply: &Reply) -> SendOutcome {
    match reply {
        Reply::Ok { subscribe, filter } => {
            let verb = if *subscribe {
                protocol::SUB
            } else {
                protocol::UNSUB
            };
            out.reply(
                to,
                &[protocol::OK, verb, filter.kind().as_bytes(), filter.text()],
            )
        }
        Reply::Err(code, text) => out.reply(to, &[protocol::ERR, code.as_bytes(), text.as_bytes()]),
        Reply::Pong => out.reply(to, &[protocol::PONG]),
    }
}
