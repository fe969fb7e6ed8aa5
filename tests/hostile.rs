//! One hostile client cannot hurt the others.
//!
//! A single broker runs as a child process (`zbroker run` on loopback tcp,
//! with modest limits) so that its memory can be read from `/proc` and its
//! counters from its `--metrics-bind` endpoint, exactly as an operator would
//! see them. An honest subscriber (two filters, pinging from its own thread)
//! and an honest publisher stay connected throughout. Each scenario runs while
//! the honest publisher publishes; afterwards the honest subscriber must have
//! received exactly what was published, in order, with consecutive seq
//! numbers (proved by a fence message), and the broker's gauges must return
//! to the honest baseline once the hostile clients are gone (expired after
//! `--sub-timeout`, or freed on `EHOSTUNREACH`). After all scenarios the
//! broker's resident memory must be within a generous bound of what it was
//! before them.
//!
//! Scenarios, in order: random multipart messages on both endpoints;
//! oversize frames; a 100,000-SUB burst; SUB/UNSUB churn from several
//! DEALERs; clients that connect and never speak; thousands of connections
//! opened and dropped; a subscriber that sends commands but never reads.
//! `ZBROKER_HOSTILE_SCENARIOS=3,7` runs only some of them, and
//! `ZBROKER_TEST_SEED=N` changes the random ones.
//!
//! Two more tests: failed handshakes must not flood the broker's log, and
//! the defences against floods must still let an honest client re-subscribe
//! its whole filter set at once.
//!
//! Then one test per attack found by the security review, each against a
//! broker of its own (`start_broker` changes its flags), each with the
//! honest pair checked during and after the attack, the broker alive, its
//! memory within a stated bound and the relevant counter moved:
//!
//! - `routing_id_collision_cannot_abort_the_broker`: DEALERs that choose the
//!   routing ids libzmq's ROUTER generates (upstream: SIGABRT), over tcp
//!   and ipc;
//! - `deep_patterns_cost_memory_in_proportion`: the pattern segment cap,
//!   10,000 patterns of 1 KiB, and `--max-index-bytes`;
//! - `patterns_that_never_match_cost_bounded_cpu`: broker CPU per publish
//!   against 10,000 patterns that follow a topic to its last segment;
//! - `deep_pattern_removal_and_length_bounds`: length settings past their
//!   bounds refused at start, and 1024-segment patterns held, matched and
//!   removed;
//! - `endless_multipart_messages_are_bounded`: messages of endless or too
//!   many parts, and oversize parts, drop their sender and are counted;
//! - `large_messages_to_a_stalled_subscriber_stay_within_bytes`: libzmq's
//!   pipe and the broker's queue bounded in bytes;
//! - `descriptor_exhaustion_does_not_spin_or_starve`: `--max-connections`,
//!   and running out of descriptors (under `ulimit -n`) without spinning;
//! - `garbage_from_a_stranger_is_rate_limited`: malformed commands from a
//!   peer the broker does not track share one rate limit.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::child::{self, ChildBroker, Log, Options};
use common::metrics::*;
use common::{DEADLINE, Rng, mib, procfs, zmtp};
use zbroker::protocol::{self, ErrorCode, Reply};

const SUB_TIMEOUT: Duration = Duration::from_secs(1);
/// Well under `SUB_TIMEOUT`, so that a busy machine cannot make the broker
/// forget the honest subscriber.
const PING_EVERY: Duration = Duration::from_millis(100);
const MAX_FILTERS: usize = 64;
const MAX_MESSAGE_SIZE: usize = 4096;
/// Both the longest topic and the longest filter.
const MAX_LEN: usize = 64;
const COMMANDS_PER_SEC: u64 = 1000;
const MAX_QUEUED_REPLIES: usize = 64;
const QUEUE_MAX_MESSAGES: usize = 256;
const QUEUE_MAX_BYTES: usize = 64 << 10;
const QUEUE_MAX_TOTAL_BYTES: usize = 1 << 20;
/// The honest subscriber's filters: `prefix:honest.` and `exact:fence`.
const HONEST_FILTERS: u64 = 2;
/// Generous: allocators keep freed memory, and a debug build is fat.
const RSS_SLACK: u64 = 64 << 20;

fn seed() -> u64 {
    common::test_seed().unwrap_or(0x005e_ed01)
}

// ---------------------------------------------------------------- the broker

/// `zbroker run` with the limits above (`overrides`, `("--flag", "value")`,
/// replace or add flags), on loopback tcp with ports the system picks, its
/// metrics served on one too.
fn start_broker(overrides: &[(&str, &str)]) -> ChildBroker {
    launch(overrides, None)
}

/// Like [`start_broker`], under `ulimit -n files`.
fn start_broker_with_file_limit(files: u32, overrides: &[(&str, &str)]) -> ChildBroker {
    launch(overrides, Some(files))
}

fn launch(overrides: &[(&str, &str)], file_limit: Option<u32>) -> ChildBroker {
    let defaults = [
        ("--pub-bind", "tcp://127.0.0.1:0".to_string()),
        ("--sub-bind", "tcp://127.0.0.1:0".to_string()),
        // Port 0: the broker logs the port it got.
        ("--metrics-bind", "127.0.0.1:0".to_string()),
        ("--sub-timeout", format!("{}ms", SUB_TIMEOUT.as_millis())),
        ("--max-filters-per-subscriber", MAX_FILTERS.to_string()),
        ("--max-message-size", MAX_MESSAGE_SIZE.to_string()),
        ("--max-topic-len", MAX_LEN.to_string()),
        ("--max-filter-len", MAX_LEN.to_string()),
        ("--max-commands-per-sec", COMMANDS_PER_SEC.to_string()),
        ("--queue-max-messages", QUEUE_MAX_MESSAGES.to_string()),
        ("--queue-max-bytes", QUEUE_MAX_BYTES.to_string()),
        ("--queue-max-total-bytes", QUEUE_MAX_TOTAL_BYTES.to_string()),
        ("--linger", "100ms".to_string()),
    ];
    // max_queued_replies has no flag; the config file sets it.
    let config = format!("[limits]\nmax_queued_replies = {MAX_QUEUED_REPLIES}\n");
    ChildBroker::start_with(
        &child::flags(&defaults, overrides),
        Options {
            config: Some(&config),
            file_limit,
            ..Options::default()
        },
    )
}

/// The gauges as they are with only the honest pair connected.
fn at_baseline(m: &Metrics) -> bool {
    m.at_baseline(1, HONEST_FILTERS, 1)
}

// ---------------------------------------------------------- the honest pair

enum Seen {
    Delivery(u64, Vec<u8>, Vec<u8>),
    /// The connection dropped: the broker sees a reconnection as a new
    /// subscriber without filters, so nothing would be delivered any more.
    Disconnected,
    /// Anything but a delivery or a PONG: an honest subscriber that is left
    /// alone gets nothing else, so the test fails on it.
    Other(Vec<Vec<u8>>),
}

/// The honest subscriber, on its own thread so that it keeps pinging while
/// the test thread is busy being hostile.
struct HonestSubscriber {
    events: mpsc::Receiver<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HonestSubscriber {
    fn start(ctx: &zmq::Context, endpoint: &str, log: &Log) -> HonestSubscriber {
        let socket = ctx.socket(zmq::DEALER).unwrap();
        socket.set_linger(0).unwrap();
        // Unlimited: its input never stops, which also keeps it clear of
        // libzmq 4.3's abort on a dying connection with stopped input.
        socket.set_rcvhwm(0).unwrap();
        socket.set_rcvtimeo(10_000).unwrap();
        let watch = monitor(ctx, &socket);
        socket.connect(endpoint).unwrap();
        for (kind, filter) in [(&b"prefix"[..], &b"honest."[..]), (b"exact", b"fence")] {
            socket
                .send_multipart([&b"SUB"[..], kind, filter], 0)
                .unwrap();
            let reply = socket.recv_multipart(0).unwrap_or_else(|e| {
                panic!(
                    "no OK for an honest SUB to {endpoint} ({e}); the broker's last log \
                     lines: {:#?}",
                    log.tail(20)
                )
            });
            assert_eq!(reply, [&b"OK"[..], b"SUB", kind, filter]);
        }
        let (tx, events) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut socket = socket;
            let limit = Instant::now() + Duration::from_secs(600);
            let mut last_ping = Instant::now() - PING_EVERY;
            'run: while !stopped.load(Ordering::Acquire) && Instant::now() < limit {
                if last_ping.elapsed() >= PING_EVERY {
                    match socket.send(protocol::PING, zmq::DONTWAIT) {
                        Ok(()) | Err(zmq::Error::EAGAIN) => {}
                        Err(e) => panic!("honest PING: {e}"),
                    }
                    last_ping = Instant::now();
                }
                let mut items = [
                    socket.as_poll_item(zmq::POLLIN),
                    watch.as_poll_item(zmq::POLLIN),
                ];
                zmq::poll(&mut items, 20).unwrap();
                while let Ok(frames) = watch.recv_multipart(zmq::DONTWAIT) {
                    let event = u16::from_le_bytes([frames[0][0], frames[0][1]]);
                    if event == zmq::SocketEvent::DISCONNECTED as u16
                        && tx.send(Seen::Disconnected).is_err()
                    {
                        break 'run;
                    }
                }
                for _ in 0..10_000 {
                    let frames = match socket.recv_multipart(zmq::DONTWAIT) {
                        Ok(frames) => frames,
                        Err(zmq::Error::EAGAIN) => break,
                        Err(e) => panic!("honest recv: {e}"),
                    };
                    let parts: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
                    let seen = match protocol::parse_reply(&parts) {
                        Some(Reply::Pong) => continue,
                        Some(Reply::Message {
                            seq,
                            topic,
                            payload,
                        }) => Seen::Delivery(seq, topic.to_vec(), payload.to_vec()),
                        _ => Seen::Other(frames.clone()),
                    };
                    if tx.send(seen).is_err() {
                        break 'run;
                    }
                }
            }
            stop_monitor(&mut socket);
        });
        HonestSubscriber {
            events,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HonestSubscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

type Sent = Vec<(Vec<u8>, Vec<u8>)>;

/// The honest subscriber and publisher, and what the subscriber has seen.
struct Honest {
    sub: HonestSubscriber,
    /// To show the broker's side when a check fails.
    metrics_url: String,
    log: Arc<Log>,
    publisher: Option<zmq::Socket>,
    last_seq: u64,
    /// Messages the honest publisher has published, fences included.
    published: u64,
}

impl Honest {
    fn start(ctx: &zmq::Context, broker: &ChildBroker) -> Honest {
        let log = broker.log();
        Honest {
            sub: HonestSubscriber::start(ctx, &broker.sub_endpoint, &log),
            metrics_url: broker.metrics_url().to_string(),
            log,
            publisher: Some(common::publisher(ctx, &broker.pub_endpoint)),
            last_seq: 0,
            published: 0,
        }
    }

    /// Connects the honest pair, warms it up, and waits for the broker's
    /// gauges to settle at the honest baseline; returns the pair and the
    /// broker's metrics then.
    fn settle(ctx: &zmq::Context, broker: &ChildBroker) -> (Honest, Metrics) {
        let mut honest = Honest::start(ctx, broker);
        honest.round("warm-up");
        let baseline = broker.wait_for("the honest baseline", at_baseline);
        (honest, baseline)
    }

    /// Runs `scenario` while the honest publisher publishes from another
    /// thread, then checks the honest subscriber got all of it.
    fn during<T>(&mut self, name: &str, scenario: impl FnOnce() -> T) -> T {
        let publisher = self.publisher.take().expect("the honest publisher");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let prefix = format!("honest.{}.", name.replace(' ', "-"));
        let thread = std::thread::spawn(move || {
            let mut sent: Sent = Vec::new();
            while !stopped.load(Ordering::Acquire) && sent.len() < 20_000 {
                let topic = format!("{prefix}{}", sent.len()).into_bytes();
                let payload = format!("payload {}", sent.len()).into_bytes();
                common::publish(&publisher, &topic, &payload);
                sent.push((topic, payload));
                // Pacing only: a steady trickle across the whole scenario.
                std::thread::sleep(Duration::from_millis(2));
            }
            (publisher, sent)
        });
        let result = scenario();
        stop.store(true, Ordering::Release);
        let (publisher, sent) = thread.join().expect("the honest publisher thread");
        self.publisher = Some(publisher);
        self.verify(name, sent);
        result
    }

    /// A few honest messages with nothing else going on.
    fn round(&mut self, name: &str) {
        let publisher = self.publisher.as_ref().expect("the honest publisher");
        let sent: Sent = (0..20)
            .map(|i| {
                let topic = format!("honest.{}.{i}", name.replace(' ', "-")).into_bytes();
                let payload = vec![i as u8; i];
                common::publish(publisher, &topic, &payload);
                (topic, payload)
            })
            .collect();
        self.verify(name, sent);
    }

    /// Publishes a fence after `sent` and checks that the honest subscriber
    /// received exactly `sent`, then the fence, with consecutive seqs: one
    /// publisher's messages are routed in order, so the fence arriving
    /// proves everything before it was routed.
    fn verify(&mut self, name: &str, sent: Sent) {
        let publisher = self.publisher.as_ref().expect("the honest publisher");
        let token = format!("fence after {name}").into_bytes();
        common::publish(publisher, b"fence", &token);
        self.published += sent.len() as u64 + 1;
        let deadline = Instant::now() + DEADLINE;
        let mut got: Sent = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.sub.events.recv_timeout(left) {
                Ok(Seen::Delivery(seq, topic, payload)) => {
                    assert_eq!(
                        seq,
                        self.last_seq + 1,
                        "{name}: the honest subscriber's seq must grow by one (got {} of {} messages)",
                        got.len(),
                        sent.len()
                    );
                    self.last_seq = seq;
                    if topic == b"fence" {
                        assert_eq!(payload, token, "{name}: an old fence");
                        break;
                    }
                    got.push((topic, payload));
                }
                Ok(Seen::Other(frames)) => {
                    panic!("{name}: the honest subscriber got {frames:?}")
                }
                Ok(Seen::Disconnected) => panic!(
                    "{name}: the honest subscriber's connection dropped (after {} of {} \
                     messages); the broker would only drop it for ZMTP heartbeat silence, \
                     i.e. this process starved for seconds",
                    got.len(),
                    sent.len()
                ),
                Err(e) => panic!(
                    "{name}: no fence ({e}); the honest subscriber got {} of {} messages; \
                     the broker: {:#?}\nits last log lines: {:#?}",
                    got.len(),
                    sent.len(),
                    zbroker::metrics::fetch(&self.metrics_url).map(|t| Metrics::parse(&t)),
                    self.log.tail(15)
                ),
            }
        }
        assert_eq!(
            got.len(),
            sent.len(),
            "{name}: honest messages lost or duplicated"
        );
        assert!(
            got == sent,
            "{name}: honest messages differ or are reordered"
        );
    }
}

