//! The event loop: one `mio::Poll` over the two broker sockets' `ZMQ_FD`s,
//! moving frames between them and the [`Broker`] core.
//!
//! `ZMQ_FD` is not a readiness signal for messages: it is edge-triggered and
//! only says "look at `ZMQ_EVENTS`". An edge can be consumed by any libzmq
//! call on the socket, sends included, so the loop never trusts it alone: it
//! reads each socket until `EAGAIN`, and before it blocks it asks
//! `ZMQ_EVENTS` of both sockets (which also re-arms the edge). Skipping that
//! check stalls the broker with messages waiting.

use std::ffi::c_int;
use std::fmt;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::auth::{self, Acl, ServerKeys, ZapHandler};
use crate::broker::{Broker, SendOutcome, Transport};
use crate::config::Config;
use crate::ffi::{get_i64_option, set_i64_option, set_int_option};
use crate::frame::Frame;
use crate::metrics::{Connections, Exporter, Refusals, Snapshot};
use crate::subscribers::RoutingId;
use zbroker_core::counters::LogLimiter;

const PUBLISHERS: Token = Token(0);
const SUBSCRIBERS: Token = Token(1);
const WAKER: Token = Token(2);
const SIGNALS: Token = Token(3);
const ZAP: Token = Token(4);
const PUBLISHER_MONITOR: Token = Token(5);
const SUBSCRIBER_MONITOR: Token = Token(6);

/// Messages read from one socket before the loop turns to the other, flushes
/// queues and checks timers: large enough to amortise the poll, small enough
/// that neither side waits long.
const BATCH: usize = 512;

/// libzmq's queue of commands from each subscriber (`ZMQ_RCVHWM` on the
/// ROUTER). The loop reads commands every turn, so this fills only while
/// the broker is starved; it bounds what one subscriber can have buffered
/// then, and is not worth a setting.
const COMMAND_HWM: i32 = 1000;

/// libzmq's DRAFT batch-size options (zmq.h); the `zmq` crate has no setter
/// for them, and only a libzmq built with the DRAFT API knows them
/// (vendor/zmq-sys builds one).
const ZMQ_IN_BATCH_SIZE: c_int = 101;
const ZMQ_OUT_BATCH_SIZE: c_int = 102;

/// The options and monitor event zbroker's own libzmq build adds (zmq.h in
/// vendor/zeromq-src; vendor/zmq-sys/README.md says why each exists).
const ZMQ_ZBROKER_MAXMSGPARTS: c_int = 1001;
const ZMQ_ZBROKER_SNDHWM_BYTES: c_int = 1002;
const ZMQ_ZBROKER_RCVHWM_BYTES: c_int = 1003;
const ZMQ_ZBROKER_MAX_CONNECTIONS: c_int = 1004;
const ZMQ_ZBROKER_OUT_BYTES: c_int = 1005;
const ZMQ_EVENT_ZBROKER_REFUSED: u16 = 0x8000;
const REFUSED_MESSAGE_SIZE: u32 = 1;
const REFUSED_MESSAGE_PARTS: u32 = 2;
const REFUSED_CONNECTIONS: u32 = 3;
const REFUSED_ROUTING_ID: u32 = 4;

/// Most parts a message from any peer may have. Protocol v1's longest
/// message has three; the broker reads the extra parts of a longer one and
/// refuses it as malformed, but past this libzmq drops the peer instead of
/// holding an endless message (README, "Security").
const MAX_MESSAGE_PARTS: c_int = 16;

/// libzmq's byte bound on each subscriber's queue of commands (with
/// [`COMMAND_HWM`] messages): commands are a few hundred bytes.
const COMMAND_HWM_BYTES: i64 = 1 << 20;

