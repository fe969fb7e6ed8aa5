//! Rust clients for protocol v1: [`Publisher`] and [`Subscriber`].
//!
//! ```no_run
//! use std::time::Duration;
//! use zbroker::client::{Event, Publisher, Subscriber};
//! use zbroker::filter::Filter;
//!
//! # fn main() -> Result<(), zbroker::client::ClientError> {
//! let mut sub = Subscriber::connect("tcp://127.0.0.1:5571")?;
//! // Returns once the broker confirmed: later publishes will reach us.
//! sub.subscribe(&Filter::parse_cli("pattern:net.*.port", 1024).unwrap())?;
//!
//! let mut publisher = Publisher::connect("tcp://127.0.0.1:5570")?;
//! publisher.publish(b"net.a.port", b"up")?;
//!
//! match sub.recv_timeout(Duration::from_secs(1))? {
//!     Some(Event::Message(m)) => println!("{} #{} gap={}", String::from_utf8_lossy(&m.topic), m.seq, m.gap),
//!     // Re-subscribed after losing the broker: re-read state, updates may be missed.
//!     Some(Event::Resync(why)) => println!("resync: {why}"),
//!     None => println!("nothing within a second"),
//! }
//! # Ok(())
//! # }
//! ```
//!
//! With a cluster of brokers (any of which a client may use), give each
//! client the list: it uses one broker at a time and moves on to the next
//! when that one fails.
//!
//! ```no_run
//! # use zbroker::client::{Publisher, Subscriber};
//! # fn main() -> Result<(), zbroker::client::ClientError> {
//! let sub = Subscriber::connect_any(&["tcp://broker-a:5571", "tcp://broker-b:5571"])?;
//! let publisher = Publisher::connect_any(&["tcp://broker-a:5570", "tcp://broker-b:5570"])?;
//! println!("on {} and {}", sub.endpoint(), publisher.endpoint());
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::filter::Filter;
use crate::protocol::{self, ErrorCode, Reply};

/// Why a client call failed.
#[derive(Debug)]
pub enum ClientError {
    /// libzmq refused a call (bad endpoint, context terminated, …).
    Zmq(zmq::Error),
    /// The broker refused the command with `[ERR, code, text]`.
    Refused {
        /// The code, if it is one protocol v1 defines.
        code: Option<ErrorCode>,
        /// The broker's explanation.
        text: String,
    },
    /// The operation did not complete in time (broker down or overloaded).
    Timeout(&'static str),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Zmq(e) => write!(f, "zeromq: {e}"),
            ClientError::Refused { code, text } => match code {
                Some(code) => write!(f, "broker refused ({code}): {text}"),
                None => write!(f, "broker refused: {text}"),
            },
            ClientError::Timeout(what) => {
                write!(
                    f,
                    "timed out {what}; is the broker running at that endpoint?"
                )
            }
        }
    }
}

impl std::error::Error for ClientError {}

impl From<zmq::Error> for ClientError {
    fn from(e: zmq::Error) -> Self {
        ClientError::Zmq(e)
    }
}

fn millis(d: Duration) -> i32 {
    d.as_millis().min(i32::MAX as u128) as i32
}

/// A client's CURVE credentials: its own key pair and the broker's public
/// key, all Z85.
#[derive(Clone)]
pub struct CurveKeys {
    /// The broker's public key (`zbroker keygen`'s `.pub` file).
    pub server_public: String,
    /// This client's public key; must be listed in the broker's key file.
    pub public: String,
    /// This client's secret key.
    pub secret: String,
}

impl std::fmt::Debug for CurveKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurveKeys")
            .field("server_public", &self.server_public)
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl CurveKeys {
    /// Reads the broker's public key file and this client's secret key file
    /// (both as written by `zbroker keygen`).
    pub fn from_files(
        server_public: &std::path::Path,
        own_secret: &std::path::Path,
    ) -> Result<CurveKeys, crate::auth::AuthError> {
        let own = crate::auth::read_secret_key(own_secret)?;
        Ok(CurveKeys {
            server_public: crate::auth::read_public_key(server_public)?,
            public: own.public,
            secret: own.secret,
        })
    }

    fn apply(&self, socket: &zmq::Socket) -> Result<(), ClientError> {
        let decode =
            |key: &str| zmq::z85_decode(key).map_err(|_| ClientError::Zmq(zmq::Error::EINVAL));
        socket.set_curve_serverkey(&decode(&self.server_public)?)?;
        socket.set_curve_publickey(&decode(&self.public)?)?;
        socket.set_curve_secretkey(&decode(&self.secret)?)?;
        Ok(())
    }
}

/// Milliseconds for libzmq's `poll`, rounded up so that a wait never ends
/// just before its deadline (and spins until it passes).
fn poll_millis(d: Duration) -> i64 {
    let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    ms.min(i64::MAX as u128) as i64
}

/// `endpoints` as owned strings; `EINVAL` for an empty list.
fn endpoint_list<S: AsRef<str>>(endpoints: &[S]) -> Result<Vec<String>, ClientError> {
    if endpoints.is_empty() {
        return Err(ClientError::Zmq(zmq::Error::EINVAL));
    }
    Ok(endpoints.iter().map(|e| e.as_ref().to_string()).collect())
}

/// Opens a connection to the first of `endpoints`, from `start` round the
/// list, that libzmq accepts (it refuses an endpoint it cannot parse or
/// resolve), so that one bad entry cannot stop a client that has good ones.
/// Returns its index; the first error if none opens.
fn open_first<T>(
    endpoints: &[String],
    start: usize,
    mut open: impl FnMut(&str) -> Result<T, ClientError>,
) -> Result<(usize, T), ClientError> {
    let mut first_error = None;
    for step in 0..endpoints.len() {
        let index = (start + step) % endpoints.len();
        match open(&endpoints[index]) {
            Ok(opened) => return Ok((index, opened)),
            Err(error) => {
                tracing::warn!(endpoint = %endpoints[index], %error, "cannot connect to this endpoint");
                first_error.get_or_insert(error);
            }
        }
    }
    Err(first_error.unwrap_or(ClientError::Zmq(zmq::Error::EINVAL)))
}

