//! The event loop: one `mio::Poll` over the two broker sockets' `ZMQ_FD`s,
//! moving frames between them and the [`Broker`](crate::broker::Broker)
//! core.
//!
//! `ZMQ_FD` is not a readiness signal for messages: it is edge-triggered and
//! only says "look at `ZMQ_EVENTS`". An edge can be consumed by any libzmq
//! call on the socket, sends included, so the loop never trusts it alone: it
//! reads each socket until `EAGAIN`, and before it blocks it asks
//! `ZMQ_EVENTS` of both sockets (which also re-arms the edge). Skipping that
//! check stalls the broker with messages waiting.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::Server;
use super::error::{ServerError, zmq_call};
use super::monitor::Watch;
use super::socket::{ZMQ_ZBROKER_DROPPED, ZMQ_ZBROKER_OUT_BYTES};
use super::transport::RouterTransport;
use crate::auth::ZapHandler;
use crate::ffi::get_i64_option;
use crate::frame::Frame;

const PUBLISHERS: Token = Token(0);
const SUBSCRIBERS: Token = Token(1);
const WAKER: Token = Token(2);
/// SIGINT and SIGTERM (see `shutdown`).
pub(crate) const SIGNALS: Token = Token(3);
const ZAP: Token = Token(4);
const PUBLISHER_MONITOR: Token = Token(5);
const SUBSCRIBER_MONITOR: Token = Token(6);
const XPUB: Token = Token(7);
const XPUB_MONITOR: Token = Token(8);

/// Messages read from one socket before the loop turns to the other, flushes
/// queues and checks timers: large enough to amortise the poll, small enough
/// that neither side waits long.
const BATCH: usize = 512;

/// A poller watching every socket the loop reads, and the waker that
/// interrupts its wait from another thread.
pub(crate) fn poller(
    pull: &zmq::Socket,
    router: &zmq::Socket,
    xpub: Option<&zmq::Socket>,
    publisher_watch: &Watch,
    subscriber_watch: &Watch,
    xpub_watch: Option<&Watch>,
    zap: Option<&ZapHandler>,
) -> Result<(Poll, Waker), ServerError> {
    let poll = Poll::new().map_err(|e| ServerError::Io("create the poller", e))?;
    register(&poll, zmq_call("read ZMQ_FD", pull.get_fd())?, PUBLISHERS)?;
    register(
        &poll,
        zmq_call("read ZMQ_FD", router.get_fd())?,
        SUBSCRIBERS,
    )?;
    register(
        &poll,
        zmq_call("read ZMQ_FD", publisher_watch.socket().get_fd())?,
        PUBLISHER_MONITOR,
    )?;
    register(
        &poll,
        zmq_call("read ZMQ_FD", subscriber_watch.socket().get_fd())?,
        SUBSCRIBER_MONITOR,
    )?;
    if let Some(zap) = zap {
        register(&poll, zmq_call("read ZMQ_FD", zap.socket().get_fd())?, ZAP)?;
    }
    if let Some(xpub) = xpub {
        register(&poll, zmq_call("read ZMQ_FD", xpub.get_fd())?, XPUB)?;
    }
    if let Some(watch) = xpub_watch {
        register(
            &poll,
            zmq_call("read ZMQ_FD", watch.socket().get_fd())?,
            XPUB_MONITOR,
        )?;
    }
    let waker = Waker::new(poll.registry(), WAKER)
        .map_err(|e| ServerError::Io("create the stop waker", e))?;
    Ok((poll, waker))
}

fn register(poll: &Poll, fd: RawFd, token: Token) -> Result<(), ServerError> {
    poll.registry()
        .register(&mut SourceFd(&fd), token, Interest::READABLE)
        .map_err(|e| ServerError::Io("register a socket with the poller", e))
}

/// Whether libzmq holds a message ready to read on `socket`. Asking also
/// re-arms its `ZMQ_FD` edge and makes libzmq process its command queue.
pub(crate) fn has_input(socket: &zmq::Socket) -> Result<bool, ServerError> {
    Ok(zmq_call("read ZMQ_EVENTS", socket.get_events())?.contains(zmq::POLLIN))
}

