//! [`Watch`]: what libzmq's socket monitor says about one broker socket's
//! peers, counted for the metrics and logged (rate-limited).
//!
//! libzmq accepts, authenticates and drops connections on its own threads;
//! its monitor events are the only way the broker learns of them, and of
//! the peers zbroker's libzmq build refuses for breaking a limit.

use std::time::Instant;

use super::error::{ServerError, zmq_call};
use crate::metrics::Refusals;
use zbroker_core::counters::LogLimiter;

/// The monitor event zbroker's libzmq build adds (zmq.h in
/// vendor/zeromq-src; vendor/zmq-sys/README.md says why): a peer dropped or
/// refused for breaking a limit, the event's value saying which.
const ZMQ_EVENT_ZBROKER_REFUSED: u16 = 0x8000;
const REFUSED_MESSAGE_SIZE: u32 = 1;
const REFUSED_MESSAGE_PARTS: u32 = 2;
const REFUSED_CONNECTIONS: u32 = 3;
const REFUSED_ROUTING_ID: u32 = 4;

/// Counts one broker socket's connections, failed handshakes and refused
/// peers through a libzmq socket monitor. The counts are as of the last
/// [`Watch::drain`].
pub(crate) struct Watch {
    /// `publishers` or `subscribers`, for the log.
    name: &'static str,
    monitor: zmq::Socket,
    /// Connections open now.
    pub(crate) open: u64,
    /// Handshakes that failed, for any reason.
    pub(crate) handshake_failures: u64,
    /// Peers libzmq dropped or refused, by reason.
    pub(crate) refusals: Refusals,
    log: LogLimiter,
}

impl Watch {
    /// Starts monitoring `socket`. Connections accepted before this are
    /// never counted.
    pub(crate) fn attach(
        context: &zmq::Context,
        socket: &zmq::Socket,
        name: &'static str,
    ) -> Result<Watch, ServerError> {
        use zmq::SocketEvent as E;
        let endpoint = format!("inproc://zbroker-monitor-{name}");
        let events = [
            E::ACCEPTED,
            E::ACCEPT_FAILED,
            E::DISCONNECTED,
            E::HANDSHAKE_FAILED_NO_DETAIL,
            E::HANDSHAKE_FAILED_PROTOCOL,
            E::HANDSHAKE_FAILED_AUTH,
        ]
        .iter()
        .fold(i32::from(ZMQ_EVENT_ZBROKER_REFUSED), |all, e| {
            all | *e as i32
        });
        zmq_call("start a socket monitor", socket.monitor(&endpoint, events))?;
        let monitor = zmq_call("create a monitor socket", context.socket(zmq::PAIR))?;
        zmq_call("connect the monitor", monitor.connect(&endpoint))?;
        Ok(Watch {
            name,
            monitor,
            open: 0,
            handshake_failures: 0,
            refusals: Refusals::default(),
            log: LogLimiter::default(),
        })
    }

    /// The monitor's own socket, for registering its `ZMQ_FD` with the
    /// poller.
    pub(crate) fn socket(&self) -> &zmq::Socket {
        &self.monitor
    }

    /// Reads every event waiting, until `EAGAIN`; never blocks.
    pub(crate) fn drain(&mut self) {
        use zmq::SocketEvent as E;
        const ACCEPTED: u16 = E::ACCEPTED as u16;
        const ACCEPT_FAILED: u16 = E::ACCEPT_FAILED as u16;
        const DISCONNECTED: u16 = E::DISCONNECTED as u16;
        const FAILED_NO_DETAIL: u16 = E::HANDSHAKE_FAILED_NO_DETAIL as u16;
        const FAILED_PROTOCOL: u16 = E::HANDSHAKE_FAILED_PROTOCOL as u16;
        const FAILED_AUTH: u16 = E::HANDSHAKE_FAILED_AUTH as u16;
        while let Ok(frames) = self.monitor.recv_multipart(zmq::DONTWAIT) {
            let Some(event) = crate::frame::monitor_event(&frames) else {
                continue;
            };
            let value = crate::frame::monitor_event_value(&frames).unwrap_or(0);
            let now = Instant::now();
            // Matched on the raw value: the zmq crate's SocketEvent panics
            // on events it does not know, such as this build's own.
            match event {
                ACCEPTED => self.open += 1,
                DISCONNECTED => self.open = self.open.saturating_sub(1),
                FAILED_NO_DETAIL | FAILED_PROTOCOL | FAILED_AUTH => {
                    self.handshake_failures += 1;
                    self.log.warn(
                        now,
                        format_args!("a client failed the handshake (event {event:#x})"),
                    );
                }
                ACCEPT_FAILED => {
                    self.refusals.accept_failures += 1;
                    let error = std::io::Error::from_raw_os_error(value as i32);
                    self.log.warn(
                        now,
                        format_args!(
                            "cannot accept a {} connection: {error} (raise the open-file \
                             limit, or lower --max-connections)",
                            self.name
                        ),
                    );
                }
                ZMQ_EVENT_ZBROKER_REFUSED => {
                    let why = match value {
                        REFUSED_MESSAGE_SIZE => {
                            self.refusals.message_size += 1;
                            "a message part over --max-message-size"
                        }
                        REFUSED_MESSAGE_PARTS => {
                            self.refusals.message_parts += 1;
                            "a message of too many parts"
                        }
                        REFUSED_CONNECTIONS => {
                            self.refusals.connections += 1;
                            "over --max-connections"
                        }
                        REFUSED_ROUTING_ID => {
                            // A failed handshake as far as the client can
                            // tell, so counted with the others.
                            self.handshake_failures += 1;
                            "a client-chosen routing id starting with 0x00 \
                             (reserved for generated ids; see docs/PROTOCOL.md)"
                        }
                        _ => "an unknown reason",
                    };
                    self.log.warn(
                        now,
                        format_args!("dropped a {} connection: {why}", self.name),
                    );
                }
                _ => {}
            }
        }
    }
}