// ------------------------------------------------------------ hostile tools

/// A DEALER for a hostile client that reads its replies. Its receive queue is
/// unlimited so its input never stops (libzmq 4.3 aborts a connecting socket
/// whose connection dies while its input is stopped, zeromq/libzmq#3937).
fn hostile_dealer(ctx: &zmq::Context, endpoint: &str) -> zmq::Socket {
    let socket = unconnected_dealer(ctx);
    socket.connect(endpoint).unwrap();
    socket
}

fn unconnected_dealer(ctx: &zmq::Context) -> zmq::Socket {
    let socket = ctx.socket(zmq::DEALER).unwrap();
    socket.set_linger(0).unwrap();
    socket.set_rcvhwm(0).unwrap();
    socket.set_rcvtimeo(10_000).unwrap();
    socket.set_sndtimeo(10_000).unwrap();
    socket
}

/// What a hostile subscriber received, other than replies.
fn is_delivery_or_notice(frames: &[Vec<u8>]) -> bool {
    let parts: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    match protocol::parse_reply(&parts) {
        Some(Reply::Message { .. }) => true,
        Some(Reply::Err { code, text }) => {
            code == ErrorCode::Limit.as_bytes()
                && (text.starts_with(b"expired:") || text.starts_with(b"cut-off:"))
        }
        _ => false,
    }
}

/// Replies to a burst of SUBs, by kind.
#[derive(Debug, Default)]
struct Tally {
    /// The filters confirmed, in order.
    ok: Vec<Vec<u8>>,
    /// `[ERR, limit, …]` replies.
    refused: u64,
    other: Vec<Vec<Vec<u8>>>,
}

impl Tally {
    fn drain(&mut self, socket: &zmq::Socket) {
        for _ in 0..100_000 {
            let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) else {
                return;
            };
            if is_delivery_or_notice(&frames) {
                continue;
            }
            match err_code(&frames) {
                Some(code) if code == ErrorCode::Limit.as_bytes() => self.refused += 1,
                None if frames.len() == 4 && frames[0] == b"OK" => self.ok.push(frames[3].clone()),
                _ => self.other.push(frames),
            }
        }
    }

    fn answered(&self) -> u64 {
        self.ok.len() as u64 + self.refused + self.other.len() as u64
    }
}

/// `[ERR, limit, …]` from the command rate limit.
fn is_rate_refusal(reply: &[Vec<u8>]) -> bool {
    err_code(reply) == Some(ErrorCode::Limit.as_bytes()) && reply[2].starts_with(b"more than")
}

fn err_code(reply: &[Vec<u8>]) -> Option<&[u8]> {
    match reply {
        [err, code, _text] if err == b"ERR" => Some(code),
        _ => None,
    }
}

/// Sends each socket's commands keeping at most `window` of them unanswered
/// per socket, and hands every reply to `check` with the index of its socket
/// and the command it answers (replies come in command order). With a window
/// well under libzmq's HWM nothing waits in the broker's reply queue, so
/// every command must be answered.
fn pipeline(
    sockets: &[&zmq::Socket],
    commands: &[Vec<Vec<Vec<u8>>>],
    window: usize,
    mut check: impl FnMut(usize, &[Vec<u8>], &[Vec<u8>]),
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut sent = vec![0; sockets.len()];
    let mut answered = vec![0; sockets.len()];
    while (0..sockets.len()).any(|i| answered[i] < commands[i].len()) {
        assert!(
            Instant::now() < deadline,
            "replies missing: sent {sent:?}, answered {answered:?}"
        );
        for (i, socket) in sockets.iter().enumerate() {
            while sent[i] < commands[i].len() && sent[i] - answered[i] < window {
                socket.send_multipart(&commands[i][sent[i]], 0).unwrap();
                sent[i] += 1;
            }
        }
        let mut items: Vec<zmq::PollItem> = sockets
            .iter()
            .map(|s| s.as_poll_item(zmq::POLLIN))
            .collect();
        zmq::poll(&mut items, 100).unwrap();
        for (i, socket) in sockets.iter().enumerate() {
            for _ in 0..10_000 {
                let frames = match socket.recv_multipart(zmq::DONTWAIT) {
                    Ok(frames) => frames,
                    Err(zmq::Error::EAGAIN) => break,
                    Err(e) => panic!("hostile recv: {e}"),
                };
                if is_delivery_or_notice(&frames) {
                    continue;
                }
                assert!(
                    answered[i] < sent[i],
                    "socket {i}: a reply to no command: {frames:?}"
                );
                check(i, &commands[i][answered[i]], &frames);
                answered[i] += 1;
            }
        }
    }
}

/// Keeps hostile subscribers alive (PING, replies discarded) while polling
/// the broker until `done` holds: their state must be checked before
/// `--sub-timeout` would make the broker forget them.
fn keep_alive_until(
    broker: &ChildBroker,
    sockets: &[&zmq::Socket],
    what: &str,
    done: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let deadline = Instant::now() + DEADLINE;
    loop {
        for socket in sockets {
            match socket.send(protocol::PING, zmq::DONTWAIT) {
                Ok(()) | Err(zmq::Error::EAGAIN) => {}
                Err(e) => panic!("hostile PING: {e}"),
            }
            for _ in 0..100_000 {
                if socket.recv_multipart(zmq::DONTWAIT).is_err() {
                    break;
                }
            }
        }
        let metrics = broker.metrics();
        if done(&metrics) {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {metrics:#?}"
        );
        std::thread::sleep(PING_EVERY);
    }
}

static MONITORS: AtomicUsize = AtomicUsize::new(0);

/// A monitor on `socket`, connected before `socket` connects anywhere so no
/// event is missed. Stop it (`stop_monitor`) before either socket goes.
fn monitor(ctx: &zmq::Context, socket: &zmq::Socket) -> zmq::Socket {
    let endpoint = format!(
        "inproc://hostile-monitor-{}",
        MONITORS.fetch_add(1, Ordering::Relaxed)
    );
    let events =
        zmq::SocketEvent::HANDSHAKE_SUCCEEDED as i32 | zmq::SocketEvent::DISCONNECTED as i32;
    socket.monitor(&endpoint, events).unwrap();
    let monitor = ctx.socket(zmq::PAIR).unwrap();
    monitor.set_linger(0).unwrap();
    monitor.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
    monitor.connect(&endpoint).unwrap();
    monitor
}

/// Stops `socket`'s monitor; call it before dropping the socket or the
/// monitor's reader. libzmq sends monitor events with a blocking send, from
/// whichever of its threads sees them, until the socket is destroyed, which
/// `zmq_close` only begins: an event after the reader is gone (a peer
/// hanging up while the socket closes) would block that thread, often the
/// context's I/O thread, and with it every socket of the context, for good.
/// Once stopped (under libzmq's lock), later events are dropped.
fn stop_monitor(socket: &mut zmq::Socket) {
    // SAFETY: the handle is live as long as `socket` is; a null endpoint
    // stops monitoring (zmq_socket_monitor(3)).
    let rc = unsafe { zmq_sys::zmq_socket_monitor(socket.as_mut_ptr(), std::ptr::null(), 0) };
    assert_eq!(rc, 0, "stop a socket monitor");
}

fn wait_event(monitor: &zmq::Socket, event: zmq::SocketEvent, what: &str) {
    for _ in 0..1000 {
        let frames = monitor
            .recv_multipart(0)
            .unwrap_or_else(|e| panic!("no {event:?} for {what}: {e}"));
        let raw = u16::from_le_bytes([frames[0][0], frames[0][1]]);
        if raw == event as u16 {
            return;
        }
    }
    panic!("no {event:?} for {what} among 1000 events");
}

/// A random message part: protocol words, short and long random bytes.
fn random_frame(rng: &mut Rng, words: &[&[u8]]) -> Vec<u8> {
    let random = |rng: &mut Rng, max: usize| -> Vec<u8> {
        let len = rng.below(max + 1);
        (0..len).map(|_| rng.next() as u8).collect()
    };
    match rng.below(10) {
        0..=3 if !words.is_empty() => rng.pick(words).to_vec(),
        0..=6 => random(rng, 2 * MAX_LEN),
        7 | 8 => random(rng, 16),
        _ => random(rng, MAX_MESSAGE_SIZE),
    }
}

/// 0 to 8 random parts. ZeroMQ has no message of zero parts; the closest,
/// one empty part, stands for it.
fn random_message(rng: &mut Rng, words: &[&[u8]]) -> Vec<Vec<u8>> {
    match rng.below(9) {
        0 => vec![Vec::new()],
        n => (0..n).map(|_| random_frame(rng, words)).collect(),
    }
}

/// Connects, sends `bytes` and waits for the broker to hang up.
///
/// The broker hanging up first matters on this test machine's loopback: a
/// client that closes first leaves its port in TIME_WAIT, and reusing such
/// ports for fresh connections stalls some of them for a one-second SYN
/// retransmit (seen just as well against a plain listener that reads EOF and
/// closes), which would make thousands of connections take minutes.
fn raw_rejected(address: SocketAddr, bytes: &[u8]) {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(10))
        .expect("connect a raw TCP client");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).expect("send to the broker");
    let mut sink = [0u8; 512];
    for _ in 0..1000 {
        match std::io::Read::read(&mut stream, &mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            // A reset is a hang-up too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the broker did not hang up on a bad handshake: {e}"),
        }
    }
    panic!("the broker kept talking to a bad handshake");
}

// ---------------------------------------------------------------- scenarios

