//! [`RouterTransport`]: the core's [`Transport`] over the subscribers'
//! ROUTER socket.
//!
//! The core decides what goes to whom; this sends it without ever blocking
//! and reports what libzmq could not take, so that the core can queue it
//! (a full pipe) or forget the subscriber (a vanished peer).

use zbroker_core::cluster::LinkId;
use zbroker_core::cluster::wire;

use super::cluster::ClusterSockets;
use crate::broker::{SendOutcome, Transport};
use crate::frame::Frame;
use crate::subscribers::RoutingId;

/// Sends the core's output on a ROUTER socket (with `ZMQ_ROUTER_MANDATORY`
/// set), never blocking. Public so that benches and tests drive the real
/// send path.
pub struct RouterTransport<'a> {
    socket: &'a mut zmq::Socket,
    /// The XPUB front's socket, when `--xpub-bind` opened one.
    xpub: Option<&'a mut zmq::Socket>,
    /// The cluster's sockets, when `--cluster-bind` opened them.
    cluster: Option<&'a mut ClusterSockets>,
    /// The routing-id part of the last send and its bytes: the core sends
    /// each subscriber's deliveries in a row, so the next part usually
    /// shares it instead of building its own.
    last_address: Option<Frame>,
    /// Reused (cleared, not reallocated) on every miss.
    last_id: RoutingId,
}

impl<'a> RouterTransport<'a> {
    /// Sends on `socket`.
    pub fn new(socket: &'a mut zmq::Socket) -> Self {
        Self::with_xpub(socket, None)
    }

    /// Sends on `socket`, and what the core routes to the XPUB front on
    /// `xpub`.
    pub fn with_xpub(socket: &'a mut zmq::Socket, xpub: Option<&'a mut zmq::Socket>) -> Self {
        Self::full(socket, xpub, None)
    }

    /// Sends on `socket`, the XPUB front's share on `xpub`, and link
    /// messages on the cluster's sockets.
    pub fn full(
        socket: &'a mut zmq::Socket,
        xpub: Option<&'a mut zmq::Socket>,
        cluster: Option<&'a mut ClusterSockets>,
    ) -> Self {
        RouterTransport {
            socket,
            xpub,
            cluster,
            last_address: None,
            last_id: RoutingId::new(),
        }
    }

    /// Sends the routing frame. With `ZMQ_ROUTER_MANDATORY` this is where a
    /// full pipe (`EAGAIN`) or an unknown peer (`EHOSTUNREACH`) shows; once
    /// it is accepted, libzmq takes the rest of the message whole.
    fn address(&mut self, routing_id: &[u8]) -> SendOutcome {
        let frame = match &mut self.last_address {
            Some(frame) if self.last_id[..] == *routing_id => frame.share(),
            _ => {
                let mut frame = Frame::from_slice(routing_id);
                let shared = frame.share();
                self.last_address = Some(frame);
                self.last_id.clear();
                self.last_id.extend_from_slice(routing_id);
                shared
            }
        };
        match frame.send(self.socket, zmq::SNDMORE | zmq::DONTWAIT) {
            Ok(()) => SendOutcome::Sent,
            Err(zmq::Error::EAGAIN) => SendOutcome::WouldBlock,
            Err(_) => SendOutcome::Unreachable,
        }
    }
}