static MONITOR_IDS: AtomicUsize = AtomicUsize::new(0);

const HANDSHAKE_SUCCEEDED: u16 = zmq::SocketEvent::HANDSHAKE_SUCCEEDED as u16;
const DISCONNECTED: u16 = zmq::SocketEvent::DISCONNECTED as u16;

/// Starts monitoring `socket` for completed handshakes and disconnects;
/// returns the socket the events arrive on. Call before connecting.
fn monitored(context: &zmq::Context, socket: &zmq::Socket) -> Result<zmq::Socket, ClientError> {
    let address = format!(
        "inproc://zbroker-client-monitor-{}",
        MONITOR_IDS.fetch_add(1, Ordering::Relaxed)
    );
    socket.monitor(
        &address,
        (zmq::SocketEvent::DISCONNECTED as i32) | (zmq::SocketEvent::HANDSHAKE_SUCCEEDED as i32),
    )?;
    let monitor = context.socket(zmq::PAIR)?;
    monitor.set_linger(0)?;
    monitor.connect(&address)?;
    Ok(monitor)
}

/// Every monitor event waiting, without blocking.
fn read_events(monitor: &zmq::Socket) -> Result<Vec<u16>, ClientError> {
    let mut events = Vec::new();
    loop {
        match monitor.recv_multipart(zmq::DONTWAIT) {
            Ok(frames) => events.extend(crate::frame::monitor_event(&frames)),
            Err(zmq::Error::EAGAIN) => return Ok(events),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Settings of a [`Publisher`].
#[derive(Clone, Debug)]
pub struct PublisherOptions {
    /// How long `publish` may wait for room in libzmq's queue (up to `hwm`
    /// messages) or, with several endpoints, for a connection; then it fails
    /// with [`ClientError::Timeout`] and the message was not sent. `None`
    /// waits without limit.
    pub send_timeout: Option<Duration>,
    /// How long dropping the publisher waits to hand queued messages to the
    /// broker before discarding them.
    pub linger: Duration,
    /// Messages libzmq queues for the broker before `publish` blocks.
    pub hwm: i32,
    /// With several endpoints: how long the publisher tries one without a
    /// connection (from when it opened it, or from when its connection
    /// broke) before it moves on to the next. Must not be zero. Unused with
    /// one endpoint.
    pub connect_timeout: Duration,
    /// CURVE credentials, for a broker that requires them.
    pub curve: Option<CurveKeys>,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            send_timeout: Some(Duration::from_secs(5)),
            linger: Duration::from_secs(5),
            hwm: 1000,
            connect_timeout: Duration::from_secs(2),
            curve: None,
        }
    }
}

/// Publishes messages to a broker's publisher endpoint over PUSH.
///
/// With one endpoint, `publish` returning `Ok` means libzmq has queued the
/// message for the broker; it reaches the broker unless this process exits
/// (or drops the publisher and `linger` passes) before the broker can take
/// it. While the broker is down, messages are queued (up to `hwm`) and
/// delivered once it is back.
///
/// With several endpoints (brokers of one cluster), the publisher sends
/// through **one broker at a time**: a PUSH socket connected to several
/// would deal messages round-robin among them, so one publisher's messages
/// would take different paths through the cluster and could arrive out of
/// order. It
/// moves on to the next endpoint (round robin) when the current one fails:
/// when it has had no connection for `connect_timeout` (never made one, or
/// lost it and libzmq did not reconnect within that grace), or when a
/// `publish` times out while connected (the broker is up but not taking
/// messages; a broker applying `--overflow backpressure`
/// counts as failed once it has held `publish` up for `send_timeout`). A
/// message is then only queued on a live connection (`ZMQ_IMMEDIATE`), so
/// `publish` waits up to `send_timeout` while there is none. Moving on
/// closes the old socket at once: what libzmq had queued for the old broker
/// (up to `hwm` messages, plus what sits in the kernel's buffers) is lost,
/// rather than delivered late and out of order, and so is whatever a dead
/// broker had taken but not yet delivered. `Ok` from `publish` is therefore
/// no promise of delivery across a failover; the messages published after
/// the move reach the new broker in order.
///
/// Single-threaded: the failover happens inside `publish`.
pub struct Publisher {
    endpoints: Vec<String>,
    /// The endpoint in use.
    index: usize,
    options: PublisherOptions,
    // Sockets before the context: they must close first.
    socket: zmq::Socket,
    monitor: zmq::Socket,
    context: zmq::Context,
    /// The current socket completed a handshake and has not lost it.
    connected: bool,
    /// When the current socket was opened or last lost its connection.
    since: Instant,
}

impl Publisher {
    /// Connects with default options. The broker need not be up yet.
    pub fn connect(endpoint: &str) -> Result<Publisher, ClientError> {
        Publisher::connect_with(endpoint, &PublisherOptions::default())
    }

    /// Connects with `options`.
    pub fn connect_with(
        endpoint: &str,
        options: &PublisherOptions,
    ) -> Result<Publisher, ClientError> {
        Publisher::connect_any_with(&[endpoint], options)
    }

    /// Connects to the first of `endpoints` (a cluster's brokers), with
    /// default options, failing over to the others as described on
    /// [`Publisher`]. No broker need be up yet. `EINVAL` for an empty list.
    pub fn connect_any<S: AsRef<str>>(endpoints: &[S]) -> Result<Publisher, ClientError> {
        Publisher::connect_any_with(endpoints, &PublisherOptions::default())
    }

    /// Like [`Publisher::connect_any`], with `options`.
    pub fn connect_any_with<S: AsRef<str>>(
        endpoints: &[S],
        options: &PublisherOptions,
    ) -> Result<Publisher, ClientError> {
        let endpoints = endpoint_list(endpoints)?;
        if endpoints.len() > 1 && options.connect_timeout.is_zero() {
            return Err(ClientError::Zmq(zmq::Error::EINVAL));
        }
        let context = zmq::Context::new();
        let several = endpoints.len() > 1;
        let (index, (socket, monitor)) = open_first(&endpoints, 0, |endpoint| {
            open_push(&context, endpoint, options, several)
        })?;
        Ok(Publisher {
            endpoints,
            index,
            options: options.clone(),
            socket,
            monitor,
            context,
            connected: false,
            since: Instant::now(),
        })
    }

    /// The endpoint this publisher sends through now.
    pub fn endpoint(&self) -> &str {
        &self.endpoints[self.index]
    }

    /// Queues `[topic, payload]` for the broker, waiting up to the send
    /// timeout while the queue is full (or, with several endpoints, while
    /// there is no connection). On [`ClientError::Timeout`] the message was
    /// not sent.
    pub fn publish(&mut self, topic: &[u8], payload: &[u8]) -> Result<(), ClientError> {
        let started = Instant::now();
        let deadline = self.options.send_timeout.map(|t| started + t);
        loop {
            self.maintain()?;
            match self.socket.send(topic, zmq::SNDMORE | zmq::DONTWAIT) {
                // The two parts travel atomically: once the first is
                // accepted, the second cannot be refused.
                Ok(()) => return Ok(self.socket.send(payload, 0)?),
                Err(zmq::Error::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                if self.connected && self.endpoints.len() > 1 {
                    // Connected, yet not taking messages: the broker is
                    // stuck or overloaded, and another can serve us.
                    tracing::debug!(endpoint = %self.endpoint(), "the broker takes no messages");
                    self.fail_over()?;
                }
                return Err(ClientError::Timeout("publishing"));
            }
            let mut wake = deadline.unwrap_or(now + Duration::from_secs(3600));
            if !self.connected && self.endpoints.len() > 1 {
                wake = wake.min(self.since + self.options.connect_timeout);
            }
            let mut items = [
                self.socket.as_poll_item(zmq::POLLOUT),
                self.monitor.as_poll_item(zmq::POLLIN),
            ];
            zmq::poll(&mut items, poll_millis(wake.saturating_duration_since(now)))?;
        }
    }

    /// Reads the monitor, and moves to the next endpoint when this one has
    /// had no connection for `connect_timeout`.
    fn maintain(&mut self) -> Result<(), ClientError> {
        for event in read_events(&self.monitor)? {
            if event == HANDSHAKE_SUCCEEDED {
                self.connected = true;
            } else if event == DISCONNECTED {
                if self.connected {
                    self.since = Instant::now();
                }
                self.connected = false;
            }
        }
        if !self.connected
            && self.endpoints.len() > 1
            && self.since.elapsed() >= self.options.connect_timeout
        {
            tracing::debug!(endpoint = %self.endpoint(), "no connection to the broker");
            self.fail_over()?;
        }
        Ok(())
    }

    /// Replaces the socket with one connected to the next endpoint.
    fn fail_over(&mut self) -> Result<(), ClientError> {
        let next = (self.index + 1) % self.endpoints.len();
        let several = self.endpoints.len() > 1;
        let (index, (socket, monitor)) = open_first(&self.endpoints, next, |endpoint| {
            open_push(&self.context, endpoint, &self.options, several)
        })?;
        tracing::info!(from = %self.endpoint(), to = %self.endpoints[index], "publisher fails over");
        // What is queued for the broker given up on is discarded rather
        // than delivered late, behind messages sent through the next one.
        self.socket.set_linger(0)?;
        self.socket = socket;
        self.monitor = monitor;
        self.index = index;
        self.connected = false;
        self.since = Instant::now();
        Ok(())
    }
}

fn open_push(
    context: &zmq::Context,
    endpoint: &str,
    options: &PublisherOptions,
    several: bool,
) -> Result<(zmq::Socket, zmq::Socket), ClientError> {
    let socket = context.socket(zmq::PUSH)?;
    socket.set_sndhwm(options.hwm)?;
    socket.set_linger(millis(options.linger))?;
    socket.set_heartbeat_ivl(1000)?;
    socket.set_heartbeat_timeout(3000)?;
    if several {
        // Queue only on a live connection, so that failing over strands
        // nothing in the queue of an endpoint that is gone.
        socket.set_immediate(true)?;
    }
    if let Some(curve) = &options.curve {
        curve.apply(&socket)?;
    }
    let monitor = monitored(context, &socket)?;
    socket.connect(endpoint)?;
    Ok((socket, monitor))
}

/// Settings of a [`Subscriber`].
#[derive(Clone, Debug)]
pub struct SubscriberOptions {
    /// How often the subscriber sends `PING` (must be well under the
    /// broker's `--sub-timeout`).
    pub heartbeat: Duration,
    /// Silence from the broker for this long (no PONG, no message) means it
    /// is gone: the subscriber connects to the next endpoint (the same one
    /// if it has only one) and re-subscribes.
    pub broker_timeout: Duration,
    /// The broker's `--sub-timeout`. If this client could not ping for this
    /// long (its thread did not call `recv`), the broker may have forgotten
    /// it, so it re-subscribes.
    pub broker_sub_timeout: Duration,
    /// How long `subscribe`/`unsubscribe` wait for the broker's answer
    /// (including, while there is none, for a connection).
    pub confirm_timeout: Duration,
    /// With several endpoints: how long the subscriber tries one without
    /// completing a handshake (from when it opened it, or from when its
    /// connection broke) before it moves on to the next. Must not be zero.
    /// Unused with one endpoint, which it keeps trying.
    pub connect_timeout: Duration,
    /// Messages libzmq buffers from the broker before the broker queues.
    pub hwm: i32,
    /// CURVE credentials, for a broker that requires them.
    pub curve: Option<CurveKeys>,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        SubscriberOptions {
            heartbeat: Duration::from_secs(2),
            broker_timeout: Duration::from_secs(7),
            broker_sub_timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            hwm: 1000,
            curve: None,
        }
    }
}

/// A message routed to this subscriber.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The topic it was published on.
    pub topic: Vec<u8>,
    /// The payload.
    pub payload: Vec<u8>,
    /// The broker's sequence number for this subscriber; restarts at 1 on
    /// every new connection (so after each [`Event::Resync`]).
    pub seq: u64,
    /// Messages routed to this subscriber were lost just before this one
    /// (the broker dropped them, e.g. because this client read too slowly).
    pub gap: bool,
}