/// 1. Random multipart messages to both endpoints. Every publish is either
///    published or counted malformed; every command is answered as the
///    protocol says; the broker holds exactly the filters it confirmed.
fn random_multipart(broker: &ChildBroker, ctx: &zmq::Context, honest: &mut Honest) {
    const PUSH_MESSAGES: usize = 3000;
    const COMMANDS: usize = 3000;
    let seed = seed();
    eprintln!("random multipart: seed {seed} (set ZBROKER_TEST_SEED to change)");
    let mut rng = Rng::new(seed);
    let before = broker.fresh_metrics();
    let honest_before = honest.published;
    let (valid, invalid, malformed_commands) = honest.during("random multipart", || {
        let push = common::publisher(ctx, &broker.pub_endpoint);
        let (mut valid, mut invalid) = (0u64, 0u64);
        for _ in 0..PUSH_MESSAGES {
            // A third shaped like a publish, to reach the routing path.
            let mut frames = match rng.below(3) {
                0 => vec![random_frame(&mut rng, &[]), random_frame(&mut rng, &[])],
                _ => random_message(&mut rng, &[]),
            };
            // Never an honest topic: the honest subscriber must see only
            // honest messages.
            if frames[0].starts_with(b"honest") || frames[0] == b"fence" {
                frames[0][0] ^= 0x80;
            }
            if frames.len() == 2 && (1..=MAX_LEN).contains(&frames[0].len()) {
                valid += 1;
            } else {
                invalid += 1;
            }
            push.send_multipart(&frames, 0).unwrap();
        }

        let words: [&[u8]; 14] = [
            b"SUB",
            b"UNSUB",
            b"PING",
            b"exact",
            b"prefix",
            b"pattern",
            b"",
            b"hostile.a",
            b"hostile.*",
            b"hostile.>",
            b">",
            b"*",
            b"a.>.b",
            b"PONG",
        ];
        // Half shaped like commands, to get past the first checks.
        let commands: Vec<Vec<Vec<u8>>> = (0..COMMANDS)
            .map(|_| match rng.below(4) {
                0 | 1 => vec![
                    rng.pick(&[&b"SUB"[..], b"SUB", b"UNSUB"]).to_vec(),
                    rng.pick(&[&b"exact"[..], b"prefix", b"pattern", b"glob"])
                        .to_vec(),
                    random_frame(&mut rng, &words),
                ],
                _ => random_message(&mut rng, &words),
            })
            .collect();
        let dealer = hostile_dealer(ctx, &broker.sub_endpoint);
        let mut held: HashSet<(Vec<u8>, Vec<u8>)> = HashSet::new();
        let (mut malformed, mut rate_refused) = (0u64, 0u64);
        pipeline(&[&dealer], &[commands], 64, |_, command, reply| {
            let parts: Vec<&[u8]> = command.iter().map(Vec::as_slice).collect();
            let code = err_code(reply);
            // Any message from a known subscriber costs a rate token, so any
            // may be refused by the rate limit before it is even parsed.
            if is_rate_refusal(reply) {
                rate_refused += 1;
                return;
            }
            match protocol::parse_command(&parts, MAX_LEN) {
                Err(e) => {
                    malformed += 1;
                    assert_eq!(code, Some(e.code().as_bytes()), "{command:?} -> {reply:?}");
                }
                Ok(protocol::Command::Ping) => {
                    assert_eq!(reply, [b"PONG"], "{command:?}");
                }
                Ok(protocol::Command::Subscribe(f)) => {
                    let key = (f.kind().as_bytes().to_vec(), f.text().to_vec());
                    if code.is_none() {
                        assert_eq!(reply, [&b"OK"[..], b"SUB", &key.0, &key.1]);
                        held.insert(key);
                    } else {
                        // The only other refusal: the filter limit.
                        assert_eq!(code, Some(ErrorCode::Limit.as_bytes()), "{reply:?}");
                        assert_eq!(held.len(), MAX_FILTERS, "{command:?} -> {reply:?}");
                    }
                }
                Ok(protocol::Command::Unsubscribe(f)) => {
                    let key = (f.kind().as_bytes().to_vec(), f.text().to_vec());
                    if code.is_none() {
                        assert_eq!(reply, [&b"OK"[..], b"UNSUB", &key.0, &key.1]);
                        assert!(held.remove(&key), "UNSUB OK for a filter not held");
                    } else {
                        assert_eq!(code, Some(ErrorCode::NotSubscribed.as_bytes()), "{reply:?}");
                        assert!(!held.contains(&key), "not-subscribed for a held filter");
                    }
                }
            }
        });
        let held_count = held.len() as u64;
        keep_alive_until(
            broker,
            &[&dealer],
            "the broker to hold what it confirmed",
            |m| m.get(SUBSCRIBERS) == 2 && m.get(SUBSCRIPTIONS) == HONEST_FILTERS + held_count,
        );
        eprintln!(
            "random multipart: {valid} valid and {invalid} malformed publishes, \
             {malformed} malformed and {rate_refused} rate-limited of {COMMANDS} commands, \
             {held_count} filters held"
        );
        (valid, invalid, malformed)
    });
    let honest_sent = honest.published - honest_before;
    let after = broker.wait_for("every hostile publish to be read", |m| {
        m.since(&before, PUBLISHED) + m.since(&before, MALFORMED_PUBLISHES)
            >= valid + invalid + honest_sent
    });
    assert_eq!(after.since(&before, PUBLISHED), valid + honest_sent);
    assert_eq!(after.since(&before, MALFORMED_PUBLISHES), invalid);
    assert_eq!(after.since(&before, MALFORMED_COMMANDS), malformed_commands);
}

/// 2. Parts larger than `--max-message-size` on both endpoints: libzmq drops
///    the peer, the broker goes on and takes the same client back.
fn oversize_frames(broker: &ChildBroker, ctx: &zmq::Context, honest: &mut Honest) {
    let before = broker.fresh_metrics();
    let honest_before = honest.published;
    honest.during("oversize frames", || {
        for size in [MAX_MESSAGE_SIZE + 1, 64 << 10, 1 << 20] {
            let mut push = ctx.socket(zmq::PUSH).unwrap();
            push.set_linger(0).unwrap();
            let events = monitor(ctx, &push);
            push.connect(&broker.pub_endpoint).unwrap();
            wait_event(&events, zmq::SocketEvent::HANDSHAKE_SUCCEEDED, "PUSH");
            push.send_multipart([b"hostile.big".to_vec(), vec![7; size]], 0)
                .unwrap();
            wait_event(
                &events,
                zmq::SocketEvent::DISCONNECTED,
                "an oversize publish",
            );
            // It reconnects: stop its events before either goes.
            stop_monitor(&mut push);
            drop((push, events));

            let mut dealer = unconnected_dealer(ctx);
            let events = monitor(ctx, &dealer);
            dealer.connect(&broker.sub_endpoint).unwrap();
            wait_event(&events, zmq::SocketEvent::HANDSHAKE_SUCCEEDED, "DEALER");
            dealer
                .send_multipart([&b"SUB"[..], b"prefix", &vec![b'x'; size]], 0)
                .unwrap();
            wait_event(
                &events,
                zmq::SocketEvent::DISCONNECTED,
                "an oversize command",
            );
            // libzmq reconnects by itself; the broker must answer again.
            wait_event(
                &events,
                zmq::SocketEvent::HANDSHAKE_SUCCEEDED,
                "a reconnect",
            );
            dealer.send(protocol::PING, 0).unwrap();
            let reply = dealer.recv_multipart(0).expect("PONG after a reconnect");
            assert_eq!(reply, [b"PONG"], "size {size}");
            stop_monitor(&mut dealer);
        }
        // Many parts, each under the limit, but no more than the 16 the
        // broker's libzmq takes (more drop the peer, see
        // `endless_multipart_messages_are_bounded`): not a reason to drop
        // the peer, just a malformed publish; the same connection goes on.
        let push = common::publisher(ctx, &broker.pub_endpoint);
        let parts = vec![vec![1u8; MAX_MESSAGE_SIZE - 1]; 16];
        push.send_multipart(&parts, 0).unwrap();
        common::publish(&push, b"hostile.after", b"still here");
    });
    let honest_sent = honest.published - honest_before;
    let after = broker.wait_for("the many-part publish and the one after it", |m| {
        m.since(&before, PUBLISHED) > honest_sent
    });
    assert_eq!(after.since(&before, PUBLISHED), honest_sent + 1);
    assert_eq!(
        after.since(&before, MALFORMED_PUBLISHES),
        1,
        "oversize parts never reach the broker; the many-part one is malformed"
    );
    // Each oversize part dropped its peer, and each drop is counted.
    let after = broker.wait_for("the oversize drops counted", |m| {
        m.since(&before, OVERSIZE_PUB) >= 3 && m.since(&before, OVERSIZE_SUB) >= 3
    });
    assert_eq!(
        after.since(&before, MULTIPART_PUB),
        0,
        "16 parts are allowed"
    );
}

/// 3. 100,000 distinct SUBs in one burst from one DEALER: the first
///    `MAX_FILTERS` are confirmed, every other is refused with
///    `[ERR, limit, …]` (filter limit, then rate limit), and the broker holds
///    no more than `MAX_FILTERS` of them.
fn sub_burst(broker: &ChildBroker, ctx: &zmq::Context, honest: &mut Honest) {
    const COMMANDS: usize = 100_000;
    let before = broker.fresh_metrics();
    let rss_before = broker.rss();
    honest.during("SUB burst", || {
        let dealer = hostile_dealer(ctx, &broker.sub_endpoint);
        let filter = |i: usize| format!("burst.{i}").into_bytes();
        let mut tally = Tally::default();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut sent = 0;
        // As fast as libzmq takes them; read whatever came back meanwhile.
        while sent < COMMANDS {
            assert!(Instant::now() < deadline, "sent only {sent} commands");
            match dealer.send_multipart([&b"SUB"[..], b"exact", &filter(sent)], zmq::DONTWAIT) {
                Ok(()) => sent += 1,
                Err(zmq::Error::EAGAIN) => {
                    let mut items = [dealer.as_poll_item(zmq::POLLIN | zmq::POLLOUT)];
                    zmq::poll(&mut items, 100).unwrap();
                }
                Err(e) => panic!("burst send: {e}"),
            }
            tally.drain(&dealer);
        }
        // Every command is answered, unless its reply was dropped because
        // this client fell behind; the broker counts those.
        loop {
            let answered = tally.answered();
            if answered == COMMANDS as u64 {
                break;
            }
            assert!(Instant::now() < deadline, "{answered} replies: {tally:?}");
            let mut items = [dealer.as_poll_item(zmq::POLLIN)];
            zmq::poll(&mut items, 200).unwrap();
            if items[0].is_readable() {
                tally.drain(&dealer);
            } else if answered + broker.metrics().since(&before, REPLIES_DROPPED) == COMMANDS as u64
            {
                break;
            }
        }
        let Tally { ok, refused, other } = tally;
        assert!(
            other.is_empty(),
            "unexpected replies: {:?}",
            &other[..other.len().min(5)]
        );
        let expected: Vec<Vec<u8>> = (0..MAX_FILTERS).map(filter).collect();
        assert_eq!(
            ok, expected,
            "the first MAX_FILTERS are confirmed, no others"
        );
        let during = keep_alive_until(
            broker,
            &[&dealer],
            "the burst's filters in the broker",
            |m| {
                m.get(SUBSCRIBERS) == 2
                    && m.get(SUBSCRIPTIONS) == HONEST_FILTERS + MAX_FILTERS as u64
                    && m.since(&before, REFUSED_LIMIT) + m.since(&before, REFUSED_RATE)
                        >= (COMMANDS - MAX_FILTERS) as u64
            },
        );
        let (limit, rate) = (
            during.since(&before, REFUSED_LIMIT),
            during.since(&before, REFUSED_RATE),
        );
        let dropped = during.since(&before, REPLIES_DROPPED);
        let (rss, peak) = broker.memory();
        eprintln!(
            "SUB burst: {} OK, {refused} refused ({limit} by the filter limit, {rate} by the \
             rate limit), {dropped} replies dropped; broker RSS {:.1} MiB (peak {:.1} MiB)",
            ok.len(),
            mib(rss),
            mib(peak)
        );
        // PINGs from keep_alive_until may be refused by the rate limit too.
        assert!(limit + rate >= (COMMANDS - MAX_FILTERS) as u64);
        // The bucket starts with a second's worth plus a full filter set.
        assert!(limit >= COMMANDS_PER_SEC, "{limit}");
        assert!(rate > 0, "a 100,000-command burst must hit the rate limit");
        assert!(
            rss < rss_before + RSS_SLACK,
            "broker memory grew from {rss_before} to {rss} bytes"
        );
    });
}

/// 4. SUB/UNSUB churn from several DEALERs at once: every command answered
///    consistently, and the broker holds exactly what the replies add up to.
fn churn(broker: &ChildBroker, ctx: &zmq::Context, honest: &mut Honest) {
    const DEALERS: usize = 4;
    const CYCLES: usize = 1000;
    let mut rng = Rng::new(seed() ^ 0xc4u64);
    honest.during("SUB-UNSUB churn", || {
        let dealers: Vec<zmq::Socket> = (0..DEALERS)
            .map(|_| hostile_dealer(ctx, &broker.sub_endpoint))
            .collect();
        let commands: Vec<Vec<Vec<Vec<u8>>>> = (0..DEALERS)
            .map(|d| {
                // Overlapping with honest traffic too: churners get
                // deliveries between their replies.
                let pool: Vec<(&[u8], Vec<u8>)> = vec![
                    (b"exact", format!("churn.{d}.a").into_bytes()),
                    (b"prefix", format!("churn.{d}.").into_bytes()),
                    (b"pattern", format!("churn.*.{d}").into_bytes()),
                    (b"prefix", b"honest.".to_vec()),
                    (b"pattern", b"honest.>".to_vec()),
                ];
                (0..CYCLES)
                    .flat_map(|_| {
                        let (kind, text) = rng.pick(&pool).clone();
                        let sub = vec![b"SUB".to_vec(), kind.to_vec(), text];
                        let (kind, text) = rng.pick(&pool).clone();
                        let unsub = vec![b"UNSUB".to_vec(), kind.to_vec(), text];
                        [sub, unsub]
                    })
                    .collect()
            })
            .collect();
        let mut held: Vec<HashSet<Vec<Vec<u8>>>> = vec![HashSet::new(); DEALERS];
        let (mut rate_refused, mut not_subscribed) = (0u64, 0u64);
        let sockets: Vec<&zmq::Socket> = dealers.iter().collect();
        pipeline(&sockets, &commands, 32, |d, command, reply| {
            let filter = command[1..].to_vec();
            match (command[0].as_slice(), err_code(reply)) {
                _ if is_rate_refusal(reply) => rate_refused += 1,
                (b"SUB", None) => {
                    assert_eq!(reply, [&b"OK"[..], b"SUB", &filter[0], &filter[1]]);
                    held[d].insert(filter);
                }
                (b"UNSUB", None) => {
                    assert_eq!(reply, [&b"OK"[..], b"UNSUB", &filter[0], &filter[1]]);
                    assert!(held[d].remove(&filter), "UNSUB OK for a filter not held");
                }
                (b"UNSUB", Some(b"not-subscribed")) => {
                    assert!(!held[d].contains(&filter), "not-subscribed but held");
                    not_subscribed += 1;
                }
                _ => panic!("{command:?} -> {reply:?}"),
            }
        });
        let total: u64 = held.iter().map(|h| h.len() as u64).sum();
        eprintln!(
            "churn: {} commands, {rate_refused} refused by the rate limit, \
             {not_subscribed} not-subscribed, {total} filters held at the end",
            DEALERS * CYCLES * 2
        );
        keep_alive_until(
            broker,
            &sockets,
            "the broker to hold what the churners were confirmed",
            |m| {
                m.get(SUBSCRIBERS) == 1 + DEALERS as u64
                    && m.get(SUBSCRIPTIONS) == HONEST_FILTERS + total
            },
        );
    });
}