/// Why the broker could not start or had to stop.
#[derive(Debug)]
pub enum ServerError {
    /// Binding an endpoint failed.
    Bind {
        /// Which socket (`publisher` or `subscriber`).
        role: &'static str,
        /// The endpoint as configured.
        endpoint: String,
        /// libzmq's reason.
        source: zmq::Error,
    },
    /// A libzmq call failed.
    Zmq(&'static str, zmq::Error),
    /// The poller failed.
    Io(&'static str, std::io::Error),
    /// The configuration cannot work.
    Config(crate::config::ConfigError),
    /// CURVE keys or key lists could not be loaded.
    Auth(crate::auth::AuthError),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Bind {
                role,
                endpoint,
                source,
            } => {
                write!(f, "cannot bind the {role} endpoint {endpoint}: {source}")?;
                if *source == zmq::Error::EADDRINUSE {
                    write!(
                        f,
                        " (is another broker running? choose another address with --{}-bind)",
                        &role[..3]
                    )?;
                }
                Ok(())
            }
            ServerError::Zmq(what, e) => write!(f, "{what}: {e}"),
            ServerError::Io(what, e) => write!(f, "{what}: {e}"),
            ServerError::Config(e) => e.fmt(f),
            ServerError::Auth(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ServerError {}

/// Stops a running [`Server`] from any thread.
#[derive(Clone, Debug)]
pub struct Stopper {
    requested: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl Stopper {
    /// Asks the server to stop: it stops reading publishers, flushes queued
    /// messages for up to the configured linger and returns from `run`.
    pub fn stop(&self) {
        self.requested.store(true, Ordering::Release);
        // A failed wake only delays the stop until the next timer.
        let _ = self.waker.wake();
    }
}

/// Reads the broker's latest counters from any thread; refreshed every
/// timer tick (at most a second apart, more often with a short
/// `sub_timeout`).
#[derive(Clone, Debug, Default)]
pub struct StatsHandle(Arc<Mutex<Snapshot>>);

impl StatsHandle {
    /// The counters as of the last tick.
    pub fn snapshot(&self) -> Snapshot {
        match self.0.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn publish(&self, snapshot: Snapshot) {
        match self.0.lock() {
            Ok(mut guard) => *guard = snapshot,
            Err(poisoned) => *poisoned.into_inner() = snapshot,
        }
    }
}

/// Sends the core's output on a ROUTER socket (with `ZMQ_ROUTER_MANDATORY`
/// set), never blocking. Public so that benches and tests drive the real
/// send path.
pub struct RouterTransport<'a> {
    socket: &'a mut zmq::Socket,
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
        RouterTransport {
            socket,
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
        // A moved part costs no reference counting; a share costs two
        // (content and connection metadata), each undone by the I/O thread.
        let payload = if last_use {
            payload.take()
        } else {
            payload.share()
        };
        let sent = Frame::header(seq, topic)
            .send(self.socket, zmq::SNDMORE | zmq::DONTWAIT)
            .and_then(|()| payload.send(self.socket, zmq::DONTWAIT));
        match sent {
            Ok(()) => SendOutcome::Sent,
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

/// What CURVE needs at run time, loaded from the configured files.
#[derive(Debug)]
pub struct Security {
    /// The broker's key pair.
    pub keys: ServerKeys,
    /// Who may connect and use which topics.
    pub acl: Arc<Acl>,
}

/// Validates `config` and loads the files it refers to, binding nothing:
/// what `zbroker run --check-config` runs. `None` when CURVE is off.
pub fn check(config: &Config) -> Result<Option<Security>, ServerError> {
    config.validate().map_err(ServerError::Config)?;
    let Some(curve) = &config.curve else {
        return Ok(None);
    };
    if !zmq::has("curve").unwrap_or(false) {
        return Err(ServerError::Zmq(
            "CURVE is configured but this libzmq was built without it",
            zmq::Error::ENOTSUP,
        ));
    }
    let max = config.limits.max_filter_len;
    let keys = auth::read_secret_key(&curve.secret_key_file).map_err(ServerError::Auth)?;
    let acl = Acl {
        publishers: crate::auth::load_key_list(&curve.publisher_keys, max)
            .map_err(ServerError::Auth)?,
        subscribers: crate::auth::load_key_list(&curve.subscriber_keys, max)
            .map_err(ServerError::Auth)?,
    };
    Ok(Some(Security {
        keys,
        acl: Arc::new(acl),
    }))
}

/// Counts one broker socket's connections, failed handshakes and refused
/// peers through a libzmq socket monitor.
struct Watch {
    name: &'static str,
    monitor: zmq::Socket,
    open: u64,
    handshake_failures: u64,
    /// Peers libzmq dropped or refused, by reason.
    refusals: Refusals,
    log: LogLimiter,
}

impl Watch {
    fn attach(
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

    fn drain(&mut self) {
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

/// The running broker: two bound sockets, a poller and the core.
pub struct Server {
    // Field order is drop order: sockets must close before the context.
    pull: zmq::Socket,
    router: zmq::Socket,
    context: zmq::Context,
    poll: Poll,
    core: Broker<Frame>,
    pub_endpoint: String,
    sub_endpoint: String,
    /// How long to keep flushing queues on shutdown.
    linger: Duration,
    stopper: Stopper,
    stats: StatsHandle,
    zap: Option<ZapHandler>,
    publisher_watch: Watch,
    subscriber_watch: Watch,
    _exporter: Option<Exporter>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    /// Receive buffers reused for every message: topic and payload.
    publish_frames: [Frame; 2],
    /// Routing id, then up to three command frames.
    command_frames: [Frame; 4],
    /// Swallows the extra parts of a malformed message.
    overflow_frame: Frame,
    /// The sender's CURVE key, copied out of the frame it came with so the
    /// frames can be lent mutably; reused, so it does not allocate.
    user_id: String,
    /// CURVE is on: only then do messages carry a User-Id worth reading
    /// (the lookup is a measurable share of a publish's cost).
    authenticated: bool,
    /// libzmq's `ZMQ_ZBROKER_OUT_BYTES` on the ROUTER as of the last tick.
    libzmq_queued_bytes: u64,
}

fn zmq_call<T>(what: &'static str, result: zmq::Result<T>) -> Result<T, ServerError> {
    result.map_err(|e| ServerError::Zmq(what, e))
}

fn set_common_options(
    socket: &mut zmq::Socket,
    config: &Config,
    security: Option<&Security>,
    domain: &str,
) -> Result<(), ServerError> {
    if let Some(security) = security {
        let secret = zmq::z85_decode(&security.keys.secret)
            .map_err(|_| ServerError::Zmq("decode the secret key", zmq::Error::EINVAL))?;
        zmq_call("set ZMQ_CURVE_SERVER", socket.set_curve_server(true))?;
        zmq_call(
            "set ZMQ_CURVE_SECRETKEY",
            socket.set_curve_secretkey(&secret),
        )?;
        zmq_call("set ZMQ_ZAP_DOMAIN", socket.set_zap_domain(domain))?;
    }
    let heartbeat = config.zmtp_heartbeat.as_millis().min(i32::MAX as u128) as i32;
    zmq_call("set ZMQ_HEARTBEAT_IVL", socket.set_heartbeat_ivl(heartbeat))?;
    // A peer whose input is stalled by backpressure cannot answer ZMTP
    // pings, so a short timeout would disconnect every slow consumer (and
    // turn drop-new into disconnect). Dead peers are dropped after the same
    // time the protocol forgets a silent subscriber.
    let timeout = config
        .sub_timeout
        .max(config.zmtp_heartbeat * 3)
        .as_millis()
        .min(i32::MAX as u128) as i32;
    zmq_call(
        "set ZMQ_HEARTBEAT_TIMEOUT",
        socket.set_heartbeat_timeout(timeout),
    )?;
    zmq_call(
        "set ZMQ_MAXMSGSIZE",
        socket.set_maxmsgsize(config.limits.max_message_size),
    )?;
    zmq_call("set ZMQ_LINGER", socket.set_linger(0))?;
    zmq_call(
        "set ZMQ_ZBROKER_MAXMSGPARTS (needs zbroker's libzmq)",
        set_int_option(socket, ZMQ_ZBROKER_MAXMSGPARTS, MAX_MESSAGE_PARTS),
    )?;
    let max_connections = c_int::try_from(config.limits.max_connections).unwrap_or(c_int::MAX);
    zmq_call(
        "set ZMQ_ZBROKER_MAX_CONNECTIONS",
        set_int_option(socket, ZMQ_ZBROKER_MAX_CONNECTIONS, max_connections),
    )?;
    Ok(())
}

fn bind(socket: &zmq::Socket, role: &'static str, endpoint: &str) -> Result<String, ServerError> {
    socket.bind(endpoint).map_err(|source| ServerError::Bind {
        role,
        endpoint: endpoint.to_string(),
        source,
    })?;
    // For `tcp://host:*` or port 0, this is the port the system picked.
    let bound = zmq_call("read ZMQ_LAST_ENDPOINT", socket.get_last_endpoint())?;
    Ok(bound.unwrap_or_else(|_| endpoint.to_string()))
}

fn register(poll: &Poll, fd: RawFd, token: Token) -> Result<(), ServerError> {
    poll.registry()
        .register(&mut SourceFd(&fd), token, Interest::READABLE)
        .map_err(|e| ServerError::Io("register a socket with the poller", e))
}

fn has_input(socket: &zmq::Socket) -> Result<bool, ServerError> {
    Ok(zmq_call("read ZMQ_EVENTS", socket.get_events())?.contains(zmq::POLLIN))
}

impl Server {
    /// Creates both sockets, sets their options and binds them. The broker
    /// does nothing until [`Server::run`].
    pub fn bind(config: Config) -> Result<Server, ServerError> {
        let security = check(&config)?;
        raise_open_file_limit();
        let context = zmq::Context::new();
        zmq_call(
            "set ZMQ_IO_THREADS",
            context.set_io_threads(config.io_threads),
        )?;
        // Before any socket binds: without a ZAP handler, CURVE admits anyone.
        let zap = match &security {
            Some(s) => {
                Some(ZapHandler::bind(&context, Arc::clone(&s.acl)).map_err(ServerError::Auth)?)
            }
            None => None,
        };
        let mut pull = zmq_call("create the PULL socket", context.socket(zmq::PULL))?;
        set_common_options(
            &mut pull,
            &config,
            security.as_ref(),
            auth::PUBLISHER_DOMAIN,
        )?;
        zmq_call("set ZMQ_RCVHWM", pull.set_rcvhwm(config.pub_hwm))?;
        zmq_call(
            "set ZMQ_ZBROKER_RCVHWM_BYTES",
            set_i64_option(&mut pull, ZMQ_ZBROKER_RCVHWM_BYTES, config.pub_hwm_bytes),
        )?;
        zmq_call(
            "set ZMQ_IN_BATCH_SIZE (needs libzmq's DRAFT API)",
            set_int_option(&mut pull, ZMQ_IN_BATCH_SIZE, config.io_batch),
        )?;
        let pub_endpoint = bind(&pull, "publisher", &config.pub_bind)?;

        let mut router = zmq_call("create the ROUTER socket", context.socket(zmq::ROUTER))?;
        set_common_options(
            &mut router,
            &config,
            security.as_ref(),
            auth::SUBSCRIBER_DOMAIN,
        )?;
        // Without MANDATORY, ROUTER silently drops what it cannot send; with
        // it, a full pipe is EAGAIN (queue and retry) and a vanished peer is
        // EHOSTUNREACH (free it at once).
        zmq_call(
            "set ZMQ_ROUTER_MANDATORY",
            router.set_router_mandatory(true),
        )?;
        zmq_call("set ZMQ_SNDHWM", router.set_sndhwm(config.sub_hwm))?;
        zmq_call("set ZMQ_RCVHWM", router.set_rcvhwm(COMMAND_HWM))?;
        zmq_call(
            "set ZMQ_ZBROKER_SNDHWM_BYTES",
            set_i64_option(&mut router, ZMQ_ZBROKER_SNDHWM_BYTES, config.sub_hwm_bytes),
        )?;
        zmq_call(
            "set ZMQ_ZBROKER_RCVHWM_BYTES",
            set_i64_option(&mut router, ZMQ_ZBROKER_RCVHWM_BYTES, COMMAND_HWM_BYTES),
        )?;
        zmq_call(
            "set ZMQ_OUT_BATCH_SIZE (needs libzmq's DRAFT API)",
            set_int_option(&mut router, ZMQ_OUT_BATCH_SIZE, config.io_batch),
        )?;
        let publisher_watch = Watch::attach(&context, &pull, "publishers")?;
        let subscriber_watch = Watch::attach(&context, &router, "subscribers")?;
        let sub_endpoint = bind(&router, "subscriber", &config.sub_bind)?;

        let poll = Poll::new().map_err(|e| ServerError::Io("create the poller", e))?;
        register(&poll, zmq_call("read ZMQ_FD", pull.get_fd())?, PUBLISHERS)?;
        register(
            &poll,
            zmq_call("read ZMQ_FD", router.get_fd())?,
            SUBSCRIBERS,
        )?;
        register(
            &poll,
            zmq_call("read ZMQ_FD", publisher_watch.monitor.get_fd())?,
            PUBLISHER_MONITOR,
        )?;
        register(
            &poll,
            zmq_call("read ZMQ_FD", subscriber_watch.monitor.get_fd())?,
            SUBSCRIBER_MONITOR,
        )?;
        if let Some(zap) = &zap {
            register(&poll, zmq_call("read ZMQ_FD", zap.socket().get_fd())?, ZAP)?;
        }
        let waker = Waker::new(poll.registry(), WAKER)
            .map_err(|e| ServerError::Io("create the stop waker", e))?;
        let stats = StatsHandle::default();
        let exporter = match &config.metrics_bind {
            Some(address) => {
                let source = stats.clone();
                let exporter = Exporter::start(address, move || source.snapshot())
                    .map_err(|e| ServerError::Io("bind the metrics endpoint", e))?;
                tracing::info!(endpoint = %format!("http://{}/metrics", exporter.address()), "serving metrics");
                Some(exporter)
            }
            None => None,
        };
        let zap_on = zap.is_some();
        let linger = config.linger;
        let mut core = Broker::new(config.broker(), Instant::now());
        match &security {
            Some(s) => {
                tracing::info!(
                    public_key = %s.keys.public,
                    publishers = s.acl.publishers.len(),
                    subscribers = s.acl.subscribers.len(),
                    "CURVE on: only listed keys are admitted"
                );
                core.set_acl(Arc::clone(&s.acl));
            }
            None => tracing::info!("CURVE off: plaintext, loopback-only unless --insecure"),
        }

        tracing::info!(endpoint = %pub_endpoint, "publishers connect a PUSH socket to");
        tracing::info!(endpoint = %sub_endpoint, "subscribers connect a DEALER socket to");
        Ok(Server {
            linger,
            pull,
            router,
            context,
            poll,
            core,
            pub_endpoint,
            sub_endpoint,
            stopper: Stopper {
                requested: Arc::new(AtomicBool::new(false)),
                waker: Arc::new(waker),
            },
            stats,
            zap,
            publisher_watch,
            subscriber_watch,
            _exporter: exporter,
            signals: None,
            publish_frames: Default::default(),
            command_frames: Default::default(),
            overflow_frame: Frame::new(),
            user_id: String::new(),
            authenticated: zap_on,
            libzmq_queued_bytes: 0,
        })
    }

    /// The endpoint publishers connect to, as bound (port resolved).
    pub fn pub_endpoint(&self) -> &str {
        &self.pub_endpoint
    }

    /// The endpoint subscribers connect to, as bound (port resolved).
    pub fn sub_endpoint(&self) -> &str {
        &self.sub_endpoint
    }

    /// The server's ZeroMQ context: `inproc://` endpoints are only reachable
    /// from sockets of the same context (in-process benches and tests).
    pub fn context(&self) -> zmq::Context {
        self.context.clone()
    }

    /// A handle that stops [`Server::run`] from another thread.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// A handle on the broker's counters, readable from any thread.
    pub fn stats(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Makes SIGINT and SIGTERM stop the server like [`Stopper::stop`].
    pub fn stop_on_signals(&mut self) -> Result<(), ServerError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook_mio::v1_0::Signals::new([SIGINT, SIGTERM])
            .map_err(|e| ServerError::Io("install signal handlers", e))?;
        self.poll
            .registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| ServerError::Io("register signal handlers", e))?;
        self.signals = Some(signals);
        Ok(())
    }

    /// Runs the loop until stopped, then flushes queues for up to the
    /// configured linger. Returns the final counters.
    pub fn run(mut self) -> Result<Snapshot, ServerError> {
        let mut events = Events::with_capacity(8);
        let mut next_tick = Instant::now();
        loop {
            let busy = self.read_publishers(Instant::now())? == BATCH;
            // Read after the publish batch, which may have taken a while: a
            // command is stamped with when it arrived, not when the batch
            // began, or a live subscriber could look idle past its expiry.
            let now = Instant::now();
            let busy = self.read_subscribers(now)? == BATCH || busy;
            let backlogged = self.core.flush(&mut RouterTransport::new(&mut self.router));
            if now >= next_tick {
                next_tick = self
                    .core
                    .tick(now, &mut RouterTransport::new(&mut self.router));
                self.watch_connections();
                // Summed over every subscriber pipe: once a tick, not per send.
                self.libzmq_queued_bytes = get_i64_option(&mut self.router, ZMQ_ZBROKER_OUT_BYTES)
                    .map_or(0, |bytes| bytes.max(0) as u64);
                self.stats.publish(self.snapshot());
            }
            if self.stopper.requested.load(Ordering::Acquire) {
                break;
            }
            // Publishers held back by the backpressure policy wait in
            // libzmq's queues; their input must not keep the loop spinning.
            let publishers_ready = !self.core.publishers_paused() && has_input(&self.pull)?;
            let timeout = if busy || publishers_ready || has_input(&self.router)? {
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
            if events
                .iter()
                .any(|e| [ZAP, PUBLISHER_MONITOR, SUBSCRIBER_MONITOR].contains(&e.token()))
            {
                self.watch_connections();
            }
            if events.iter().any(|e| e.token() == SIGNALS) {
                if let Some(signals) = self.signals.as_mut() {
                    for signal in signals.pending() {
                        tracing::info!(signal, "stopping on signal");
                    }
                }
                self.stopper.requested.store(true, Ordering::Release);
            }
        }
        self.shut_down()
    }

    /// Answers ZAP requests and reads the socket monitors. Each drains until
    /// `EAGAIN`, so no `ZMQ_FD` edge is lost (see the module docs).
    fn watch_connections(&mut self) {
        if let Some(zap) = self.zap.as_mut()
            && let Err(e) = zap.answer_pending()
        {
            tracing::error!(error = %e, "the ZAP handler failed");
        }
        self.publisher_watch.drain();
        self.subscriber_watch.drain();
    }

    /// The core's counters plus what the event loop knows of connections.
    fn snapshot(&self) -> Snapshot {
        let mut snapshot = self.core.snapshot();
        snapshot.connections = Connections {
            publishers: self.publisher_watch.open,
            subscribers: self.subscriber_watch.open,
            handshake_failures: self.publisher_watch.handshake_failures
                + self.subscriber_watch.handshake_failures,
            auth_denied: self.zap.as_ref().map_or(0, |z| z.denied),
            publisher_refusals: self.publisher_watch.refusals.clone(),
            subscriber_refusals: self.subscriber_watch.refusals.clone(),
        };
        snapshot.libzmq_queued_bytes = self.libzmq_queued_bytes;
        snapshot
    }

    /// Reads up to [`BATCH`] publisher messages and routes them; returns
    /// how many. Their deliveries are sent after the batch, one run per
    /// subscriber (see [`Broker::route_publish`]).
    fn read_publishers(&mut self, now: Instant) -> Result<usize, ServerError> {
        let mut read = 0;
        while read < BATCH && !self.core.publishers_paused() {
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
                &mut RouterTransport::new(&mut self.router),
            );
        }
        self.core
            .send_routed(&mut RouterTransport::new(&mut self.router));
        Ok(read)
    }

    /// Reads up to [`BATCH`] subscriber messages; returns how many.
    fn read_subscribers(&mut self, now: Instant) -> Result<usize, ServerError> {
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
                &mut RouterTransport::new(&mut self.router),
            );
        }
        Ok(BATCH)
    }

    /// Stops reading publishers and keeps serving subscribers for up to the
    /// linger, then logs the final counters.
    ///
    /// Emptying the broker's queues is not enough: what libzmq has sent may
    /// still sit in kernel buffers on the way to a subscriber that reads
    /// slowly, and libzmq 4.3 discards it on the receiving side if the
    /// connection closes while that subscriber's input is stalled (an ipc
    /// hang-up is treated as an I/O error; on tcp, closing with unread input
    /// sends RST). So the broker keeps the connections open, answering
    /// commands and flushing, until the linger ends or no subscriber
    /// connection is left.
    fn shut_down(mut self) -> Result<Snapshot, ServerError> {
        let deadline = Instant::now() + self.linger;
        // Closing PULL refuses new messages; publishers' PUSH sockets keep
        // theirs queued for the next broker.
        drop(std::mem::replace(
            &mut self.pull,
            zmq_call(
                "create a placeholder socket",
                self.context.socket(zmq::PULL),
            )?,
        ));
        let mut events = Events::with_capacity(8);
        loop {
            let now = Instant::now();
            self.read_subscribers(now)?;
            self.core.flush(&mut RouterTransport::new(&mut self.router));
            self.watch_connections();
            if now >= deadline || self.subscriber_watch.open == 0 {
                break;
            }
            // Reading ZMQ_EVENTS makes libzmq process its command queue,
            // which re-opens pipes that subscribers have drained.
            let wait = if has_input(&self.router)? {
                Duration::ZERO
            } else {
                Duration::from_millis(5).min(deadline - now)
            };
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ServerError::Io("wait for events", e)),
            }
        }
        let snapshot = self.snapshot();
        self.stats.publish(snapshot.clone());
        tracing::info!(
            published = snapshot.counters.published,
            routed = snapshot.counters.routed,
            delivered = snapshot.counters.delivered,
            dropped_queue_full = snapshot.counters.dropped_queue_full,
            dropped_at_exit = snapshot.queued_messages,
            malformed =
                snapshot.counters.malformed_publishes + snapshot.counters.malformed_commands,
            subscribers = snapshot.subscribers,
            "broker stopped"
        );
        Ok(snapshot)
    }
}

/// Raises the soft open-file limit to the hard limit: every subscriber
/// connection is a descriptor, and the default 1024 caps the broker far below
/// the fan-outs it is built for.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit raised"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::get_int_option;

    fn int_option(socket: &mut zmq::Socket, option: c_int) -> c_int {
        get_int_option(socket, option).unwrap_or_else(|e| panic!("zmq_getsockopt({option}): {e}"))
    }

    #[test]
    fn io_batch_is_set_where_messages_flow_and_only_there() {
        let config = Config {
            pub_bind: "tcp://127.0.0.1:*".into(),
            sub_bind: "tcp://127.0.0.1:*".into(),
            io_batch: 24_576,
            ..Config::default()
        };
        let mut server = Server::bind(config).expect("bind the broker");
        assert_eq!(int_option(&mut server.pull, ZMQ_IN_BATCH_SIZE), 24_576);
        assert_eq!(int_option(&mut server.router, ZMQ_OUT_BATCH_SIZE), 24_576);
        // Subscriber commands are small and few: libzmq's default stays.
        assert_eq!(int_option(&mut server.router, ZMQ_IN_BATCH_SIZE), 8192);
    }
}