/// Why the subscriber re-subscribed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// The connection to the broker broke and a new one was made to the
    /// same endpoint.
    Reconnected,
    /// The broker went silent; the subscriber opened a new connection (to
    /// the same endpoint: with several, a silent broker ends in
    /// [`ResyncReason::FailedOver`]).
    BrokerSilent,
    /// This client did not ping for longer than the broker's timeout.
    Stalled,
    /// The broker said it dropped this subscriber's state.
    BrokerForgot(String),
    /// The filters were lost at `from` (the connection broke, the broker
    /// went silent, …) and are now held by the broker at `to`, another of
    /// the subscriber's endpoints.
    FailedOver {
        /// The endpoint whose broker lost the filters.
        from: String,
        /// The endpoint the subscriber is on now.
        to: String,
    },
}

impl fmt::Display for ResyncReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResyncReason::Reconnected => f.write_str("reconnected to the broker"),
            ResyncReason::BrokerSilent => f.write_str("the broker went silent"),
            ResyncReason::Stalled => f.write_str("this client stopped pinging for too long"),
            ResyncReason::BrokerForgot(text) => write!(f, "the broker dropped our state: {text}"),
            ResyncReason::FailedOver { from, to } => write!(f, "failed over from {from} to {to}"),
        }
    }
}

