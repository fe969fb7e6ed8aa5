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

/// Settings of a [`Publisher`].
#[derive(Clone, Debug)]
pub struct PublisherOptions {
    /// How long `publish` may block when libzmq's queue (up to `hwm`
    /// messages) is full, typically because the broker is down; then it
    /// fails with [`ClientError::Timeout`] and the message was not sent.
    /// `None` blocks without limit.
    pub send_timeout: Option<Duration>,
    /// How long dropping the publisher waits to hand queued messages to the
    /// broker before discarding them.
    pub linger: Duration,
    /// Messages libzmq queues for the broker before `publish` blocks.
    pub hwm: i32,
    /// CURVE credentials, for a broker that requires them.
    pub curve: Option<CurveKeys>,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            send_timeout: Some(Duration::from_secs(5)),
            linger: Duration::from_secs(5),
            hwm: 1000,
            curve: None,
        }
    }
}

/// Publishes messages to a broker's publisher endpoint over PUSH.
///
/// `publish` returning `Ok` means libzmq has queued the message for the
/// broker; it reaches the broker unless this process exits (or drops the
/// publisher and `linger` passes) before the broker can take it.
pub struct Publisher {
    socket: zmq::Socket,
    _context: zmq::Context,
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
        let context = zmq::Context::new();
        let socket = context.socket(zmq::PUSH)?;
        socket.set_sndhwm(options.hwm)?;
        socket.set_sndtimeo(options.send_timeout.map_or(-1, millis))?;
        socket.set_linger(millis(options.linger))?;
        socket.set_heartbeat_ivl(1000)?;
        socket.set_heartbeat_timeout(3000)?;
        if let Some(curve) = &options.curve {
            curve.apply(&socket)?;
        }
        socket.connect(endpoint)?;
        Ok(Publisher {
            socket,
            _context: context,
        })
    }

    /// Queues `[topic, payload]` for the broker, blocking up to the send
    /// timeout while the queue is full.
    pub fn publish(&mut self, topic: &[u8], payload: &[u8]) -> Result<(), ClientError> {
        // The two parts travel atomically: once the first is accepted, the
        // second cannot be refused.
        match self.socket.send(topic, zmq::SNDMORE) {
            Ok(()) => {}
            Err(zmq::Error::EAGAIN) => return Err(ClientError::Timeout("publishing")),
            Err(e) => return Err(e.into()),
        }
        self.socket.send(payload, 0)?;
        Ok(())
    }
}

/// Settings of a [`Subscriber`].
#[derive(Clone, Debug)]
pub struct SubscriberOptions {
    /// How often the subscriber sends `PING` (must be well under the
    /// broker's `--sub-timeout`).
    pub heartbeat: Duration,
    /// Silence from the broker for this long (no PONG, no message) means it
    /// is gone: the subscriber reconnects and re-subscribes.
    pub broker_timeout: Duration,
    /// The broker's `--sub-timeout`. If this client could not ping for this
    /// long (its thread did not call `recv`), the broker may have forgotten
    /// it, so it re-subscribes.
    pub broker_sub_timeout: Duration,
    /// How long `subscribe`/`unsubscribe` wait for the broker's answer.
    pub confirm_timeout: Duration,
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
    /// The broker's sequence number for this subscriber.
    pub seq: u64,
    /// Messages routed to this subscriber were lost just before this one
    /// (the broker dropped them, e.g. because this client read too slowly).
    pub gap: bool,
}

/// Why the subscriber re-subscribed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    /// The connection to the broker broke and was re-established.
    Reconnected,
    /// The broker went silent; the subscriber opened a new connection.
    BrokerSilent,
    /// This client did not ping for longer than the broker's timeout.
    Stalled,
    /// The broker said it dropped this subscriber's state.
    BrokerForgot(String),
}

impl fmt::Display for ResyncReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResyncReason::Reconnected => f.write_str("reconnected to the broker"),
            ResyncReason::BrokerSilent => f.write_str("the broker went silent"),
            ResyncReason::Stalled => f.write_str("this client stopped pinging for too long"),
            ResyncReason::BrokerForgot(text) => write!(f, "the broker dropped our state: {text}"),
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
    /// Every message published after this event matches as before.
    Resync(ResyncReason),
}