/// 5. Clients that connect and never speak: a raw TCP connection and a
///    DEALER that sends nothing. They hold a connection each but no broker
///    state, and the broker's timers go on around them.
fn silent_clients(broker: &ChildBroker, ctx: &zmq::Context, honest: &mut Honest) {
    let before = broker.fresh_metrics();
    honest.during("silent clients", || {
        let raw = TcpStream::connect(broker.sub_address()).unwrap();
        let mut mute = ctx.socket(zmq::DEALER).unwrap();
        mute.set_linger(0).unwrap();
        let events = monitor(ctx, &mute);
        mute.connect(&broker.sub_endpoint).unwrap();
        wait_event(
            &events,
            zmq::SocketEvent::HANDSHAKE_SUCCEEDED,
            "a mute DEALER",
        );
        // One that speaks once: its expiry proves a whole sub_timeout passed
        // (and a sweep ran) with the silent ones connected.
        let once = hostile_dealer(ctx, &broker.sub_endpoint);
        once.send_multipart([&b"SUB"[..], b"exact", b"silent.once"], 0)
            .unwrap();
        assert_eq!(
            once.recv_multipart(0).unwrap(),
            [&b"OK"[..], b"SUB", b"exact", b"silent.once"]
        );
        let m = broker.wait_for("the subscriber that spoke once to expire", |m| {
            m.since(&before, EXPIRED) == 1
                && m.get(SUBSCRIBERS) == 1
                && m.get(SUBSCRIPTIONS) == HONEST_FILTERS
        });
        assert_eq!(
            m.get(SUB_CONNECTIONS),
            4,
            "honest, raw, mute and once are connected"
        );
        stop_monitor(&mut mute);
        drop((raw, mute, once, events));
    });
}

/// 6. Thousands of connections opened and dropped, and DEALERs that
///    subscribe and vanish; they are cleaned up by expiry or EHOSTUNREACH.
fn connection_storm(broker: &ChildBroker, ctx: &zmq::Context, honest: &mut Honest) {
    /// Bad handshakes of each kind, on each endpoint.
    const REJECTED: usize = 750;
    /// Connections closed by the client straight away: few, see
    /// `raw_rejected` for why.
    const DROPPED: usize = 100;
    const DEALERS: usize = 300;
    let before = broker.fresh_metrics();
    honest.during("connection storm", || {
        let started = Instant::now();
        let wrong_mechanism = zmtp::greeting(b"CURVE");
        let mut wrong_type = zmtp::greeting(b"NULL");
        wrong_type.extend_from_slice(&zmtp::ready(b"PUB"));
        for address in [broker.sub_address(), broker.pub_address()] {
            for _ in 0..REJECTED {
                raw_rejected(address, &wrong_mechanism);
                raw_rejected(address, &wrong_type);
            }
        }
        for _ in 0..DROPPED {
            drop(TcpStream::connect(broker.sub_address()).expect("connect a raw TCP client"));
        }
        let raw_done = Instant::now();
        // All connected before any subscribes: each must be kept alive from
        // its first command on, and creating hundreds of sockets takes time.
        let dealers: Vec<zmq::Socket> = (0..DEALERS)
            .map(|_| hostile_dealer(ctx, &broker.sub_endpoint))
            .collect();
        for (i, dealer) in dealers.iter().enumerate() {
            // Half of them match honest traffic, so the broker learns they
            // are gone when a send fails; the rest must expire.
            let (kind, filter): (&[u8], Vec<u8>) = if i % 2 == 0 {
                (b"prefix", b"honest.".to_vec())
            } else {
                (b"exact", format!("storm.{i}").into_bytes())
            };
            dealer
                .send_multipart([&b"SUB"[..], kind, &filter], 0)
                .unwrap();
        }
        // Collect the OKs while pinging those already answered: a DEALER
        // left silent while others are read would expire.
        let mut confirmed = vec![false; DEALERS];
        let deadline = Instant::now() + DEADLINE;
        let mut last_ping = Instant::now();
        while confirmed.iter().any(|c| !c) {
            assert!(Instant::now() < deadline, "storm SUBs unanswered");
            let mut items: Vec<zmq::PollItem> = dealers
                .iter()
                .map(|d| d.as_poll_item(zmq::POLLIN))
                .collect();
            zmq::poll(&mut items, 20).unwrap();
            for (i, dealer) in dealers.iter().enumerate() {
                while let Ok(frames) = dealer.recv_multipart(zmq::DONTWAIT) {
                    if !confirmed[i] && !is_delivery_or_notice(&frames) {
                        assert_eq!(frames[..2], [&b"OK"[..], b"SUB"], "dealer {i}");
                        confirmed[i] = true;
                    }
                }
            }
            if last_ping.elapsed() >= PING_EVERY {
                for (dealer, _) in dealers.iter().zip(&confirmed).filter(|(_, c)| **c) {
                    let _ = dealer.send(protocol::PING, zmq::DONTWAIT);
                }
                last_ping = Instant::now();
            }
        }
        let sockets: Vec<&zmq::Socket> = dealers.iter().collect();
        keep_alive_until(broker, &sockets, "every storm DEALER held", |m| {
            m.get(SUBSCRIBERS) == 1 + DEALERS as u64
                && m.get(SUBSCRIPTIONS) == HONEST_FILTERS + DEALERS as u64
        });
        // Nothing in flight when they vanish: a command the broker reads
        // after its sender left makes a new (filterless) record for that
        // routing id, freed and counted once more, which would blur the
        // count below. A marker with a reply of its own says when all
        // their commands have been read.
        let marker: [&[u8]; 3] = [b"UNSUB", b"exact", b"storm.marker"];
        for dealer in &dealers {
            dealer.send_multipart(marker, 0).unwrap();
        }
        for dealer in &dealers {
            for _ in 0..10_000 {
                let frames = dealer.recv_multipart(0).expect("the marker's reply");
                if err_code(&frames) == Some(ErrorCode::NotSubscribed.as_bytes()) {
                    break;
                }
            }
        }
        drop(dealers);
        eprintln!(
            "connection storm: {} raw connections took {:.1} s, {DEALERS} DEALERs {:.1} s",
            4 * REJECTED + DROPPED,
            (raw_done - started).as_secs_f64(),
            raw_done.elapsed().as_secs_f64()
        );
        // With honest traffic still flowing, so that the broker keeps
        // routing to the vanished DEALERs that matched it.
        broker.wait_for("every storm DEALER forgotten", |m| {
            m.since(&before, EXPIRED) + m.since(&before, UNREACHABLE) >= DEALERS as u64
        });
    });
    let after = broker.fresh_metrics();
    eprintln!(
        "connection storm: {} expired, {} unreachable, {} handshake failures counted",
        after.since(&before, EXPIRED),
        after.since(&before, UNREACHABLE),
        after.since(&before, HANDSHAKE_FAILURES)
    );
    // Normally exactly DEALERS; more only if libzmq replaced a connection
    // (a DEALER in this process starved past the broker's ZMTP heartbeat
    // timeout reconnects as a new subscriber). The baseline check after the
    // scenario is what proves the cleanup.
    assert!(after.since(&before, EXPIRED) + after.since(&before, UNREACHABLE) >= DEALERS as u64);
    // libzmq 4.3 reports a mechanism mismatch as a failed handshake, but a
    // socket-type mismatch only as a disconnection, so the broker cannot
    // count those.
    assert!(
        after.since(&before, HANDSHAKE_FAILURES) >= (2 * REJECTED) as u64,
        "every wrong-mechanism handshake is counted"
    );
}

/// 7. A subscriber that sends commands but never reads its replies: the
///    command rate limit and `max_queued_replies` bound what the broker
///    holds for it, and the overflow is counted.
fn never_reads(broker: &ChildBroker, _ctx: &zmq::Context, honest: &mut Honest) {
    const BATCH: usize = 5000;
    const MAX_COMMANDS: usize = 2_000_000;
    // A subscriber may have a full re-subscribe's worth of replies queued
    // plus max_queued_replies; each costs its text plus a fixed 32 (see
    // broker.rs), and the longest text a PING can get is the rate-limit
    // refusal.
    let bound = ((MAX_FILTERS + MAX_QUEUED_REPLIES) * (32 + 128)) as u64;
    let before = broker.fresh_metrics();
    honest.during("never reads", || {
        let mut stream = zmtp::dealer(broker.sub_address());
        let batch = zmtp::pings(BATCH);
        let (mut sent, mut peak) = (0, 0);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Err(e) = stream.write_all(&batch) {
                let log = broker.log_lines();
                panic!(
                    "after {sent} PINGs the broker stopped reading commands ({e}): {:#?}",
                    &log[log.len().saturating_sub(20)..]
                );
            }
            sent += BATCH;
            let m = broker.metrics();
            peak = peak.max(m.get(QUEUED_BYTES));
            assert!(
                m.get(QUEUED_BYTES) <= bound,
                "queued {} bytes for one subscriber, bound {bound}",
                m.get(QUEUED_BYTES)
            );
            if m.since(&before, REPLIES_DROPPED) > 0 && m.since(&before, REFUSED_RATE) > 0 {
                eprintln!(
                    "never reads: {sent} PINGs, {} refused by the rate limit, {} replies \
                     dropped, at most {peak} bytes queued (bound {bound})",
                    m.since(&before, REFUSED_RATE),
                    m.since(&before, REPLIES_DROPPED)
                );
                break;
            }
            assert!(
                sent < MAX_COMMANDS && Instant::now() < deadline,
                "after {sent} PINGs the broker still drops no reply: {m:#?}"
            );
        }
    });
}

type Scenario = fn(&ChildBroker, &zmq::Context, &mut Honest);

#[test]
fn hostile_clients_cannot_hurt_honest_ones() {
    let scenarios: [(&str, Scenario); 7] = [
        ("random multipart", random_multipart),
        ("oversize frames", oversize_frames),
        ("SUB burst", sub_burst),
        ("SUB-UNSUB churn", churn),
        ("silent clients", silent_clients),
        ("connection storm", connection_storm),
        ("never reads", never_reads),
    ];
    let selected: Option<Vec<usize>> = std::env::var("ZBROKER_HOSTILE_SCENARIOS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let broker = start_broker(&[]);
    let ctx = zmq::Context::new();
    let (mut honest, _) = Honest::settle(&ctx, &broker);
    let rss_baseline = broker.rss();
    eprintln!("baseline: broker RSS {:.1} MiB", mib(rss_baseline));
    for (i, (name, scenario)) in scenarios.iter().enumerate() {
        if selected.as_ref().is_some_and(|s| !s.contains(&(i + 1))) {
            continue;
        }
        let started = Instant::now();
        scenario(&broker, &ctx, &mut honest);
        let after = broker.wait_for(&format!("the honest baseline after {name}"), at_baseline);
        honest.round(&format!("after {name}"));
        let (rss, peak) = broker.memory();
        eprintln!(
            "{name}: done in {:.1} s; broker RSS {:.1} MiB (peak {:.1} MiB); \
             {} queue-full drops, {} handshake failures so far",
            started.elapsed().as_secs_f64(),
            mib(rss),
            mib(peak),
            after.get(DROPPED_QUEUE_FULL),
            after.get(HANDSHAKE_FAILURES)
        );
    }
    let (rss, peak) = broker.memory();
    eprintln!(
        "memory: broker RSS {:.1} MiB at baseline, {:.1} MiB after every scenario, \
         peak {:.1} MiB; bound {:.1} MiB",
        mib(rss_baseline),
        mib(rss),
        mib(peak),
        mib(rss_baseline + RSS_SLACK)
    );
    assert!(
        rss <= rss_baseline + RSS_SLACK,
        "broker memory grew from {rss_baseline} to {rss} bytes"
    );
}

/// Failed handshakes are counted, and logged without flooding the log: any
/// peer that can reach the port can fail handshakes as fast as it connects,
/// and the broker rate-limits its logging of malformed input for exactly
/// this reason ("so a flood of bad input cannot turn into a flood of log
/// lines", broker.rs).
#[test]
fn bad_handshakes_do_not_flood_the_log() {
    const BAD: usize = 1000;
    let broker = start_broker(&[]);
    // Nothing has happened yet, so even a stale snapshot is exact.
    let before = broker.metrics();
    let lines_before = broker.log_lines().len();
    let greeting = zmtp::greeting(b"CURVE");
    for _ in 0..BAD {
        raw_rejected(broker.sub_address(), &greeting);
    }
    broker.wait_for("every bad handshake counted", |m| {
        m.since(&before, HANDSHAKE_FAILURES) >= BAD as u64
    });
    let log = broker.log_lines();
    let new = &log[lines_before..];
    eprintln!(
        "{} log lines for {BAD} bad handshakes, e.g. {:?}",
        new.len(),
        new.first()
    );
    assert!(
        new.len() < BAD / 10,
        "{} log lines for {BAD} failed handshakes: logging them is not rate-limited",
        new.len()
    );
}

/// The defences against floods (the command rate limit, the bound on
/// replies queued for a client) must still let an honest client re-subscribe
/// its whole filter set at once, as the Rust client does after reconnecting:
/// the rate limit's burst is sized for exactly that (broker.rs,
/// `take_command_token`). With the default limits, a client holding the
/// maximum number of filters re-subscribes after a broker restart and must
/// get every answer.
#[test]
fn an_honest_client_can_resubscribe_its_whole_filter_set() {
    use zbroker::client::{Event, ResyncReason, Subscriber};
    use zbroker::config::Config;
    use zbroker::filter::Filter;
    let defaults = Config::default();
    let filters = defaults.limits.max_filters_per_subscriber;
    for transport in common::TRANSPORTS {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            pub_bind: vec!["tcp://127.0.0.1:0".into()],
            sub_bind: vec![match transport {
                common::Transport::Tcp => "tcp://127.0.0.1:0".into(),
                common::Transport::Ipc => format!("ipc://{}/sub", dir.path().display()),
            }],
            linger: Duration::from_millis(100),
            ..Config::default()
        };
        let broker = common::TestBroker::start_on(config.clone(), None);
        let endpoint = broker.sub_endpoint.clone();
        let mut sub = Subscriber::connect(&endpoint).unwrap();
        for i in 0..filters {
            let filter = Filter::parse_cli(&format!("prefix:resync.{i}."), 1024).unwrap();
            sub.subscribe(&filter).unwrap();
        }
        broker.stop();
        // The same endpoint again: the client reconnects and re-subscribes.
        let config = Config {
            sub_bind: vec![endpoint.clone()],
            ..config
        };
        let broker = common::TestBroker::start_on(config, None);
        let deadline = Instant::now() + DEADLINE;
        loop {
            match sub.recv_timeout(Duration::from_millis(100)).unwrap() {
                Some(Event::Resync(ResyncReason::Reconnected)) => break,
                Some(other) => panic!("{transport:?}: unexpected {other:?}"),
                None => {}
            }
            let stats = broker.stats.snapshot();
            // A dropped OK is never answered again: the resync cannot end.
            assert_eq!(
                stats.counters.dropped_replies, 0,
                "{transport:?}: the broker dropped replies to an honest client re-subscribing \
                 its {filters} filters (max_queued_replies is {}): {stats:#?}",
                defaults.limits.max_queued_replies
            );
            assert!(
                Instant::now() < deadline,
                "{transport:?}: no resync: {stats:#?}"
            );
        }
        let stats = broker.wait_for(DEADLINE, "every filter held again", |s| {
            s.subscriptions == filters as u64
        });
        assert_eq!(stats.counters.refused_rate, 0, "{transport:?}");
    }
}