impl Transport<Frame> for RouterTransport<'_> {
    fn deliver(
        &mut self,
        routing_id: &[u8],
        seq: u64,
        topic: &[u8],
        payload: &mut Frame,
        last_use: bool,
    ) -> SendOutcome {
        match self.address(routing_id) {
            SendOutcome::Sent => {}
            other => return other,
        }
        let payload = outgoing(payload, last_use);
        let sent = Frame::header(seq, topic)
            .send(self.socket, zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| payload.send(self.socket, zmq::DONTWAIT));
        match sent {
            Ok(()) => SendOutcome::Sent,
            Err(_) => SendOutcome::Unreachable,
        }
    }

    /// `[topic, payload]` on the XPUB socket, which hands it to every SUB
    /// whose prefix matches. Without `ZMQ_XPUB_NODROP` libzmq never refuses
    /// it: a SUB whose pipe is full loses it, and this build's libzmq
    /// counts that (`ZMQ_ZBROKER_DROPPED`, read once a tick).
    fn to_xpub(&mut self, topic: &[u8], payload: &mut Frame, last_use: bool) -> SendOutcome {
        let Some(xpub) = self.xpub.as_deref_mut() else {
            return SendOutcome::Unreachable;
        };
        let payload = outgoing(payload, last_use);
        let sent = Frame::from_slice(topic)
            .send(xpub, zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| payload.send(xpub, zmq::DONTWAIT));
        match sent {
            Ok(()) => SendOutcome::Sent,
            Err(zmq::Error::EAGAIN) => SendOutcome::WouldBlock,
            Err(_) => SendOutcome::Unreachable,
        }
    }

    /// `[routing id, FORWARD header, topic, payload]` on the cluster
    /// ROUTER (with `ZMQ_ROUTER_MANDATORY`, like the subscribers').
    fn forward(
        &mut self,
        routing_id: &[u8],
        seq: u64,
        topic: &[u8],
        payload: &mut Frame,
        last_use: bool,
    ) -> SendOutcome {
        let Some(cluster) = self.cluster.as_deref_mut() else {
            return SendOutcome::Unreachable;
        };
        let router = &mut cluster.router;
        if let Err(refused) = send_routing_id(router, routing_id) {
            return refused;
        }
        let mut header = [0u8; wire::FORWARD_HEADER_MAX];
        let len = wire::forward_header(seq, &mut header);
        let header = &header[..len];
        let payload = outgoing(payload, last_use);
        let sent = Frame::from_slice(header)
            .send(router, zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| Frame::from_slice(topic).send(router, zmq::SNDMORE | zmq::DONTWAIT))
            .and_then(|()| payload.send(router, zmq::DONTWAIT));
        match sent {
            Ok(()) => SendOutcome::Sent,
            Err(_) => SendOutcome::Unreachable,
        }
    }

    fn to_peer(&mut self, routing_id: &[u8], frame: &[u8]) -> SendOutcome {
        let Some(cluster) = self.cluster.as_deref_mut() else {
            return SendOutcome::Unreachable;
        };
        let router = &mut cluster.router;
        if let Err(refused) = send_routing_id(router, routing_id) {
            return refused;
        }
        match Frame::from_slice(frame).send(router, zmq::DONTWAIT) {
            Ok(()) => SendOutcome::Sent,
            Err(_) => SendOutcome::Unreachable,
        }
    }

    fn to_link(&mut self, link: LinkId, frame: &[u8]) -> SendOutcome {
        let Some(socket) = self.cluster.as_deref_mut().and_then(|c| c.link(link)) else {
            return SendOutcome::Unreachable;
        };
        match Frame::from_slice(frame).send(socket, zmq::DONTWAIT) {
            Ok(()) => SendOutcome::Sent,
            Err(zmq::Error::EAGAIN) => SendOutcome::WouldBlock,
            Err(_) => SendOutcome::Unreachable,
        }
    }

    fn reply(&mut self, routing_id: &[u8], frames: &[&[u8]]) -> SendOutcome {
        match self.address(routing_id) {
            SendOutcome::Sent => {}
            other => return other,
        }
        for (i, frame) in frames.iter().enumerate() {
            let flags = if i + 1 < frames.len() {
                zmq::SNDMORE | zmq::DONTWAIT
            } else {
                zmq::DONTWAIT
            };
            if Frame::from_slice(frame).send(self.socket, flags).is_err() {
                return SendOutcome::Unreachable;
            }
        }
        SendOutcome::Sent
    }
}

/// Sends the routing-id frame of a message on the cluster ROUTER (with
/// `ZMQ_ROUTER_MANDATORY`): `Err` with what to report when libzmq refuses
/// it (a full pipe, or a peer gone).
fn send_routing_id(router: &mut zmq::Socket, routing_id: &[u8]) -> Result<(), SendOutcome> {
    match Frame::from_slice(routing_id).send(router, zmq::SNDMORE | zmq::DONTWAIT) {
        Ok(()) => Ok(()),
        Err(zmq::Error::EAGAIN) => Err(SendOutcome::WouldBlock),
        Err(_) => Err(SendOutcome::Unreachable),
    }
}

/// The part to send for `payload`: the part itself when no later delivery
/// needs it, else a share of it. A moved part costs no reference counting;
/// a share costs two (content and connection metadata), each undone by the
/// I/O thread.
fn outgoing(payload: &mut Frame, last_use: bool) -> Frame {
    if last_use {
        payload.take()
    } else {
        payload.share()
    }
}