/// What [`Subscriber::recv`] yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A matching message.
    Message(Message),
    /// All filters are subscribed again after the broker lost them:
    /// messages may have been missed, so re-read any state built from them.
    /// Every message published after this event matches as before; every
    /// message received after it came through the new connection.
    Resync(ResyncReason),
}

/// Text prefixes of the broker's unsolicited `[ERR, limit, …]` notices.
const NOTICE_PREFIXES: [&[u8]; 2] = [b"expired:", b"cut-off:"];

/// Start of the broker's `[ERR, unauthorized, "revoked: KIND:FILTER …"]`
/// notice: reloaded key lists took a filter back.
const REVOKED_PREFIX: &[u8] = b"revoked: ";

/// The filter a revocation notice names (written `kind:text`, up to " is no
/// longer allowed"), if it reads as one.
fn revoked_filter(text: &[u8]) -> Option<Filter> {
    let rest = text.strip_prefix(REVOKED_PREFIX)?;
    const END: &[u8] = b" is no longer allowed";
    let end = rest.windows(END.len()).rposition(|w| w == END)?;
    let spec = std::str::from_utf8(&rest[..end]).ok()?;
    Filter::parse_cli(spec, usize::MAX).ok()
}

/// Far enough to stand for "no deadline".
const ONE_YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// Reads per wakeup, so pings and timers keep running under a flood.
const READ_BATCH: usize = 256;

/// A command for the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Command {
    Subscribe(Filter),
    Unsubscribe(Filter),
    Ping,
}

/// A command sent on the current connection (or, for the user's, waiting
/// for one) and not yet answered.
#[derive(Debug)]
struct InFlight {
    command: Command,
    /// The user's call waiting for the answer (`Subscriber::command`).
    call: Option<u64>,
    /// Sent by a resync rather than by the user.
    resync: bool,
    /// Nobody waits any more (the call timed out, or the resync was sent
    /// again), but the answer still comes, in order, and must be consumed.
    abandoned: bool,
}

impl InFlight {
    fn new(command: Command) -> InFlight {
        InFlight {
            command,
            call: None,
            resync: false,
            abandoned: false,
        }
    }
}

/// A resync needed or under way.
struct PendingResync {
    reason: ResyncReason,
    /// The endpoint (index) whose broker lost the filters.
    from: usize,
}