// ------------------------------------------- one attack, one broker, one test

/// Keeps hostile subscribers known to the broker from a thread of its own
/// (a PING each per `PING_EVERY`, replies read and discarded) while the test
/// thread does something else; counts any delivery they get.
struct KeepAlive {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(Vec<zmq::Socket>, u64)>>,
}

impl KeepAlive {
    fn start(sockets: Vec<zmq::Socket>) -> KeepAlive {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let limit = Instant::now() + Duration::from_secs(600);
            let mut deliveries = 0;
            while !stopped.load(Ordering::Acquire) && Instant::now() < limit {
                for socket in &sockets {
                    match socket.send(protocol::PING, zmq::DONTWAIT) {
                        Ok(()) | Err(zmq::Error::EAGAIN) => {}
                        Err(e) => panic!("hostile PING: {e}"),
                    }
                    for _ in 0..100_000 {
                        let Ok(frames) = socket.recv_multipart(zmq::DONTWAIT) else {
                            break;
                        };
                        let parts: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
                        if let Some(Reply::Message { .. }) = protocol::parse_reply(&parts) {
                            deliveries += 1;
                        }
                    }
                }
                // Pacing only, as the honest subscriber's.
                std::thread::sleep(PING_EVERY);
            }
            (sockets, deliveries)
        });
        KeepAlive {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops pinging; returns the sockets and how many deliveries they got.
    fn stop(mut self) -> (Vec<zmq::Socket>, u64) {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .expect("a running keep-alive")
            .join()
            .expect("the keep-alive thread")
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `count` copies of `segment` joined by `.`.
fn segments(segment: &[u8], count: usize) -> Vec<u8> {
    vec![segment; count].join(&b'.')
}

/// `[SUB, kind, filter]` for each filter.
fn sub_commands(kind: &[u8], filters: &[Vec<u8>]) -> Vec<Vec<Vec<u8>>> {
    filters
        .iter()
        .map(|f| vec![b"SUB".to_vec(), kind.to_vec(), f.clone()])
        .collect()
}

/// Sends one command and returns the broker's reply, skipping deliveries.
fn call(dealer: &zmq::Socket, command: &[&[u8]]) -> Vec<Vec<u8>> {
    dealer.send_multipart(command, 0).unwrap();
    for _ in 0..100_000 {
        let frames = dealer
            .recv_multipart(0)
            .expect("a reply within the timeout");
        if !is_delivery_or_notice(&frames) {
            return frames;
        }
    }
    panic!("no reply among 100,000 deliveries");
}

fn assert_ok(reply: &[Vec<u8>], verb: &[u8], kind: &[u8], filter: &[u8]) {
    assert!(
        reply == [&b"OK"[..], verb, kind, filter],
        "expected OK {} for a {}-byte filter, got {:?}",
        String::from_utf8_lossy(verb),
        filter.len(),
        reply
            .iter()
            .map(|f| String::from_utf8_lossy(&f[..f.len().min(80)]).into_owned())
            .collect::<Vec<_>>()
    );
}

/// `[ERR, limit, text]` with `text` containing `why`.
fn assert_limit(reply: &[Vec<u8>], why: &str) {
    let text = reply
        .get(2)
        .map(|t| String::from_utf8_lossy(t).into_owned());
    assert!(
        err_code(reply) == Some(ErrorCode::Limit.as_bytes())
            && text.as_deref().is_some_and(|t| t.contains(why)),
        "expected [ERR, limit, …{why}…], got {:?}",
        reply
            .iter()
            .map(|f| String::from_utf8_lossy(&f[..f.len().min(80)]).into_owned())
            .collect::<Vec<_>>()
    );
}

/// The event number in a monitor message.
fn event_of(frames: &[Vec<u8>]) -> u16 {
    u16::from_le_bytes([frames[0][0], frames[0][1]])
}

/// Waits until `dealer` is either disconnected (its monitor says so:
/// `false`) or has something to read (`true`).
fn refused_or_answered(dealer: &zmq::Socket, events: &zmq::Socket, what: &str) -> bool {
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(
            Instant::now() < deadline,
            "{what}: neither disconnected nor answered"
        );
        let mut items = [
            dealer.as_poll_item(zmq::POLLIN),
            events.as_poll_item(zmq::POLLIN),
        ];
        zmq::poll(&mut items, 100).unwrap();
        if items[0].is_readable() {
            return true;
        }
        while let Ok(frames) = events.recv_multipart(zmq::DONTWAIT) {
            if event_of(&frames) == zmq::SocketEvent::DISCONNECTED as u16 {
                return false;
            }
        }
    }
}

/// The exact attack on libzmq's ROUTER: a DEALER that chooses a routing id
/// the ROUTER will generate for a peer without one.
///
/// libzmq 4.3.4 names such a peer `0x00` + a 32-bit big-endian counter,
/// which starts at `generate_random()` (router.cpp), that is `rand() |
/// rand() << 31` (random.cpp). Nothing seeds `rand()`: libzmq's
/// `seed_random()` is called only by its own tests, and zbroker never calls
/// `srand`. glibc's unseeded `rand()` returns 1804289383 (0x6B8B4567), then
/// 846930886, which is even: its bit 0, shifted to bit 31, adds nothing. In
/// the broker the ROUTER is the first and only caller (the PULL and the
/// monitor sockets draw no random number; connecters do, for reconnect
/// jitter, but the broker only binds), so the first peer without an id gets
/// `00 6B 8B 45 67`, the next `…68`, and so on. Upstream, a DEALER holding
/// `00 6B 8B 45 67` makes the ROUTER assert in `add_out_pipe` (SIGABRT)
/// when the next peer without an id connects: this test fails on the
/// unpatched broker (worked out here, not run, as the unpatched broker is
/// not built; but the first generated id is checked below, on the broker's
/// own log). The DEALERs below hold the first 16 generated ids before any
/// peer without an id connects (a probe, then the honest subscriber), and
/// the next 16 during the honest traffic; the patched libzmq refuses any id
/// starting with `0x00` at the handshake.
#[test]
fn routing_id_collision_cannot_abort_the_broker() {
    const HOSTILE: u8 = 16;
    const FIRST_GENERATED: [u8; 5] = [0x00, 0x6B, 0x8B, 0x45, 0x67];
    for transport in common::TRANSPORTS {
        let dir = tempfile::tempdir().unwrap();
        let (pub_bind, sub_bind) = common::binds(transport, dir.path());
        let broker = start_broker(&[("--pub-bind", &pub_bind), ("--sub-bind", &sub_bind)]);
        // Nothing has happened yet, so even a stale snapshot is exact.
        let before = broker.metrics();
        let rss_before = broker.rss();
        let ctx = zmq::Context::new();
        let colliding = |ids: std::ops::Range<u8>| -> Vec<(zmq::Socket, zmq::Socket)> {
            ids.map(|i| {
                let mut id = FIRST_GENERATED;
                id[4] += i;
                let dealer = unconnected_dealer(&ctx);
                dealer.set_identity(&id).unwrap();
                let events = monitor(&ctx, &dealer);
                dealer.connect(&broker.sub_endpoint).unwrap();
                dealer.send(protocol::PING, zmq::DONTWAIT).unwrap();
                (dealer, events)
            })
            .collect()
        };
        let mut hostile = colliding(0..HOSTILE);
        // Each is refused (its monitor sees the broker hang up) or attached
        // and answered (a PONG, on the upstream libzmq): either way the
        // attack is in place before the honest subscriber connects.
        let answered: Vec<usize> = hostile
            .iter()
            .enumerate()
            .filter(|(i, (dealer, events))| {
                refused_or_answered(dealer, events, &format!("{transport:?} hostile DEALER {i}"))
            })
            .map(|(i, _)| i)
            .collect();
        // The reasoning above, checked on this broker: the first peer
        // without an id gets `00 6b 8b 45 67`, as the broker's log shows
        // for a command it refuses (upstream, this is where it aborts).
        let probe = hostile_dealer(&ctx, &broker.sub_endpoint);
        let reply = call(&probe, &[b"NOPE"]);
        assert!(err_code(&reply).is_some(), "{reply:?}");
        let first_id: String = FIRST_GENERATED.iter().map(|b| format!("{b:02x}")).collect();
        // No such line (the test fails, naming it) if the first generated
        // id is another.
        broker.wait_for_log_from(0, &format!("refused a command from {first_id}:"));
        let mut honest = Honest::start(&ctx, &broker);
        broker.assert_alive(&format!("{transport:?}: the honest subscriber connected"));
        honest.round("after colliding ids");
        let mut more = honest.during("more colliding ids", || {
            // The next generated ids, other ids starting with 0x00, and
            // peers without an id, which must get ids of their own.
            let mut more = colliding(HOSTILE..2 * HOSTILE);
            for id in [&[0u8][..], &[0, 0, 0, 0, 0], &[0, 1, 2]] {
                let dealer = unconnected_dealer(&ctx);
                dealer.set_identity(id).unwrap();
                let events = monitor(&ctx, &dealer);
                dealer.connect(&broker.sub_endpoint).unwrap();
                dealer.send(protocol::PING, zmq::DONTWAIT).unwrap();
                more.push((dealer, events));
            }
            for i in 0..4 {
                let dealer = hostile_dealer(&ctx, &broker.sub_endpoint);
                let reply = call(&dealer, &[protocol::PING]);
                assert_eq!(reply, [b"PONG"], "{transport:?}: id-less DEALER {i}");
            }
            let legal = unconnected_dealer(&ctx);
            legal.set_identity(b"\x01chosen").unwrap();
            legal.connect(&broker.sub_endpoint).unwrap();
            assert_eq!(
                call(&legal, &[protocol::PING]),
                [b"PONG"],
                "{transport:?}: a chosen id not starting with 0x00 is fine"
            );
            more
        });
        broker.assert_alive(&format!("{transport:?}: after more colliding ids"));
        honest.round("after more colliding ids");
        // Every one refused once more after reconnecting, its PING still
        // queued: never answered over two connections.
        let all: Vec<&(zmq::Socket, zmq::Socket)> = hostile.iter().chain(&more).collect();
        for (i, (dealer, events)) in all.iter().enumerate() {
            if i >= usize::from(HOSTILE) {
                assert!(
                    !refused_or_answered(dealer, events, "a later hostile DEALER"),
                    "{transport:?}: hostile DEALER {i} was answered"
                );
            }
            assert!(
                !refused_or_answered(dealer, events, "a reconnected hostile DEALER"),
                "{transport:?}: hostile DEALER {i} was answered after reconnecting"
            );
            assert!(
                matches!(
                    dealer.recv_multipart(zmq::DONTWAIT),
                    Err(zmq::Error::EAGAIN)
                ),
                "{transport:?}: hostile DEALER {i} got a reply"
            );
        }
        assert!(
            answered.is_empty(),
            "{transport:?}: hostile DEALERs {answered:?} were attached under a generated id"
        );
        // Each was refused at least twice by now; the broker counts a
        // refusal when it drains its monitor, which may be a tick later.
        let refusals = 2 * all.len() as u64;
        let after = broker.wait_for("every refusal to be counted", |m| {
            m.since(&before, HANDSHAKE_FAILURES) >= refusals
        });
        broker.assert_alive(&format!("{transport:?}: at the end"));
        let rss = broker.rss();
        assert!(
            rss < rss_before + RSS_SLACK,
            "{transport:?}: broker memory grew from {rss_before} to {rss} bytes"
        );
        assert!(
            broker
                .log_lines()
                .iter()
                .any(|l| l.contains("routing id starting with 0x00")),
            "{transport:?}: no log line names the refusal: {:#?}",
            broker.log_lines()
        );
        eprintln!(
            "routing id collision ({transport:?}): {} hostile DEALERs refused at least twice \
             each, {} handshake failures counted",
            all.len(),
            after.since(&before, HANDSHAKE_FAILURES),
        );
        // They go on reconnecting, and being refused, until closed.
        for (dealer, _) in hostile.iter_mut().chain(more.iter_mut()) {
            stop_monitor(dealer);
        }
    }
}

/// A pattern of 16 segments of 60 bytes (975 bytes), unique per `i`.
fn deep_pattern(i: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed() ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let segments: Vec<Vec<u8>> = (0..16)
        .map(|s| {
            let mut segment = if s == 0 {
                format!("{i:05}").into_bytes()
            } else {
                Vec::new()
            };
            while segment.len() < 60 {
                segment.push(b'a' + rng.below(26) as u8);
            }
            segment
        })
        .collect();
    segments.join(&b'.')
}

/// Deep patterns cost memory in proportion to their bytes, not their
/// segments, and the routing index as a whole is bounded in bytes. Before
/// the fix a 512-segment pattern cost a node per segment: 10,000 of them
/// took 1.4 GiB.
#[test]
fn deep_patterns_cost_memory_in_proportion() {
    const PATTERNS: usize = 10_000;
    /// What 10,000 filters of about 1 KiB, a node or two each, may cost in
    /// the index: generous.
    const INDEX_BOUND: u64 = 3 * PATTERNS as u64 * 1024;
    const INDEX_LIMIT: u64 = 1 << 20;
    /// One filter's worth of overshoot past `--max-index-bytes`.
    const OVERSHOOT: u64 = 4 << 10;
    let max_filters = PATTERNS.to_string();
    let index_limit = INDEX_LIMIT.to_string();
    let overrides = [
        ("--max-filter-len", "1024"),
        ("--max-filters-per-subscriber", max_filters.as_str()),
    ];
    let patterns: Vec<Vec<u8>> = (0..PATTERNS).map(deep_pattern).collect();
    assert_eq!(patterns[0].len(), 975);

    // (a) and (b): the segment cap, and memory in proportion.
    let broker = start_broker(&overrides);
    let ctx = zmq::Context::new();
    let (mut honest, baseline) = Honest::settle(&ctx, &broker);
    let rss_before = broker.rss();
    let dealer = honest.during("deep patterns", || {
        let dealer = hostile_dealer(&ctx, &broker.sub_endpoint);
        let deep = segments(b"a", 512);
        assert_eq!(deep.len(), 1023, "within --max-filter-len");
        let reply = call(&dealer, &[b"SUB", b"pattern", &deep]);
        assert_limit(&reply, "512 segments");
        let started = Instant::now();
        pipeline(
            &[&dealer],
            &[sub_commands(b"pattern", &patterns)],
            64,
            |_, command, reply| assert_ok(reply, b"SUB", b"pattern", &command[2]),
        );
        let held = keep_alive_until(&broker, &[&dealer], "every deep pattern held", |m| {
            m.get(SUBSCRIPTIONS) == HONEST_FILTERS + PATTERNS as u64
        });
        let (rss, peak) = broker.memory();
        let index = held.get(INDEX_HEAP_BYTES);
        let filter_bytes: usize = patterns.iter().map(Vec::len).sum();
        eprintln!(
            "deep patterns: {PATTERNS} patterns of 16 segments ({:.1} MiB of filter text) \
             confirmed in {:.1} s; index {:.1} MiB (bound {:.1} MiB); broker RSS {:.1} -> \
             {:.1} MiB (+{:.1} MiB, peak {:.1} MiB)",
            mib(filter_bytes as u64),
            started.elapsed().as_secs_f64(),
            mib(index),
            mib(INDEX_BOUND),
            mib(rss_before),
            mib(rss),
            mib(rss.saturating_sub(rss_before)),
            mib(peak)
        );
        assert_eq!(held.since(&baseline, REFUSED_LIMIT), 1, "the deep one");
        assert!(
            index < INDEX_BOUND,
            "the index holds {index} bytes for {filter_bytes} bytes of filters"
        );
        assert!(
            rss < rss_before + RSS_SLACK,
            "broker memory grew from {rss_before} to {rss} bytes"
        );
        dealer
    });
    honest.round("after deep patterns");
    drop(dealer);
    // Forgotten after --sub-timeout: the index gives all of it back.
    broker.wait_for("the deep patterns freed", |m| {
        at_baseline(m) && m.get(INDEX_HEAP_BYTES) == baseline.get(INDEX_HEAP_BYTES)
    });
    honest.round("after the deep patterns were freed");
    broker.assert_alive("deep patterns");
    drop(honest);
    drop(broker);

    // (c) The index's byte limit: confirmed until passed, then refused.
    let mut limited = overrides.to_vec();
    limited.push(("--max-index-bytes", index_limit.as_str()));
    let broker = start_broker(&limited);
    let (mut honest, baseline) = Honest::settle(&ctx, &broker);
    let rss_before = broker.rss();
    honest.during("index byte limit", || {
        let dealer = hostile_dealer(&ctx, &broker.sub_endpoint);
        let (mut confirmed, mut refused) = (0u64, 0u64);
        // Twice what fits.
        let commands = sub_commands(b"pattern", &patterns[..2 * INDEX_LIMIT as usize / 1000]);
        pipeline(&[&dealer], &[commands], 64, |_, command, reply| {
            if err_code(reply).is_some() {
                assert_limit(reply, "index");
                refused += 1;
            } else {
                assert_eq!(refused, 0, "a SUB confirmed after one was refused");
                assert_ok(reply, b"SUB", b"pattern", &command[2]);
                confirmed += 1;
            }
        });
        // Another subscriber is refused as well, even for a short filter.
        let other = hostile_dealer(&ctx, &broker.sub_endpoint);
        assert_limit(&call(&other, &[b"SUB", b"exact", b"short"]), "index");
        let held = keep_alive_until(
            &broker,
            &[&dealer, &other],
            "the confirmed patterns held and every refusal counted",
            // The snapshot is a tick old at worst: wait for one taken after
            // the last refusal, then check the count is exact.
            |m| {
                m.get(SUBSCRIPTIONS) == HONEST_FILTERS + confirmed
                    && m.since(&baseline, REFUSED_LIMIT) > refused
            },
        );
        let index = held.get(INDEX_HEAP_BYTES);
        let rss = broker.rss();
        eprintln!(
            "index byte limit: {confirmed} patterns confirmed, {refused} refused (+1 from \
             another subscriber); index {index} bytes (limit {INDEX_LIMIT}); broker RSS \
             +{:.1} MiB",
            mib(rss.saturating_sub(rss_before))
        );
        assert!(refused > 0, "the limit was never reached");
        assert_eq!(held.since(&baseline, REFUSED_LIMIT), refused + 1);
        assert!(rss < rss_before + RSS_SLACK, "{rss_before} -> {rss}");
        assert!(
            (INDEX_LIMIT..=INDEX_LIMIT + OVERSHOOT).contains(&index),
            "the index holds {index} bytes with --max-index-bytes {INDEX_LIMIT}"
        );
    });
    honest.round("after the index byte limit");
    broker.assert_alive("index byte limit");
}

/// Publishes `topics` (each with `payload`) from `push` in `chunk`s, each
/// followed by `fence`,
/// which only `fence_sub` holds, and returns the broker CPU time it took to
/// route them all: one publisher's messages are routed in order, so the
/// fence arriving proves the chunk before it was routed.
fn cpu_to_route(
    broker: &ChildBroker,
    push: &zmq::Socket,
    fence_sub: &zmq::Socket,
    topics: &[Vec<u8>],
    payload: &[u8],
    chunk: usize,
    fence: &[u8],
) -> Duration {
    let mut cpu = Duration::ZERO;
    for topics in topics.chunks(chunk) {
        // It has no other keep-alive; the PONG is skipped below.
        fence_sub.send(protocol::PING, 0).unwrap();
        let before = broker.cpu();
        for topic in topics {
            common::publish(push, topic, payload);
        }
        common::publish(push, fence, b"fence");
        let mut fenced = false;
        for _ in 0..100_000 {
            let frames = fence_sub
                .recv_multipart(0)
                .expect("the fence within the timeout");
            let parts: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            match protocol::parse_reply(&parts) {
                Some(Reply::Message { topic, .. }) if topic == fence => {
                    fenced = true;
                    break;
                }
                Some(Reply::Pong) => {}
                _ => panic!("the fence subscriber got {frames:?}"),
            }
        }
        assert!(fenced, "no fence among 100,000 messages");
        cpu += broker.cpu() - before;
    }
    cpu
}

/// Patterns built to follow every topic segment but the last cost bounded
/// CPU per publish at the default cap of 16 segments. Before the cap, a
/// publish against 500-segment patterns cost 4.8 ms.
#[test]
fn patterns_that_never_match_cost_bounded_cpu() {
    /// Every `x.x.….x.nomatch` with 15 `x` in `a` or `*` there are 32,768;
    /// these take the first 10,000, on four connections.
    const PATTERNS: usize = 10_000;
    const CONNECTIONS: usize = 4;
    const PUBLISHES: usize = 2000;
    /// Generous: about 10 to 50 µs are expected (see the report); 1 ms
    /// leaves a margin of 20x or more for a debug build on a busy machine.
    const CPU_PER_PUBLISH: Duration = Duration::from_millis(1);
    let per_connection = (PATTERNS / CONNECTIONS).to_string();
    let broker = start_broker(&[
        ("--max-filters-per-subscriber", &per_connection),
        // Room for a 500-segment pattern, so that the segment cap refuses it.
        ("--max-filter-len", "1024"),
    ]);
    let ctx = zmq::Context::new();
    let (mut honest, baseline) = Honest::settle(&ctx, &broker);
    let patterns: Vec<Vec<u8>> = (0..PATTERNS)
        .map(|i| {
            let mut segments: Vec<&[u8]> = (0..15)
                .map(|bit| if i >> bit & 1 == 1 { &b"*"[..] } else { b"a" })
                .collect();
            segments.push(b"nomatch");
            segments.join(&b'.')
        })
        .collect();
    let topic = segments(b"a", 16);
    let rss_before = broker.rss();
    honest.during("patterns that never match", || {
        let dealers: Vec<zmq::Socket> = (0..CONNECTIONS)
            .map(|_| hostile_dealer(&ctx, &broker.sub_endpoint))
            .collect();
        let sockets: Vec<&zmq::Socket> = dealers.iter().collect();
        let commands: Vec<Vec<Vec<Vec<u8>>>> = patterns
            .chunks(PATTERNS / CONNECTIONS)
            .map(|chunk| sub_commands(b"pattern", chunk))
            .collect();
        pipeline(&sockets, &commands, 64, |_, command, reply| {
            assert_ok(reply, b"SUB", b"pattern", &command[2]);
        });
        keep_alive_until(&broker, &sockets, "every pattern held", |m| {
            m.get(SUBSCRIPTIONS) == HONEST_FILTERS + PATTERNS as u64
        });
        let keep_alive = KeepAlive::start(dealers);
        let fence_sub = hostile_dealer(&ctx, &broker.sub_endpoint);
        let reply = call(&fence_sub, &[b"SUB", b"exact", b"cpu.fence"]);
        assert_ok(&reply, b"SUB", b"exact", b"cpu.fence");
        let deep = segments(b"a", 500);
        assert_limit(
            &call(&fence_sub, &[b"SUB", b"pattern", &deep]),
            "500 segments",
        );
        let push = common::publisher(&ctx, &broker.pub_endpoint);

        let before = broker.fresh_metrics();
        let same: Vec<Vec<u8>> = vec![topic.clone(); PUBLISHES];
        let cpu = cpu_to_route(
            &broker,
            &push,
            &fence_sub,
            &same,
            b"x",
            PUBLISHES,
            b"cpu.fence",
        );
        let per_publish = cpu / PUBLISHES as u32;
        // The same attack with a new topic each time, past the match cache:
        // each walks every pattern node. Measured, not bounded: about 10 ms
        // each in a debug build, 0.6 ms in a release one. In chunks of 10
        // with a fence after each: 200 at once hold the broker's loop for
        // two seconds, and the commands it reads after such a batch are
        // stamped with the time the batch began, so every subscriber, the
        // honest one included, expires (--sub-timeout is 1 s here).
        let varied: Vec<Vec<u8>> = (0..PUBLISHES / 10)
            .map(|i| {
                let mut t = segments(b"a", 15);
                t.extend_from_slice(format!(".{i}").as_bytes());
                t
            })
            .collect();
        let varied_cpu = cpu_to_route(&broker, &push, &fence_sub, &varied, b"x", 10, b"cpu.fence");
        let after = broker.fresh_metrics();
        let (_, deliveries) = keep_alive.stop();
        let rss = broker.rss();
        eprintln!(
            "patterns that never match: {PATTERNS} patterns on {CONNECTIONS} connections; \
             {PUBLISHES} publishes of {} cost {:.3} s of broker CPU, {:.1} µs each (bound \
             {CPU_PER_PUBLISH:?}); {} publishes of a new topic each cost {:.1} µs each; \
             clock ticks {}/s; broker RSS +{:.1} MiB",
            String::from_utf8_lossy(&topic),
            cpu.as_secs_f64(),
            per_publish.as_secs_f64() * 1e6,
            varied.len(),
            (varied_cpu / varied.len() as u32).as_secs_f64() * 1e6,
            procfs::clock_ticks_per_sec(),
            mib(rss.saturating_sub(rss_before))
        );
        assert!(rss < rss_before + RSS_SLACK, "{rss_before} -> {rss}");
        assert_eq!(deliveries, 0, "a pattern ending in `nomatch` matched");
        assert_eq!(
            after.get(SUBSCRIPTIONS),
            HONEST_FILTERS + PATTERNS as u64 + 1,
            "the hostile patterns were held throughout"
        );
        assert!(
            after.since(&before, PUBLISHED) >= (PUBLISHES + varied.len()) as u64,
            "every hostile publish was routed"
        );
        assert!(
            per_publish < CPU_PER_PUBLISH,
            "{per_publish:?} of broker CPU per publish"
        );
    });
    honest.round("after patterns that never match");
    broker.wait_for("the hostile patterns freed", |m| {
        at_baseline(m) && m.get(INDEX_HEAP_BYTES) == baseline.get(INDEX_HEAP_BYTES)
    });
    broker.assert_alive("patterns that never match");
}

/// Runs `zbroker run ARGS` and expects it to refuse to start, naming each
/// of `mentions` on stderr.
fn refuses_to_start(args: &[&str], mentions: &[&str]) {
    let mut command = child::zbroker(&[
        "run",
        "--pub-bind",
        "tcp://127.0.0.1:0",
        "--sub-bind",
        "tcp://127.0.0.1:0",
        "--metrics-bind",
        "127.0.0.1:0",
    ]);
    let out = common::run_to_exit(command.args(args), Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "zbroker run {args:?} started: {stderr}"
    );
    for mention in mentions {
        assert!(
            stderr.contains(mention),
            "zbroker run {args:?} failed without naming {mention}: {stderr}"
        );
    }
}

/// The settings that bound a pattern's depth have upper bounds of their
/// own, and at those bounds deep patterns are held, matched and removed.
#[test]
fn deep_pattern_removal_and_length_bounds() {
    // (a) Settings past their bounds are refused at start.
    refuses_to_start(
        &["--max-filter-len", "262144"],
        &["max_filter_len", "65536"],
    );
    refuses_to_start(&["--max-topic-len", "65537"], &["max_topic_len", "65536"]);
    refuses_to_start(
        &["--max-pattern-segments", "1025"],
        &["max_pattern_segments", "1024"],
    );
    refuses_to_start(&["--max-message-size", "0"], &["max_message_size"]);
    refuses_to_start(
        &["--max-message-size", &((1u64 << 30) + 1).to_string()],
        &["max_message_size"],
    );

    // (b) At the bounds.
    const SEGMENTS: usize = 1024;
    let broker = start_broker(&[
        ("--max-filter-len", "65536"),
        ("--max-topic-len", "65536"),
        ("--max-pattern-segments", &SEGMENTS.to_string()),
        // A 64 KiB filter must reach the broker.
        ("--max-message-size", "131072"),
    ]);
    let ctx = zmq::Context::new();
    let (mut honest, baseline) = Honest::settle(&ctx, &broker);
    let rss_before = broker.rss();
    honest.during("deep pattern removal", || {
        let dealer = hostile_dealer(&ctx, &broker.sub_endpoint);
        let literal = segments(b"a", SEGMENTS);
        let wild = segments(b"*", SEGMENTS);
        for pattern in [&literal, &wild] {
            assert_ok(
                &call(&dealer, &[b"SUB", b"pattern", pattern]),
                b"SUB",
                b"pattern",
                pattern,
            );
        }
        // Matched at full depth: one delivery for both patterns.
        let push = common::publisher(&ctx, &broker.pub_endpoint);
        common::publish(&push, &literal, b"deep");
        let frames = dealer.recv_multipart(0).expect("the deep delivery");
        let parts: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        assert!(
            matches!(
                protocol::parse_reply(&parts),
                Some(Reply::Message { seq: 1, topic, payload: b"deep" }) if topic == literal
            ),
            "not the deep delivery: {} parts",
            frames.len()
        );
        // 32,768 segments (65,535 bytes): within --max-filter-len, over
        // --max-pattern-segments.
        let deepest = segments(b"a", 32 * SEGMENTS);
        assert_eq!(deepest.len(), 65_535);
        assert_limit(
            &call(&dealer, &[b"SUB", b"pattern", &deepest]),
            "32768 segments",
        );
        let held = keep_alive_until(&broker, &[&dealer], "both deep patterns held", |m| {
            m.get(SUBSCRIPTIONS) == HONEST_FILTERS + 2
        });
        for pattern in [&literal, &wild] {
            // PONGs to keep_alive_until's PINGs aside, only the reply: a
            // second delivery would show here.
            dealer
                .send_multipart([&b"UNSUB"[..], b"pattern", pattern], 0)
                .unwrap();
            let reply = (0..100)
                .map(|_| dealer.recv_multipart(0).expect("the UNSUB's reply"))
                .find(|reply| reply != &[b"PONG"])
                .expect("a reply other than PONG");
            assert_ok(&reply, b"UNSUB", b"pattern", pattern);
        }
        let freed = keep_alive_until(&broker, &[&dealer], "the deep patterns removed", |m| {
            m.get(SUBSCRIPTIONS) == HONEST_FILTERS
        });
        let (rss, peak) = broker.memory();
        eprintln!(
            "deep pattern removal: two {SEGMENTS}-segment patterns held (index {} bytes), \
             matched and removed (index {} bytes, baseline {}); broker RSS +{:.1} MiB (peak \
             {:.1} MiB)",
            held.get(INDEX_HEAP_BYTES),
            freed.get(INDEX_HEAP_BYTES),
            baseline.get(INDEX_HEAP_BYTES),
            mib(rss.saturating_sub(rss_before)),
            mib(peak)
        );
        assert_eq!(
            freed.get(INDEX_HEAP_BYTES),
            baseline.get(INDEX_HEAP_BYTES),
            "the index gave back what the deep patterns took"
        );
        assert_eq!(freed.since(&baseline, REFUSED_LIMIT), 1);
        assert!(rss < rss_before + RSS_SLACK, "{rss_before} -> {rss}");
    });
    honest.round("after deep pattern removal");
    broker.wait_for("the honest baseline again", at_baseline);
    broker.assert_alive("deep pattern removal");
}

/// A socket of `kind` connected to `endpoint` that never reconnects (so
/// that each drop is one connection, counted once), with a monitor, after
/// its handshake.
fn one_shot(
    ctx: &zmq::Context,
    kind: zmq::SocketType,
    endpoint: &str,
) -> (zmq::Socket, zmq::Socket) {
    let socket = ctx.socket(kind).unwrap();
    socket.set_linger(0).unwrap();
    socket.set_rcvhwm(0).unwrap();
    socket.set_sndtimeo(10_000).unwrap();
    socket.set_reconnect_ivl(-1).unwrap();
    let events = monitor(ctx, &socket);
    socket.connect(endpoint).unwrap();
    wait_event(
        &events,
        zmq::SocketEvent::HANDSHAKE_SUCCEEDED,
        "a one-shot socket",
    );
    (socket, events)
}

/// Sends up to `parts` empty message parts, each flagged MORE, never a last
/// one, in raw ZMTP 3.0 framing over `stream` (a libzmq client cannot: it
/// puts nothing of a message on the wire before its last part); stops when
/// the broker hangs up, and checks that it does. Returns how many were
/// written.
fn endless_message(stream: &mut TcpStream, parts: usize) -> usize {
    const BATCH: usize = 1000;
    let batch: Vec<u8> = [0x01, 0x00].repeat(BATCH);
    let mut sent = 0;
    while sent < parts {
        match stream.write_all(&batch) {
            Ok(()) => sent += BATCH,
            // Broken pipe or reset: the broker hung up.
            Err(_) => break,
        }
    }
    let mut sink = [0u8; 4096];
    for _ in 0..1000 {
        match std::io::Read::read(stream, &mut sink) {
            Ok(0) => return sent,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return sent,
            Err(e) => panic!("the broker did not hang up on an endless message: {e}"),
        }
    }
    panic!("the broker kept talking to an endless message");
}

/// Messages of more parts than protocol v1 ever uses, endless ones
/// included, drop their sender instead of growing libzmq's pipe (before the
/// fix: +627 MB from 20 MB of empty parts); so does a part over
/// `--max-message-size`, now counted.
#[test]
fn endless_multipart_messages_are_bounded() {
    const PARTS: usize = 100_000;
    /// Generous for a handful of dropped connections.
    const RSS_BOUND: u64 = 16 << 20;
    let broker = start_broker(&[]);
    let ctx = zmq::Context::new();
    let (mut honest, _) = Honest::settle(&ctx, &broker);
    let before = broker.fresh_metrics();
    let rss_before = broker.rss();
    honest.during("endless multipart", || {
        // An endless publish.
        let mut push = zmtp::connect(broker.pub_address(), b"PUSH");
        let sent = endless_message(&mut push, PARTS);
        drop(push);
        let m = broker.wait_for("the endless publisher dropped", |m| {
            m.since(&before, MULTIPART_PUB) >= 1
        });
        eprintln!("endless multipart: a PUSH wrote {sent} parts before it was dropped");
        assert_eq!(m.since(&before, MULTIPART_PUB), 1);

        // An endless command.
        let mut dealer = zmtp::dealer(broker.sub_address());
        let sent = endless_message(&mut dealer, PARTS);
        drop(dealer);
        let m = broker.wait_for("the endless subscriber dropped", |m| {
            m.since(&before, MULTIPART_SUB) >= 1
        });
        eprintln!("endless multipart: a DEALER wrote {sent} parts before it was dropped");
        assert_eq!(m.since(&before, MULTIPART_SUB), 1);

        // 17 parts, one more than the broker's libzmq takes.
        let (mut push, events) = one_shot(&ctx, zmq::PUSH, &broker.pub_endpoint);
        let parts: Vec<&[u8]> = vec![b"hostile.parts"; 17];
        push.send_multipart(parts, 0).unwrap();
        wait_event(&events, zmq::SocketEvent::DISCONNECTED, "a 17-part publish");
        stop_monitor(&mut push);
        drop((push, events));
        let m = broker.wait_for("the 17-part publisher dropped", |m| {
            m.since(&before, MULTIPART_PUB) >= 2
        });
        assert_eq!(m.since(&before, MULTIPART_PUB), 2);

        // A part over --max-message-size.
        let (mut push, events) = one_shot(&ctx, zmq::PUSH, &broker.pub_endpoint);
        push.send_multipart([&b"hostile.big"[..], &[7; MAX_MESSAGE_SIZE + 1]], 0)
            .unwrap();
        wait_event(
            &events,
            zmq::SocketEvent::DISCONNECTED,
            "an oversize publish",
        );
        stop_monitor(&mut push);
        drop((push, events));
        let m = broker.wait_for("the oversize publisher dropped", |m| {
            m.since(&before, OVERSIZE_PUB) >= 1
        });
        assert_eq!(m.since(&before, OVERSIZE_PUB), 1);
    });
    honest.round("after endless multipart");
    let after = broker.wait_for("the honest baseline again", at_baseline);
    let (rss, peak) = broker.memory();
    eprintln!(
        "endless multipart: multipart drops {} publisher, {} subscriber; oversize drops {} \
         publisher; nothing published or malformed from them ({} malformed); broker RSS \
         +{:.1} MiB (peak {:.1} MiB, bound +{:.0} MiB)",
        after.since(&before, MULTIPART_PUB),
        after.since(&before, MULTIPART_SUB),
        after.since(&before, OVERSIZE_PUB),
        after.since(&before, MALFORMED_PUBLISHES) + after.since(&before, MALFORMED_COMMANDS),
        mib(rss.saturating_sub(rss_before)),
        mib(peak),
        mib(RSS_BOUND)
    );
    // Dropped peers' incomplete messages are rolled back: the broker never
    // sees a part of them.
    assert_eq!(after.since(&before, MALFORMED_PUBLISHES), 0);
    assert_eq!(after.since(&before, MALFORMED_COMMANDS), 0);
    assert!(
        rss < rss_before + RSS_BOUND,
        "broker memory grew from {rss_before} to {rss} bytes"
    );
    broker.assert_alive("endless multipart");
}

/// Large messages to a subscriber that stopped reading stay within the
/// bytes configured for libzmq's pipe and the broker's queue; the rest are
/// dropped and counted. Before the fix libzmq's pipe, bounded in messages
/// only, held all 300 MiB.
#[test]
fn large_messages_to_a_stalled_subscriber_stay_within_bytes() {
    const MESSAGES: usize = 300;
    const SIZE: usize = 1 << 20;
    const SUB_HWM_BYTES: u64 = 4 << 20;
    const QUEUE_BYTES: u64 = 8 << 20;
    /// libzmq takes a message, once begun, whole: the pipe may pass its
    /// bound by one message, plus the topic and header bytes.
    const PIPE_BOUND: u64 = SUB_HWM_BYTES + SIZE as u64 + (64 << 10);
    let broker = start_broker(&[
        ("--max-message-size", "2097152"),
        ("--sub-hwm-bytes", &SUB_HWM_BYTES.to_string()),
        ("--queue-max-bytes", &QUEUE_BYTES.to_string()),
        ("--queue-max-total-bytes", "16777216"),
    ]);
    let ctx = zmq::Context::new();
    let (mut honest, baseline) = Honest::settle(&ctx, &broker);
    assert_eq!(baseline.get(LIBZMQ_QUEUED_BYTES), 0);
    let rss_before = broker.rss();
    // The stalled subscriber: subscribes, reads the OK, and never reads
    // again; it keeps PINGing (writing only), so that the broker keeps it.
    let mut stalled = zmtp::dealer(broker.sub_address());
    stalled
        .write_all(&zmtp::message(&[b"SUB", b"prefix", b"big."]))
        .unwrap();
    assert_eq!(
        zmtp::read_message(&mut stalled),
        [&b"OK"[..], b"SUB", b"prefix", b"big."]
    );
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let mut stream = stalled.try_clone().unwrap();
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || {
            let limit = Instant::now() + Duration::from_secs(600);
            while !stopped.load(Ordering::Acquire) && Instant::now() < limit {
                stream
                    .write_all(&zmtp::pings(1))
                    .expect("the stalled subscriber's PING");
                // Pacing only.
                std::thread::sleep(PING_EVERY);
            }
        })
    };
    let fence_sub = hostile_dealer(&ctx, &broker.sub_endpoint);
    assert_ok(
        &call(&fence_sub, &[b"SUB", b"exact", b"stall.fence"]),
        b"SUB",
        b"exact",
        b"stall.fence",
    );
    let before = broker.fresh_metrics();
    let measured = honest.during("stalled subscriber", || {
        let push = common::publisher(&ctx, &broker.pub_endpoint);
        // Its own queue short: the broker's side is what is measured.
        push.set_sndhwm(16).unwrap();
        let payload = vec![0x5a; SIZE];
        let started = Instant::now();
        let cpu = cpu_to_route(
            &broker,
            &push,
            &fence_sub,
            &vec![b"big.x".to_vec(); MESSAGES],
            &payload,
            MESSAGES,
            b"stall.fence",
        );
        let m = broker.fresh_metrics();
        let (rss, peak) = broker.memory();
        eprintln!(
            "stalled subscriber: {MESSAGES} x 1 MiB routed in {:.1} s ({:.2} s of broker CPU); \
             libzmq pipes {:.2} MiB \
             (bound {:.2} MiB), broker queue {:.2} MiB (bound {:.0} MiB), {} dropped (queue \
             full); broker RSS +{:.1} MiB (peak {:.1} MiB)",
            started.elapsed().as_secs_f64(),
            cpu.as_secs_f64(),
            mib(m.get(LIBZMQ_QUEUED_BYTES)),
            mib(PIPE_BOUND),
            mib(m.get(QUEUED_BYTES)),
            mib(QUEUE_BYTES),
            m.since(&before, DROPPED_QUEUE_FULL),
            mib(rss.saturating_sub(rss_before)),
            mib(peak)
        );
        (m, rss, peak)
    });
    let (m, rss, _) = measured;
    assert!(
        m.get(LIBZMQ_QUEUED_BYTES) <= PIPE_BOUND,
        "libzmq's pipes hold {} bytes",
        m.get(LIBZMQ_QUEUED_BYTES)
    );
    assert!(
        m.get(LIBZMQ_QUEUED_BYTES) >= SUB_HWM_BYTES / 2,
        "the stalled subscriber's pipe is not full: the gauge reads {}",
        m.get(LIBZMQ_QUEUED_BYTES)
    );
    assert!(
        m.get(QUEUED_BYTES) <= QUEUE_BYTES,
        "the broker queues {} bytes",
        m.get(QUEUED_BYTES)
    );
    assert!(m.since(&before, DROPPED_QUEUE_FULL) > 0, "nothing dropped");
    assert!(
        rss < rss_before + RSS_SLACK,
        "broker memory grew from {rss_before} to {rss} bytes"
    );
    honest.round("with a stalled subscriber");
    stop.store(true, Ordering::Release);
    pinger.join().unwrap();
    drop(stalled);
    drop(fence_sub);
    broker.wait_for("the stalled subscriber freed", |m| {
        at_baseline(m) && m.get(LIBZMQ_QUEUED_BYTES) == 0
    });
    honest.round("after the stalled subscriber");
    broker.assert_alive("stalled subscriber");
}