/// Text prefixes of the broker's unsolicited `[ERR, limit, …]` notices.
const NOTICE_PREFIXES: [&[u8]; 2] = [b"expired:", b"cut-off:"];

/// A command sent and not yet answered.
#[derive(Clone, Debug, PartialEq, Eq)]
struct InFlight {
    subscribe: bool,
    filter: Filter,
    /// Sent by a resync rather than by the user.
    resync: bool,
}

static MONITOR_IDS: AtomicUsize = AtomicUsize::new(0);

/// Receives messages from a broker's subscriber endpoint over DEALER.
///
/// Single-threaded: it pings, watches the connection and re-subscribes from
/// inside `recv`/`recv_timeout`/`subscribe`, so call `recv_timeout` at least
/// every `heartbeat` (if it cannot, it re-subscribes and says so with
/// [`Event::Resync`]).
pub struct Subscriber {
    endpoint: String,
    options: SubscriberOptions,
    // Sockets before the context: they must close first.
    socket: zmq::Socket,
    monitor: zmq::Socket,
    context: zmq::Context,
    filters: BTreeSet<Filter>,
    in_flight: VecDeque<InFlight>,
    /// Answers to the user's commands, until `command` collects them.
    answers: Vec<(InFlight, Result<(), ClientError>)>,
    inbox: VecDeque<Event>,
    /// Last seq received; 0 after (re)connecting.
    last_seq: u64,
    last_ping: Instant,
    last_heard: Instant,
    /// A resync is needed or under way; reported when the broker confirmed
    /// every filter again.
    resync: Option<ResyncReason>,
    resync_sent: Option<Instant>,
    /// The monitor saw the connection drop and not come back yet.
    disconnected: bool,
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
        let context = zmq::Context::new();
        let (socket, monitor) = open(&context, endpoint, &options)?;
        let now = Instant::now();
        Ok(Subscriber {
            endpoint: endpoint.to_string(),
            options,
            socket,
            monitor,
            context,
            filters: BTreeSet::new(),
            in_flight: VecDeque::new(),
            answers: Vec::new(),
            inbox: VecDeque::new(),
            last_seq: 0,
            last_ping: now,
            last_heard: now,
            resync: None,
            resync_sent: None,
            disconnected: false,
        })
    }

    /// The filters this subscriber holds (and re-subscribes after a resync).
    pub fn filters(&self) -> impl Iterator<Item = &Filter> {
        self.filters.iter()
    }

    /// Subscribes to `filter`; returns once the broker confirmed, so every
    /// message published after this returns and matching `filter` reaches
    /// this subscriber.
    pub fn subscribe(&mut self, filter: &Filter) -> Result<(), ClientError> {
        self.command(true, filter)?;
        self.filters.insert(filter.clone());
        Ok(())
    }

    /// Unsubscribes from `filter`; returns once the broker confirmed.
    pub fn unsubscribe(&mut self, filter: &Filter) -> Result<(), ClientError> {
        let result = self.command(false, filter);
        if result.is_ok()
            || matches!(
                result,
                Err(ClientError::Refused {
                    code: Some(ErrorCode::NotSubscribed),
                    ..
                })
            )
        {
            self.filters.remove(filter);
        }
        result
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
        let deadline = Instant::now() + timeout;
        loop {
            self.maintain()?;
            if let Some(event) = self.inbox.pop_front() {
                return Ok(Some(event));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.wait(deadline.min(self.next_duty()), false)?;
        }
    }

    fn command(&mut self, subscribe: bool, filter: &Filter) -> Result<(), ClientError> {
        self.maintain()?;
        let entry = InFlight {
            subscribe,
            filter: filter.clone(),
            resync: false,
        };
        self.send_command(&entry)?;
        self.in_flight.push_back(entry.clone());
        let deadline = Instant::now() + self.options.confirm_timeout;
        loop {
            if let Some(i) = self.answers.iter().position(|(e, _)| *e == entry) {
                return self.answers.swap_remove(i).1;
            }
            if Instant::now() >= deadline {
                self.in_flight.retain(|f| *f != entry);
                return Err(ClientError::Timeout("waiting for the broker to confirm"));
            }
            self.wait(deadline.min(self.next_duty()), true)?;
            self.maintain()?;
        }
    }

    fn send_command(&mut self, entry: &InFlight) -> Result<(), ClientError> {
        let verb = if entry.subscribe {
            protocol::SUB
        } else {
            protocol::UNSUB
        };
        self.socket.send_multipart(
            [verb, entry.filter.kind().as_bytes(), entry.filter.text()],
            0,
        )?;
        Ok(())
    }

    /// The next time `maintain` has something to do.
    fn next_duty(&self) -> Instant {
        let mut next = (self.last_ping + self.options.heartbeat)
            .min(self.last_heard + self.options.broker_timeout);
        if let Some(sent) = self.resync_sent {
            next = next.min(sent + self.options.confirm_timeout);
        } else if self.resync.is_some() {
            next = next.min(Instant::now() + Duration::from_millis(10));
        }
        next
    }

    fn request_resync(&mut self, reason: ResyncReason) {
        tracing::debug!(%reason, "resync needed");
        self.resync.get_or_insert(reason);
        self.resync_sent = None;
        self.last_seq = 0;
    }

    /// Pings, notices a stalled client or a silent broker, and drives a
    /// resync to completion.
    fn maintain(&mut self) -> Result<(), ClientError> {
        let now = Instant::now();
        let since_ping = now.saturating_duration_since(self.last_ping);
        let stall_limit = self
            .options
            .broker_sub_timeout
            .saturating_sub(self.options.heartbeat);
        if since_ping >= stall_limit && !self.filters.is_empty() {
            // The broker may have forgotten us, or closed the connection:
            // never write on a connection that may be dead while its input
            // is stalled (see `open`), start afresh.
            self.reopen()?;
            self.request_resync(ResyncReason::Stalled);
        } else if since_ping >= self.options.heartbeat * 2 {
            // This thread was not listening, so the broker's silence over
            // that time means nothing.
            self.last_heard = now;
        }
        if now.saturating_duration_since(self.last_ping) >= self.options.heartbeat {
            // A full pipe means the broker is not reading; the silence check
            // below handles that, so a PING that does not fit is not an error.
            match self.socket.send(protocol::PING, zmq::DONTWAIT) {
                Ok(()) | Err(zmq::Error::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
            self.last_ping = now;
        }
        if now.saturating_duration_since(self.last_heard) >= self.options.broker_timeout {
            self.reopen()?;
            self.request_resync(ResyncReason::BrokerSilent);
        }
        let Some(reason) = self.resync.clone() else {
            return Ok(());
        };
        let due = self
            .resync_sent
            .is_none_or(|sent| now.saturating_duration_since(sent) >= self.options.confirm_timeout);
        if due && !self.disconnected {
            self.in_flight.retain(|f| !f.resync);
            for filter in self.filters.clone() {
                let entry = InFlight {
                    subscribe: true,
                    filter,
                    resync: true,
                };
                self.send_command(&entry)?;
                self.in_flight.push_back(entry);
            }
            self.resync_sent = Some(now);
        }
        if self.resync_sent.is_some() && !self.in_flight.iter().any(|f| f.resync) {
            self.inbox.push_back(Event::Resync(reason));
            self.resync = None;
            self.resync_sent = None;
        }
        Ok(())
    }

    /// Replaces the connection with a new one (a new routing id at the
    /// broker). Unanswered user commands fail; resync commands are resent.
    fn reopen(&mut self) -> Result<(), ClientError> {
        let (socket, monitor) = open(&self.context, &self.endpoint, &self.options)?;
        self.socket = socket;
        self.monitor = monitor;
        self.disconnected = false;
        self.last_heard = Instant::now();
        for entry in std::mem::take(&mut self.in_flight) {
            if !entry.resync {
                let lost = Err(ClientError::Timeout(
                    "waiting for the broker (connection reset)",
                ));
                self.answers.push((entry, lost));
            }
        }
        Ok(())
    }

    /// Waits until `until` for input, then handles what arrived. Unless
    /// `greedy`, stops reading once an event is ready, so that a slow reader
    /// leaves messages in libzmq's queue (and the broker's) instead of here.
    fn wait(&mut self, until: Instant, greedy: bool) -> Result<(), ClientError> {
        let timeout = until.saturating_duration_since(Instant::now());
        let timeout_ms = timeout.as_millis().min(i64::MAX as u128) as i64;
        let (data, monitor) = {
            let mut items = [
                self.socket.as_poll_item(zmq::POLLIN),
                self.monitor.as_poll_item(zmq::POLLIN),
            ];
            zmq::poll(&mut items, timeout_ms)?;
            (items[0].is_readable(), items[1].is_readable())
        };
        if monitor {
            self.read_monitor()?;
        }
        if data {
            // Bounded so pings and timers keep running under a flood.
            for _ in 0..256 {
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

    fn read_monitor(&mut self) -> Result<(), ClientError> {
        loop {
            let frames = match self.monitor.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let Some(event) = crate::frame::monitor_event(&frames) else {
                continue;
            };
            if event == zmq::SocketEvent::DISCONNECTED as u16 {
                self.disconnected = true;
                self.request_resync(ResyncReason::Reconnected);
            } else if event == zmq::SocketEvent::HANDSHAKE_SUCCEEDED as u16 {
                self.disconnected = false;
                self.last_heard = Instant::now();
            }
        }
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
                self.inbox.push_back(Event::Message(Message {
                    topic: topic.to_vec(),
                    payload: payload.to_vec(),
                    seq,
                    gap,
                }));
            }
            Some(Reply::Pong) => {}
            Some(Reply::Ok {
                subscribe,
                kind,
                filter,
            }) => {
                let answered = self.in_flight.iter().position(|f| {
                    f.subscribe == subscribe && f.filter.kind() == kind && f.filter.text() == filter
                });
                if let Some(entry) = answered.and_then(|i| self.in_flight.remove(i))
                    && !entry.resync
                {
                    self.answers.push((entry, Ok(())));
                }
            }
            Some(Reply::Err { code, text }) => {
                let text_str = String::from_utf8_lossy(text).into_owned();
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
                if entry.resync {
                    tracing::warn!(filter = %entry.filter, error = %text_str, "broker refused a filter on resubscribe");
                } else {
                    let refused = Err(ClientError::Refused {
                        code: ErrorCode::from_bytes(code),
                        text: text_str,
                    });
                    self.answers.push((entry, refused));
                }
            }
            None => tracing::warn!(
                frames = frames.len(),
                "ignored a message that is not protocol v1"
            ),
        }
    }
}

fn open(
    context: &zmq::Context,
    endpoint: &str,
    options: &SubscriberOptions,
) -> Result<(zmq::Socket, zmq::Socket), ClientError> {
    let socket = context.socket(zmq::DEALER)?;
    socket.set_rcvhwm(options.hwm)?;
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
    // judged by PING/PONG.
    // Reconnect quickly after a broker restart: the default backs off to
    // 100 ms, keep it there.
    socket.set_reconnect_ivl(100)?;
    socket.set_reconnect_ivl_max(1000)?;
    if let Some(curve) = &options.curve {
        curve.apply(&socket)?;
    }
    let monitor_endpoint = format!(
        "inproc://zbroker-subscriber-monitor-{}",
        MONITOR_IDS.fetch_add(1, Ordering::Relaxed)
    );
    socket.monitor(
        &monitor_endpoint,
        (zmq::SocketEvent::DISCONNECTED as i32) | (zmq::SocketEvent::HANDSHAKE_SUCCEEDED as i32),
    )?;
    let monitor = context.socket(zmq::PAIR)?;
    monitor.set_linger(0)?;
    monitor.connect(&monitor_endpoint)?;
    socket.connect(endpoint)?;
    Ok((socket, monitor))
}