/// Receives messages from a broker's subscriber endpoint over DEALER.
///
/// Connected to one broker at a time. With several endpoints (brokers of
/// one cluster), it moves on to the next (round robin) when it cannot
/// complete a handshake within `connect_timeout`, whether at the start or
/// after its connection broke (it first tries the same broker again: a
/// restart takes a moment), or when the broker goes silent for
/// `broker_timeout`. Whenever the broker's copy of its filters is lost
/// (broker restarted, silent or gone, this client stalled, the broker said
/// so), it subscribes every filter again, on a fresh connection unless the
/// broker said so on a live one, and then reports [`Event::Resync`]: first
/// come the messages the old connection had delivered, then the resync,
/// then the new connection's. [`Subscriber::endpoint`] says which broker it
/// is on.
///
/// Single-threaded: it pings, watches the connection and re-subscribes from
/// inside `recv`/`recv_timeout`/`subscribe`, so call `recv_timeout` at least
/// every `heartbeat` (if it cannot, it re-subscribes and says so with
/// [`Event::Resync`]).
pub struct Subscriber {
    endpoints: Vec<String>,
    /// The endpoint in use.
    index: usize,
    options: SubscriberOptions,
    // Sockets before the context: they must close first.
    socket: zmq::Socket,
    monitor: zmq::Socket,
    context: zmq::Context,
    filters: BTreeSet<Filter>,
    /// Commands sent on the current connection, in order: the broker answers
    /// in that order, and an `ERR` names no command.
    in_flight: VecDeque<InFlight>,
    /// The user's commands waiting for a connection to be sent on.
    unsent: Vec<InFlight>,
    next_call: u64,
    /// Answers to the user's commands, until `command` collects them.
    answers: Vec<(u64, Result<(), ClientError>)>,
    inbox: VecDeque<Event>,
    /// Messages from a new connection, held until its resync is reported.
    held: Vec<Message>,
    /// Last seq received; 0 after (re)connecting.
    last_seq: u64,
    last_ping: Instant,
    last_heard: Instant,
    /// The last `maintain`: a long pause since means this thread stalled.
    last_tick: Instant,
    opened_at: Instant,
    /// A resync is needed or under way; reported when the broker confirmed
    /// every filter again.
    resync: Option<PendingResync>,
    resync_sent: Option<Instant>,
    /// Not every resync SUB fitted in the send queue.
    resync_partial: bool,
    /// The current socket completed a handshake with a broker.
    connected: bool,
}

impl Subscriber {
    /// Connects with default options. The broker need not be up yet.
    pub fn connect(endpoint: &str) -> Result<Subscriber, ClientError> {
        Subscriber::connect_with(endpoint, SubscriberOptions::default())
    }

    /// Connects with `options`.
    pub fn connect_with(
        endpoint: &str,
        options: SubscriberOptions,
    ) -> Result<Subscriber, ClientError> {
        Subscriber::connect_any_with(&[endpoint], options)
    }

    /// Connects to the first of `endpoints` (a cluster's brokers), with
    /// default options, failing over to the others as described on
    /// [`Subscriber`]. No broker need be up yet. `EINVAL` for an empty list.
    pub fn connect_any<S: AsRef<str>>(endpoints: &[S]) -> Result<Subscriber, ClientError> {
        Subscriber::connect_any_with(endpoints, SubscriberOptions::default())
    }

    /// Like [`Subscriber::connect_any`], with `options`.
    pub fn connect_any_with<S: AsRef<str>>(
        endpoints: &[S],
        options: SubscriberOptions,
    ) -> Result<Subscriber, ClientError> {
        let endpoints = endpoint_list(endpoints)?;
        if endpoints.len() > 1 && options.connect_timeout.is_zero() {
            return Err(ClientError::Zmq(zmq::Error::EINVAL));
        }
        let context = zmq::Context::new();
        let (index, (socket, monitor)) = open_first(&endpoints, 0, |endpoint| {
            open_dealer(&context, endpoint, &options)
        })?;
        let now = Instant::now();
        Ok(Subscriber {
            endpoints,
            index,
            options,
            socket,
            monitor,
            context,
            filters: BTreeSet::new(),
            in_flight: VecDeque::new(),
            unsent: Vec::new(),
            next_call: 0,
            answers: Vec::new(),
            inbox: VecDeque::new(),
            held: Vec::new(),
            last_seq: 0,
            last_ping: now,
            last_heard: now,
            last_tick: now,
            opened_at: now,
            resync: None,
            resync_sent: None,
            resync_partial: false,
            connected: false,
        })
    }

    /// The endpoint this subscriber is on (connected or trying to be).
    pub fn endpoint(&self) -> &str {
        &self.endpoints[self.index]
    }

    /// The filters this subscriber holds (and re-subscribes after a resync).
    pub fn filters(&self) -> impl Iterator<Item = &Filter> {
        self.filters.iter()
    }

    /// Subscribes to `filter`; returns once the broker confirmed, so every
    /// message published after this returns and matching `filter` reaches
    /// this subscriber. [`ClientError::Timeout`] if no answer came within
    /// `confirm_timeout` (the filter may then be in effect or not).
    pub fn subscribe(&mut self, filter: &Filter) -> Result<(), ClientError> {
        self.command(Command::Subscribe(filter.clone()))
    }

    /// Unsubscribes from `filter`; returns once the broker confirmed.
    pub fn unsubscribe(&mut self, filter: &Filter) -> Result<(), ClientError> {
        self.command(Command::Unsubscribe(filter.clone()))
    }