/// Whether the broker has closed `stream`: reads what is there without
/// waiting (a ZMTP greeting, from a connection libzmq kept) until EOF, a
/// reset, or nothing more for now.
fn closed_by_peer(mut stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let mut sink = [0u8; 512];
    for _ in 0..1000 {
        match std::io::Read::read(&mut stream, &mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) => panic!("reading a held connection: {e}"),
        }
    }
    panic!("a held connection kept talking");
}

/// A brand-new subscriber connects, subscribes and is answered.
fn newcomer_works(ctx: &zmq::Context, broker: &ChildBroker, what: &str) {
    let dealer = hostile_dealer(ctx, &broker.sub_endpoint);
    assert_ok(
        &call(&dealer, &[b"SUB", b"exact", b"newcomer"]),
        b"SUB",
        b"exact",
        b"newcomer",
    );
    assert_eq!(call(&dealer, &[protocol::PING]), [b"PONG"], "{what}");
}

/// Connections past what the broker can hold: past `--max-connections` they
/// are closed at once and counted; past the descriptor limit the broker
/// neither spins (upstream libzmq retries a failing `accept` at once, at
/// 100 % CPU) nor loses its honest clients or its metrics.
#[test]
fn descriptor_exhaustion_does_not_spin_or_starve() {
    // (a) The connection cap.
    const CAP: usize = 64;
    const HELD: usize = 200;
    let broker = start_broker(&[("--max-connections", &CAP.to_string())]);
    let ctx = zmq::Context::new();
    let (mut honest, _) = Honest::settle(&ctx, &broker);
    let before = broker.fresh_metrics();
    let rss_before = broker.rss();
    let mut streams = honest.during("connection cap", || {
        let streams: Vec<TcpStream> = (0..HELD)
            .map(|_| TcpStream::connect(broker.sub_address()).expect("connect"))
            .collect();
        // Each is either live (as is the honest subscriber) or refused.
        let m = broker.wait_for("every held connection accepted or refused", |m| {
            m.since(&before, REFUSED_CONNECTIONS_SUB) + m.get(SUB_CONNECTIONS) == HELD as u64 + 1
        });
        let refused = m.since(&before, REFUSED_CONNECTIONS_SUB);
        let closed = streams.iter().filter(|s| closed_by_peer(s)).count();
        eprintln!(
            "connection cap: {HELD} connections held, {refused} refused by the broker, \
             {closed} seen closed; {} live on the subscriber endpoint (cap {CAP})",
            m.get(SUB_CONNECTIONS)
        );
        // A connection joins the count a libzmq command after its accept,
        // so a burst may overshoot the cap by the few accepted in between
        // (stream_listener_base.cpp); exactly 137 are refused without it.
        assert!(refused >= 100, "{refused} refused");
        assert!(
            m.get(SUB_CONNECTIONS) <= CAP as u64 + 8,
            "{} live connections with --max-connections {CAP}",
            m.get(SUB_CONNECTIONS)
        );
        assert_eq!(closed as u64, refused, "each refused connection is closed");
        streams
    });
    honest.round("at the connection cap");
    streams.clear();
    broker.wait_for("the held connections gone", at_baseline);
    newcomer_works(&ctx, &broker, "after the connection cap");
    honest.round("after the connection cap");
    let rss = broker.rss();
    assert!(rss < rss_before + RSS_SLACK, "{rss_before} -> {rss}");
    broker.assert_alive("connection cap");
    drop(honest);
    drop(broker);

    // (b) Out of descriptors.
    const FILES: u32 = 256;
    const CONNECTIONS: usize = 600;
    const WINDOW: Duration = Duration::from_secs(2);
    /// Upstream spins one core: 2 s of CPU in 2 s. A quarter of that is
    /// generous for honest traffic, pings and 10 accept retries a second.
    const CPU_BOUND: Duration = Duration::from_millis(500);
    let broker = start_broker_with_file_limit(FILES, &[]);
    let (mut honest, before) = Honest::settle(&ctx, &broker);
    let rss_before = broker.rss();
    let address = broker.sub_address();
    let log_before = broker.log_lines().len();
    let streams = honest.during("out of descriptors", || {
        // Non-blocking connects: once the broker stops accepting, its
        // backlog fills and later connects wait for the SYN to be answered.
        let streams: Vec<mio::net::TcpStream> = (0..CONNECTIONS)
            .map(|_| mio::net::TcpStream::connect(address).expect("start a connect"))
            .collect();
        // The broker says so in its log, which needs no descriptor (and
        // fails the test if the broker dies first).
        let logged = broker.wait_for_log_from(log_before, "cannot accept");
        // A measurement window, not a wait for anything.
        let cpu_before = broker.cpu();
        std::thread::sleep(WINDOW);
        let cpu = broker.cpu() - cpu_before;
        eprintln!(
            "out of descriptors: {CONNECTIONS} connections against ulimit -n {FILES}, {} \
             descriptors open in the broker; broker CPU {:.2} s over {:.0} s (bound {:.2} s); \
             log: {:?}",
            broker.proc().descriptors(),
            cpu.as_secs_f64(),
            WINDOW.as_secs_f64(),
            CPU_BOUND.as_secs_f64(),
            logged.last()
        );
        assert!(
            cpu < CPU_BOUND,
            "{cpu:?} of CPU in {WINDOW:?}: the broker spins"
        );
        streams
    });
    honest.round("out of descriptors");
    broker.assert_alive("out of descriptors");
    drop(streams);
    // The exporter took the same EMFILE; it must answer again.
    broker.metrics_eventually();
    let after = broker.wait_for("the connections gone", at_baseline);
    eprintln!(
        "out of descriptors: {} failed accepts counted on the subscriber endpoint",
        after.since(&before, ACCEPT_FAILURES_SUB)
    );
    assert!(after.since(&before, ACCEPT_FAILURES_SUB) > 0);
    honest.round("after running out of descriptors");
    newcomer_works(&ctx, &broker, "after running out of descriptors");
    let rss = broker.rss();
    assert!(rss < rss_before + RSS_SLACK, "{rss_before} -> {rss}");
    broker.assert_alive("after running out of descriptors");
}