impl Server {
    /// Moves messages until a stop is requested; what is still queued then
    /// is `shut_down`'s to flush.
    pub(crate) fn serve(&mut self) -> Result<(), ServerError> {
        let mut events = Events::with_capacity(8);
        let mut next_tick = Instant::now();
        loop {
            let busy = self.read_publishers(Instant::now())? == BATCH;
            // Read after the publish batch, which may have taken a while: a
            // command is stamped with when it arrived, not when the batch
            // began, or a live subscriber could look idle past its expiry.
            let now = Instant::now();
            let busy = self.read_subscribers(now)? == BATCH || busy;
            let busy = self.read_xpub_notices(now)? == BATCH || busy;
            let busy = self.read_cluster(now)? == BATCH || busy;
            let backlogged = self.core.flush(&mut RouterTransport::full(
                &mut self.router,
                self.xpub.as_mut(),
                self.cluster.as_mut(),
            ));
            self.poll_membership()?;
            if now >= next_tick {
                next_tick = self.core.tick(
                    now,
                    &mut RouterTransport::full(
                        &mut self.router,
                        self.xpub.as_mut(),
                        self.cluster.as_mut(),
                    ),
                );
                self.watch_connections();
                // Summed over every subscriber pipe: once a tick, not per send.
                self.libzmq_queued_bytes = get_i64_option(&mut self.router, ZMQ_ZBROKER_OUT_BYTES)
                    .map_or(0, |bytes| bytes.max(0) as u64);
                if let Some(xpub) = self.xpub.as_mut() {
                    self.xpub_sub_drops = get_i64_option(xpub, ZMQ_ZBROKER_DROPPED)
                        .map_or(self.xpub_sub_drops, |drops| drops.max(0) as u64);
                }
                self.stats.publish(self.snapshot());
            }
            if self.stopper.is_requested() {
                return Ok(());
            }
            // Publishers held back by the backpressure policy wait in
            // libzmq's queues; their input must not keep the loop spinning.
            let publishers_ready = !self.publishers_held(now) && has_input(&self.pull)?;
            let notices_ready = match &self.xpub {
                Some(xpub) => has_input(xpub)?,
                None => false,
            };
            let cluster_ready = match &self.cluster {
                Some(cluster) => cluster.has_input()?,
                None => false,
            };
            let timeout = if busy
                || publishers_ready
                || notices_ready
                || cluster_ready
                || has_input(&self.router)?
            {
                Duration::ZERO
            } else if backlogged {
                // No per-peer writability event exists for ROUTER; retry soon.
                Duration::from_millis(1)
            } else {
                next_tick.saturating_duration_since(now)
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ServerError::Io("wait for events", e)),
            }
            if events.iter().any(|e| {
                [ZAP, PUBLISHER_MONITOR, SUBSCRIBER_MONITOR, XPUB_MONITOR].contains(&e.token())
            }) {
                self.watch_connections();
            }
            if events.iter().any(|e| e.token() == SIGNALS) {
                self.on_signals();
            }
        }
    }

    /// Answers ZAP requests and reads the socket monitors. Each drains until
    /// `EAGAIN`, so no `ZMQ_FD` edge is lost (see the module docs).
    pub(crate) fn watch_connections(&mut self) {
        if let Some(zap) = self.zap.as_mut()
            && let Err(e) = zap.answer_pending()
        {
            tracing::error!(error = %e, "the ZAP handler failed");
        }
        self.publisher_watch.drain();
        self.subscriber_watch.drain();
        if let Some(watch) = self.xpub_watch.as_mut() {
            watch.drain();
        }
    }

    /// Reads up to [`BATCH`] subscription notices from the XPUB front's
    /// SUB sockets into the core; returns how many.
    fn read_xpub_notices(&mut self, now: Instant) -> Result<usize, ServerError> {
        let Some(xpub) = self.xpub.as_mut() else {
            return Ok(0);
        };
        for n in 0..BATCH {
            match self.overflow_frame.recv(xpub, zmq::DONTWAIT) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => return Ok(n),
                Err(e) => return Err(ServerError::Zmq("receive from the XPUB front", e)),
            }
            // A SUB sends single-part notices; anything longer is not one.
            if self.overflow_frame.more() {
                while self.overflow_frame.more() {
                    zmq_call("receive a message part", self.overflow_frame.recv(xpub, 0))?;
                }
                self.core.on_xpub_notice(&[], now);
                continue;
            }
            self.core.on_xpub_notice(self.overflow_frame.bytes(), now);
        }
        Ok(BATCH)
    }

    /// Reads up to [`BATCH`] messages from the cluster ROUTER (peers'
    /// links) and as many from each outgoing link, into the core; returns
    /// the most read from one socket.
    fn read_cluster(&mut self, now: Instant) -> Result<usize, ServerError> {
        let Some(cluster) = self.cluster.as_mut() else {
            return Ok(0);
        };
        let mut most = 0;
        let mut n = 0;
        while n < BATCH {
            match self.peer_frames[0].recv(&mut cluster.router, zmq::DONTWAIT) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => return Err(ServerError::Zmq("receive from peers", e)),
            }
            n += 1;
            let count = receive_rest(
                &mut cluster.router,
                &mut self.peer_frames,
                &mut self.overflow_frame,
            )?;
            let [routing_id, message] = &self.peer_frames;
            let frames: [&[u8]; 1] = [message.bytes()];
            let kept = usize::from(count > 1);
            self.core.on_peer_message(
                routing_id.bytes(),
                &frames[..kept],
                count - 1,
                now,
                &mut RouterTransport::full(&mut self.router, self.xpub.as_mut(), Some(cluster)),
            );
        }
        most = most.max(n);
        let links: Vec<zbroker_core::cluster::LinkId> =
            cluster.links.iter().map(|l| l.id).collect();
        for link in links {
            let mut n = 0;
            while n < BATCH {
                let Some(socket) = cluster.link(link) else {
                    break;
                };
                match self.link_frames[0].recv(socket, zmq::DONTWAIT) {
                    Ok(()) => {}
                    Err(zmq::Error::EAGAIN) => break,
                    Err(e) => return Err(ServerError::Zmq("receive from a peer link", e)),
                }
                n += 1;
                let count = receive_rest(socket, &mut self.link_frames, &mut self.overflow_frame)?;
                let kept = count.min(self.link_frames.len());
                self.core.on_link_message(
                    link,
                    &mut self.link_frames[..kept],
                    count,
                    now,
                    &mut RouterTransport::full(&mut self.router, self.xpub.as_mut(), Some(cluster)),
                );
            }
            most = most.max(n);
        }
        self.core.send_routed(&mut RouterTransport::full(
            &mut self.router,
            self.xpub.as_mut(),
            Some(cluster),
        ));
        Ok(most)
    }

    /// Whether publishers wait: held back by the backpressure policy, or,
    /// in a broker that just joined its cluster, until its peers' interest
    /// is in ([`Broker::cluster_warming`](crate::broker::Broker::cluster_warming)).
    fn publishers_held(&mut self, now: Instant) -> bool {
        self.core.publishers_paused() || self.core.cluster_warming(now)
    }

    /// Reads up to [`BATCH`] publisher messages and routes them; returns
    /// how many. Their deliveries are sent after the batch, one run per
    /// subscriber (see [`Broker::route_publish`](crate::broker::Broker::route_publish)).
    fn read_publishers(&mut self, now: Instant) -> Result<usize, ServerError> {
        let mut read = 0;
        while read < BATCH && !self.publishers_held(now) {
            match self.publish_frames[0].recv(&mut self.pull, zmq::DONTWAIT) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => return Err(ServerError::Zmq("receive from publishers", e)),
            }
            read += 1;
            let count = receive_rest(
                &mut self.pull,
                &mut self.publish_frames,
                &mut self.overflow_frame,
            )?;
            let kept = count.min(self.publish_frames.len());
            let key = if self.authenticated {
                copy_user_id(&self.publish_frames[0], &mut self.user_id)
            } else {
                None
            };
            let _ = self.core.route_publish(
                key,
                &mut self.publish_frames[..kept],
                count,
                now,
                &mut RouterTransport::full(
                    &mut self.router,
                    self.xpub.as_mut(),
                    self.cluster.as_mut(),
                ),
            );
        }
        self.core.send_routed(&mut RouterTransport::full(
            &mut self.router,
            self.xpub.as_mut(),
            self.cluster.as_mut(),
        ));
        Ok(read)
    }

    /// Reads up to [`BATCH`] subscriber messages; returns how many.
    pub(crate) fn read_subscribers(&mut self, now: Instant) -> Result<usize, ServerError> {
        for n in 0..BATCH {
            match self.command_frames[0].recv(&mut self.router, zmq::DONTWAIT) {
                Ok(()) => {}
                Err(zmq::Error::EAGAIN) => return Ok(n),
                Err(e) => return Err(ServerError::Zmq("receive from subscribers", e)),
            }
            // Frame 0 is the routing id ROUTER prepends.
            let count = receive_rest(
                &mut self.router,
                &mut self.command_frames,
                &mut self.overflow_frame,
            )?;
            let [routing_id, rest @ ..] = &self.command_frames;
            let kept = (count - 1).min(rest.len());
            let mut frames: [&[u8]; 3] = [&[]; 3];
            for (slot, frame) in frames.iter_mut().zip(&rest[..kept]) {
                *slot = frame.bytes();
            }
            // The connection's User-Id is read from the first command frame,
            // which comes from the engine with its metadata; the routing-id
            // frame is built by ROUTER and, when libzmq pre-fetched the
            // message (ZMQ_EVENTS does), may be built without it.
            let first = if kept > 0 { &rest[0] } else { routing_id };
            let key = if self.authenticated {
                copy_user_id(first, &mut self.user_id)
            } else {
                None
            };
            self.core.on_command(
                routing_id.bytes(),
                key,
                &frames[..kept],
                count - 1,
                now,
                &mut RouterTransport::full(
                    &mut self.router,
                    self.xpub.as_mut(),
                    self.cluster.as_mut(),
                ),
            );
        }
        Ok(BATCH)
    }
}

/// Copies `frame`'s authenticated user id into `buf` and returns it.
fn copy_user_id<'a>(frame: &Frame, buf: &'a mut String) -> Option<&'a str> {
    buf.clear();
    buf.push_str(frame.user_id()?);
    Some(buf)
}

/// Receives the remaining parts of a message whose first part is in
/// `frames[0]`: into `frames` while they last, then into `overflow` (so a
/// hostile many-part message costs no memory). Returns the part count. The
/// parts of a message arrive together, so this never waits.
fn receive_rest(
    socket: &mut zmq::Socket,
    frames: &mut [Frame],
    overflow: &mut Frame,
) -> Result<usize, ServerError> {
    let mut count = 1;
    let mut more = frames[0].more();
    while more {
        let slot = match frames.get_mut(count) {
            Some(frame) => frame,
            None => &mut *overflow,
        };
        zmq_call("receive a message part", slot.recv(socket, 0))?;
        more = slot.more();
        count += 1;
    }
    Ok(count)
}