    /// Waits for the next event without limit.
    pub fn recv(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(event) = self.recv_timeout(Duration::from_secs(3600))? {
                return Ok(event);
            }
        }
    }

    /// Waits up to `timeout` for the next event; `Ok(None)` if none came.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        let now = Instant::now();
        let deadline = now.checked_add(timeout).unwrap_or(now + ONE_YEAR);
        let mut waited = false;
        loop {
            self.maintain()?;
            if let Some(event) = self.inbox.pop_front() {
                return Ok(Some(event));
            }
            let now = Instant::now();
            // At least one wait, even with a zero timeout: what already
            // arrived counts.
            if waited && now >= deadline {
                return Ok(None);
            }
            self.wait(deadline.min(self.next_duty(now)), false)?;
            waited = true;
        }
    }

    /// Sends `command` (once connected) and waits for the broker's answer.
    fn command(&mut self, command: Command) -> Result<(), ClientError> {
        let call = self.next_call;
        self.next_call += 1;
        let result = self.await_answer(command, call);
        // Whatever happened, nobody waits for this call any more.
        self.abandon(call);
        result
    }

    fn await_answer(&mut self, command: Command, call: u64) -> Result<(), ClientError> {
        self.maintain()?;
        let entry = InFlight {
            call: Some(call),
            ..InFlight::new(command)
        };
        if self.connected {
            if self.send(entry)?.is_some() {
                return Err(ClientError::Timeout(
                    "sending a command: the broker is not reading them",
                ));
            }
        } else {
            self.unsent.push(entry);
        }
        let deadline = Instant::now() + self.options.confirm_timeout;
        loop {
            if let Some(i) = self.answers.iter().position(|(c, _)| *c == call) {
                return self.answers.swap_remove(i).1;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout(if self.connected {
                    "waiting for the broker to confirm"
                } else {
                    "waiting for a connection to the broker"
                }));
            }
            self.wait(deadline.min(self.next_duty(now)), true)?;
            self.maintain()?;
        }
    }

    /// Forgets the user's `call`: its answer, if it still comes, only
    /// updates the filters held.
    fn abandon(&mut self, call: u64) {
        self.unsent.retain(|e| e.call != Some(call));
        self.answers.retain(|(c, _)| *c != call);
        for entry in &mut self.in_flight {
            if entry.call == Some(call) {
                entry.call = None;
                entry.abandoned = true;
            }
        }
    }

    /// Sends `entry` without blocking; gives it back if it did not fit (the
    /// broker is not reading: the silence check will reconnect).
    fn send(&mut self, entry: InFlight) -> Result<Option<InFlight>, ClientError> {
        let sent = match &entry.command {
            Command::Subscribe(f) => self.socket.send_multipart(
                [protocol::SUB, f.kind().as_bytes(), f.text()],
                zmq::DONTWAIT,
            ),
            Command::Unsubscribe(f) => self.socket.send_multipart(
                [protocol::UNSUB, f.kind().as_bytes(), f.text()],
                zmq::DONTWAIT,
            ),
            Command::Ping => self.socket.send(protocol::PING, zmq::DONTWAIT),
        };
        match sent {
            Ok(()) => {
                self.in_flight.push_back(entry);
                Ok(None)
            }
            Err(zmq::Error::EAGAIN) => Ok(Some(entry)),
            Err(e) => Err(e.into()),
        }
    }

    /// Subscribes every filter again on the current connection.
    fn send_resync(&mut self, now: Instant) -> Result<(), ClientError> {
        for entry in self.in_flight.iter_mut().filter(|e| e.resync) {
            entry.abandoned = true;
        }
        self.resync_partial = false;
        let filters: Vec<Filter> = self.filters.iter().cloned().collect();
        for filter in filters {
            let entry = InFlight {
                resync: true,
                ..InFlight::new(Command::Subscribe(filter))
            };
            if self.send(entry)?.is_some() {
                // Sent again after confirm_timeout, unless the silence
                // check reconnects first.
                self.resync_partial = true;
                break;
            }
        }
        self.resync_sent = Some(now);
        Ok(())
    }

    /// Records the broker's answer to one of the user's commands (or to one
    /// given up on, which took effect all the same).
    fn settle(&mut self, entry: InFlight, result: Result<(), ClientError>) {
        let took_effect = match &result {
            Ok(()) => true,
            Err(ClientError::Refused {
                code: Some(ErrorCode::NotSubscribed),
                ..
            }) => matches!(entry.command, Command::Unsubscribe(_)),
            Err(_) => false,
        };
        if took_effect {
            match &entry.command {
                Command::Subscribe(f) => {
                    self.filters.insert(f.clone());
                }
                Command::Unsubscribe(f) => {
                    self.filters.remove(f);
                }
                Command::Ping => {}
            }
        }
        if let Some(call) = entry.call {
            self.answers.push((call, result));
        }
    }

    /// The next time `maintain` has something to do.
    fn next_duty(&self, now: Instant) -> Instant {
        if !self.connected {
            // The monitor wakes the wait as soon as the handshake is done.
            let mut next = now + self.options.heartbeat;
            if self.endpoints.len() > 1 {
                next = next.min(self.opened_at + self.options.connect_timeout);
            }
            return next.max(now);
        }
        let mut next = (self.last_ping + self.options.heartbeat)
            .min(self.last_heard + self.options.broker_timeout);
        if let Some(sent) = self.resync_sent {
            next = next.min(sent + self.options.confirm_timeout);
        } else if self.resync.is_some() {
            next = now;
        }
        next
    }

    /// Something lost the broker's copy of our filters.
    fn request_resync(&mut self, reason: ResyncReason) {
        self.last_seq = 0;
        self.resync_sent = None;
        for entry in self.in_flight.iter_mut().filter(|e| e.resync) {
            entry.abandoned = true;
        }
        if self.resync.is_none() {
            tracing::debug!(%reason, endpoint = %self.endpoint(), "resync needed");
            self.resync = Some(PendingResync {
                reason,
                from: self.index,
            });
        }
    }

    /// The connection's state is lost: keeps what it already received, and
    /// opens a fresh one to `endpoints[index]`.
    fn recover(&mut self, reason: ResyncReason, index: usize) -> Result<(), ClientError> {
        self.drain()?;
        self.request_resync(reason);
        self.reopen(index)
    }

    fn next_index(&self) -> usize {
        (self.index + 1) % self.endpoints.len()
    }

    /// Reads the monitor, pings, notices a stalled client, a lost
    /// connection or a silent broker, fails over, and drives a resync to
    /// completion.
    fn maintain(&mut self) -> Result<(), ClientError> {
        let now = Instant::now();
        let since_tick = now.saturating_duration_since(self.last_tick);
        self.last_tick = now;
        // Anything heard on this socket proves its handshake, even before
        // the monitor's event for it has been read.
        let handshaken = self.connected || self.last_heard > self.opened_at;
        let stall_limit = self
            .options
            .broker_sub_timeout
            .saturating_sub(self.options.heartbeat);
        if handshaken && !self.filters.is_empty() && since_tick >= stall_limit {
            // The broker may have forgotten us, or closed the connection:
            // never write on a connection that may be dead while its input
            // is stalled (see `open_dealer`), start afresh.
            self.recover(ResyncReason::Stalled, self.index)?;
        } else if since_tick >= self.options.heartbeat * 2 {
            // This thread was not listening, so the broker's silence over
            // that time means nothing.
            self.last_heard = now;
        }

        for event in read_events(&self.monitor)? {
            if event == HANDSHAKE_SUCCEEDED {
                self.on_connected()?;
            } else if event == DISCONNECTED && self.connected {
                // The broker restarted or the connection broke. libzmq would
                // reconnect this socket by itself, and a restarted broker
                // would answer PINGs while holding none of our filters: open
                // a fresh connection (the same endpoint first) and subscribe
                // again. Messages already received on this one come first.
                self.recover(ResyncReason::Reconnected, self.index)?;
                // The rest were the old socket's; the new one's come later.
                break;
            }
        }

        let now = Instant::now();
        if !self.connected {
            if self.endpoints.len() > 1
                && now.saturating_duration_since(self.opened_at) >= self.options.connect_timeout
            {
                tracing::debug!(endpoint = %self.endpoint(), "no connection; trying the next endpoint");
                self.reopen(self.next_index())?;
            }
            return Ok(());
        }

        if now.saturating_duration_since(self.last_ping) >= self.options.heartbeat {
            // A full pipe means the broker is not reading; the silence check
            // below handles that, so a PING that does not fit is no error.
            self.send(InFlight::new(Command::Ping))?;
            self.last_ping = now;
        }

        if now.saturating_duration_since(self.last_heard) >= self.options.broker_timeout {
            tracing::debug!(endpoint = %self.endpoint(), "the broker went silent");
            let next = self.next_index();
            return self.recover(ResyncReason::BrokerSilent, next);
        }

        if self.resync.is_none() {
            return Ok(());
        }
        let due = self
            .resync_sent
            .is_none_or(|sent| now.saturating_duration_since(sent) >= self.options.confirm_timeout);
        if due {
            self.send_resync(now)?;
        }
        if !self.resync_partial && !self.in_flight.iter().any(|e| e.resync && !e.abandoned) {
            if let Some(pending) = self.resync.take() {
                let reason = self.reported(pending);
                tracing::debug!(%reason, "resynced");
                self.inbox.push_back(Event::Resync(reason));
            }
            self.inbox.extend(self.held.drain(..).map(Event::Message));
            self.resync_sent = None;
        }
        Ok(())
    }

    /// The reason to report for a finished resync.
    fn reported(&self, pending: PendingResync) -> ResyncReason {
        let (from, to) = (&self.endpoints[pending.from], self.endpoint());
        if from == to {
            pending.reason
        } else {
            ResyncReason::FailedOver {
                from: from.clone(),
                to: to.to_string(),
            }
        }
    }

    /// The current socket completed its handshake: sends the resync, then
    /// the user's waiting commands.
    fn on_connected(&mut self) -> Result<(), ClientError> {
        if self.connected {
            return Ok(());
        }
        self.connected = true;
        let now = Instant::now();
        self.last_heard = now;
        self.last_ping = now;
        tracing::debug!(endpoint = %self.endpoint(), "connected");
        if self.resync.is_some() && self.resync_sent.is_none() {
            self.send_resync(now)?;
        }
        for entry in std::mem::take(&mut self.unsent) {
            if let Some(entry) = self.send(entry)? {
                let refused = Err(ClientError::Timeout(
                    "sending a command: the broker is not reading them",
                ));
                self.settle(entry, refused);
            }
        }
        Ok(())
    }

    /// Replaces the connection with a fresh one to `endpoints[index]` (or
    /// the next that libzmq accepts): a new subscriber at the broker,
    /// holding no filters. The user's unanswered commands are sent again on
    /// it once it is up.
    fn reopen(&mut self, index: usize) -> Result<(), ClientError> {
        let (index, (socket, monitor)) = open_first(&self.endpoints, index, |endpoint| {
            open_dealer(&self.context, endpoint, &self.options)
        })?;
        if index != self.index {
            tracing::info!(from = %self.endpoint(), to = %self.endpoints[index], "subscriber fails over");
        }
        // The old sockets close as they are replaced (linger 0).
        self.socket = socket;
        self.monitor = monitor;
        self.index = index;
        self.connected = false;
        self.opened_at = Instant::now();
        self.last_seq = 0;
        let mut user = Vec::new();
        for entry in std::mem::take(&mut self.in_flight) {
            if entry.call.is_none() {
                continue; // pings, resyncs and abandoned commands
            }
            if matches!(entry.command, Command::Unsubscribe(_)) {
                // The new connection holds no filters: done.
                self.settle(entry, Ok(()));
            } else {
                user.push(entry);
            }
        }
        user.append(&mut self.unsent);
        self.unsent = user;
        Ok(())
    }

    /// Handles what the current socket has already received.
    fn drain(&mut self) -> Result<(), ClientError> {
        let limit = usize::try_from(self.options.hwm).unwrap_or(0).max(1000) + READ_BATCH;
        for _ in 0..limit {
            match self.socket.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => self.handle(&frames),
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Waits until `until` for input, then handles what arrived. Unless
    /// `greedy`, stops reading once an event is ready, so that a slow reader
    /// leaves messages in libzmq's queue (and the broker's) instead of here.
    /// Monitor events are left to `maintain`, which the callers run next:
    /// data first keeps the old connection's messages ahead of a resync.
    fn wait(&mut self, until: Instant, greedy: bool) -> Result<(), ClientError> {
        let timeout = poll_millis(until.saturating_duration_since(Instant::now()));
        let data = {
            let mut items = [
                self.socket.as_poll_item(zmq::POLLIN),
                self.monitor.as_poll_item(zmq::POLLIN),
            ];
            zmq::poll(&mut items, timeout)?;
            items[0].is_readable()
        };
        if data {
            if !self.connected {
                self.on_connected()?;
            }
            for _ in 0..READ_BATCH {
                if !greedy && !self.inbox.is_empty() {
                    break;
                }
                match self.socket.recv_multipart(zmq::DONTWAIT) {
                    Ok(frames) => self.handle(&frames),
                    Err(zmq::Error::EAGAIN) => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    fn handle(&mut self, frames: &[Vec<u8>]) {
        self.last_heard = Instant::now();
        let parts: smallvec::SmallVec<[&[u8]; 4]> = frames.iter().map(|f| &f[..]).collect();
        match protocol::parse_reply(&parts) {
            Some(Reply::Message {
                seq,
                topic,
                payload,
            }) => {
                let gap = seq != self.last_seq.wrapping_add(1);
                self.last_seq = seq;
                let message = Message {
                    topic: topic.to_vec(),
                    payload: payload.to_vec(),
                    seq,
                    gap,
                };
                if self.resync.is_some() {
                    self.held.push(message);
                } else {
                    self.inbox.push_back(Event::Message(message));
                }
            }
            Some(Reply::Pong) => {
                if let Some(i) = self
                    .in_flight
                    .iter()
                    .position(|e| e.command == Command::Ping)
                {
                    self.in_flight.remove(i);
                }
            }
            Some(Reply::Ok {
                subscribe,
                kind,
                filter,
            }) => {
                let answered = self.in_flight.iter().position(|e| match &e.command {
                    Command::Subscribe(f) => subscribe && f.kind() == kind && f.text() == filter,
                    Command::Unsubscribe(f) => !subscribe && f.kind() == kind && f.text() == filter,
                    Command::Ping => false,
                });
                match answered.and_then(|i| self.in_flight.remove(i)) {
                    Some(entry) if entry.call.is_some() || (entry.abandoned && !entry.resync) => {
                        // A command given up on still took effect: keep the
                        // filters as the broker holds them.
                        self.settle(entry, Ok(()));
                    }
                    Some(_) => {}
                    None => tracing::debug!("an OK for no command waiting"),
                }
            }
            Some(Reply::Err { code, text }) => {
                let text_str = String::from_utf8_lossy(text).into_owned();
                if code == ErrorCode::Unauthorized.as_bytes() && text.starts_with(REVOKED_PREFIX) {
                    // Not an answer: the broker's key lists were reloaded
                    // and took this filter back; subscribing again would be
                    // refused, so it is no longer held here either.
                    match revoked_filter(text) {
                        Some(filter) => {
                            self.filters.remove(&filter);
                            tracing::warn!(%filter, "the broker revoked a filter: {text_str}");
                        }
                        None => tracing::warn!("the broker revoked a filter: {text_str}"),
                    }
                    return;
                }
                if code == ErrorCode::Limit.as_bytes()
                    && NOTICE_PREFIXES.iter().any(|p| text.starts_with(p))
                {
                    self.request_resync(ResyncReason::BrokerForgot(text_str));
                    return;
                }
                // Replies come in command order: an ERR answers the oldest.
                let Some(entry) = self.in_flight.pop_front() else {
                    tracing::warn!(error = %text_str, "broker error with no command waiting");
                    return;
                };
                if entry.resync && !entry.abandoned {
                    tracing::warn!(command = ?entry.command, error = %text_str, "broker refused a filter on resubscribe");
                } else if entry.call.is_some() {
                    let refused = Err(ClientError::Refused {
                        code: ErrorCode::from_bytes(code),
                        text: text_str,
                    });
                    self.settle(entry, refused);
                } else if entry.command == Command::Ping {
                    tracing::warn!(error = %text_str, "broker refused a PING");
                }
            }
            None => tracing::warn!(
                frames = frames.len(),
                "ignored a message that is not protocol v1"
            ),
        }
    }
}

fn open_dealer(
    context: &zmq::Context,
    endpoint: &str,
    options: &SubscriberOptions,
) -> Result<(zmq::Socket, zmq::Socket), ClientError> {
    let socket = context.socket(zmq::DEALER)?;
    socket.set_rcvhwm(options.hwm)?;
    // What this side sends is bounded anyway: a command per filter held
    // (a resync), the user's one command at a time, and a PING per
    // heartbeat until the silence check replaces the socket. A bound here
    // would only make the resync of a large filter set fail.
    socket.set_sndhwm(0)?;
    socket.set_linger(0)?;
    // No ZMTP heartbeats from this side. libzmq 4.3 aborts the process when
    // the connection of a connecting socket dies while backpressure has
    // stopped its input (this client is behind): on a heartbeat timeout
    // with `Assertion failed: _input_stopped` (zeromq/libzmq#3937), and
    // with a heartbeat interval alone on the next ZMTP PING it sends,
    // `Assertion failed: !_io_error` (stream_engine_base.cpp, `out_event`
    // called from the heartbeat timer after the dead connection's input
    // error was parked; the assertion of zeromq/libzmq#4841). The broker
    // hears from us through PING commands (from `recv`, every `heartbeat`),
    // and libzmq answers its ZMTP PINGs while input flows; broker silence is
    // judged by PING/PONG, and recovery always opens a fresh socket.
    // Reconnect quickly after a broker restart: the default backs off to
    // 100 ms, keep it there.
    socket.set_reconnect_ivl(100)?;
    socket.set_reconnect_ivl_max(1000)?;
    if let Some(curve) = &options.curve {
        curve.apply(&socket)?;
    }
    let monitor = monitored(context, &socket)?;
    socket.connect(endpoint)?;
    Ok((socket, monitor))
}