/// A peer that never sends a valid command has no record in the broker,
/// hence no token bucket of its own: its garbage draws on one bucket that
/// all such strangers share, and past it goes unanswered (counted), so
/// answering garbage costs the broker no more than `--max-commands-per-sec`
/// replies a second.
#[test]
fn garbage_from_a_stranger_is_rate_limited() {
    const GARBAGE: usize = 20_000;
    /// Replies in flight when the count is read, and timing.
    const SLACK: f64 = 100.0;
    let broker = start_broker(&[("--max-commands-per-sec", &COMMANDS_PER_SEC.to_string())]);
    let ctx = zmq::Context::new();
    let (mut honest, _) = Honest::settle(&ctx, &broker);
    let before = broker.fresh_metrics();
    let rss_before = broker.rss();
    honest.during("garbage from a stranger", || {
        let stranger = hostile_dealer(&ctx, &broker.sub_endpoint);
        let mut replies = 0u64;
        let drain = |replies: &mut u64| {
            for _ in 0..100_000 {
                let Ok(frames) = stranger.recv_multipart(zmq::DONTWAIT) else {
                    return;
                };
                assert!(
                    err_code(&frames).is_some(),
                    "garbage answered with {frames:?}"
                );
                *replies += 1;
            }
        };
        let started = Instant::now();
        let deadline = started + Duration::from_secs(60);
        let mut sent = 0;
        // As fast as libzmq takes them, never waiting for a reply.
        while sent < GARBAGE {
            assert!(Instant::now() < deadline, "sent only {sent}");
            match stranger.send(&b"NOPE"[..], zmq::DONTWAIT) {
                Ok(()) => sent += 1,
                Err(zmq::Error::EAGAIN) => {
                    let mut items = [stranger.as_poll_item(zmq::POLLOUT)];
                    zmq::poll(&mut items, 100).unwrap();
                }
                Err(e) => panic!("garbage send: {e}"),
            }
            drain(&mut replies);
        }
        // Every piece read by the broker, answered or not.
        let m = broker.wait_for("every piece of garbage read", |m| {
            m.since(&before, MALFORMED_COMMANDS) >= GARBAGE as u64
        });
        let elapsed = started.elapsed().as_secs_f64();
        let malformed = m.since(&before, MALFORMED_COMMANDS);
        let rate_refused = m.since(&before, REFUSED_RATE);
        assert_eq!(malformed, GARBAGE as u64, "only the stranger sent garbage");
        // Those answered are all on their way: wait for each of them.
        let answered = malformed - rate_refused;
        while replies < answered {
            assert!(
                Instant::now() < deadline,
                "{replies} of {answered} replies arrived"
            );
            let mut items = [stranger.as_poll_item(zmq::POLLIN)];
            zmq::poll(&mut items, 100).unwrap();
            drain(&mut replies);
        }
        let bound = COMMANDS_PER_SEC as f64 * (1.0 + elapsed) + SLACK;
        let rss = broker.rss();
        eprintln!(
            "garbage from a stranger: {GARBAGE} malformed commands in {elapsed:.2} s; {replies} \
             answered (bound {bound:.0}), {rate_refused} dropped by the rate limit; broker RSS \
             +{:.1} MiB",
            mib(rss.saturating_sub(rss_before))
        );
        assert_eq!(replies, answered, "answered garbage is counted as such");
        assert!(
            (replies as f64) <= bound,
            "{replies} replies to garbage in {elapsed:.2} s"
        );
        assert!(rate_refused as f64 >= GARBAGE as f64 - bound);
        assert!(rss < rss_before + RSS_SLACK, "{rss_before} -> {rss}");
    });
    honest.round("after garbage from a stranger");
    broker.wait_for("the honest baseline again", at_baseline);
    broker.assert_alive("garbage from a stranger");
}
