//! The forwarding path, at two levels.
//!
//! 1. `forwarding/core_*`: the sans-IO core (`Broker`) routing one message to
//!    1, 10, 100 and 1,000 matching subscribers.
//!    - `core_router_inproc`: `Broker<Frame>` sending through the real
//!      `RouterTransport` on a ROUTER socket with that many DEALER peers over
//!      `inproc://`. This is the broker's hot loop minus the receive: match,
//!      seq, header part, routing-id part and a shared payload handed to
//!      libzmq per delivery.
//!    - `core_router_inproc_batched`: the same, the way the server routes:
//!      [`BATCH`] messages through `route_publish`, then `send_routed`
//!      sends each subscriber's deliveries in a row.
//!    - `core_null`: `Broker<Rc<[u8]>>` with a transport that only says
//!      `Sent`, so the difference between the two is what libzmq costs.
//!
//!    Peers' queues grow while the core sends (no HWM), so they are drained
//!    after every timed batch, outside the timing, and every seq is checked.
//!
//! 2. `forwarding/broker`: the whole broker in-process (`Server::bind` +
//!    `run()` on its own thread), 1 publisher to 1 and to 10 subscribers,
//!    64-byte payloads, over `inproc://` and `ipc://`: the time from the
//!    first publish until every subscriber has received every message. A
//!    lost message or a seq gap panics: a lossy run is not a throughput.
//!
//! Criterion's `time` is per published message; `thrpt` counts deliveries
//! (message × subscriber), so 1/thrpt is the time per delivery.

use std::hint::black_box;
use std::rc::Rc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use zbroker::broker::{Broker, SendOutcome, Transport};
use zbroker::config::{BrokerConfig, Config};
use zbroker::frame::Frame;
use zbroker::metrics::Snapshot;
use zbroker::protocol;
use zbroker::server::{RouterTransport, Server, Stopper};

/// 56 bytes, 4 segments: a Dragonflow-like object event.
const TOPIC: &[u8] = b"neutron.port.6f1c2a9e-3b7d-4e58-9a0c-d2e4f6a8b1c3.update";
const PAYLOAD_LEN: usize = 64;
/// Longest a single blocking receive may wait before the bench gives up.
const RECV_TIMEOUT_MS: i32 = 10_000;
/// Messages routed before `send_routed` in the batched variant (the
/// server reads up to 512, the core sends after 4,096 deliveries).
const BATCH: u64 = 32;

// ---------------------------------------------------------------------------
// 1. The core through the real ROUTER transport, and through a null one
// ---------------------------------------------------------------------------

/// A `Broker<Frame>` whose subscribers are live DEALER peers of a ROUTER on
/// inproc, set up as in `tests/allocations.rs`.
struct RouterRig {
    // Field order is drop order: sockets before their context.
    peers: Vec<zmq::Socket>,
    router: zmq::Socket,
    _context: zmq::Context,
    broker: Broker<Frame>,
    /// `[topic, payload]` as published: each publish hands the core fresh
    /// shares in `frames`, as each receive hands the server new parts (the
    /// core takes the parts it routes).
    message: [Frame; 2],
    frames: [Frame; 2],
    now: Instant,
    /// Seq the next delivery to every peer carries.
    next_seq: u64,
    /// Reused receive buffer for draining.
    scratch: zmq::Message,
}

impl RouterRig {
    fn new(subscribers: usize) -> RouterRig {
        let context = zmq::Context::new();
        let mut router = context.socket(zmq::ROUTER).unwrap();
        router.set_router_mandatory(true).unwrap();
        // Unbounded pipes: the bench measures the direct path, never EAGAIN.
        router.set_sndhwm(0).unwrap();
        let endpoint = format!("inproc://forwarding-core-{subscribers}");
        router.bind(&endpoint).unwrap();
        let peers: Vec<zmq::Socket> = (0..subscribers)
            .map(|i| {
                let peer = context.socket(zmq::DEALER).unwrap();
                peer.set_identity(format!("peer-{i}").as_bytes()).unwrap();
                peer.set_rcvhwm(0).unwrap();
                peer.set_rcvtimeo(RECV_TIMEOUT_MS).unwrap();
                peer.set_linger(0).unwrap();
                peer.connect(&endpoint).unwrap();
                peer.send("PING", 0).unwrap();
                peer
            })
            .collect();
        let now = Instant::now();
        let mut broker: Broker<Frame> = Broker::new(BrokerConfig::default(), now);
        // Reading each peer's PING proves it is attached; its routing id then
        // subscribes as the server would.
        for _ in 0..subscribers {
            let frames = router.recv_multipart(0).unwrap();
            broker.on_command(
                &frames[0],
                None,
                &[b"SUB", b"prefix", b"neutron.port."],
                3,
                now,
                &mut RouterTransport::new(&mut router),
            );
        }
        for peer in &peers {
            assert_eq!(peer.recv_multipart(0).unwrap()[0], b"OK");
        }
        RouterRig {
            peers,
            router,
            _context: context,
            broker,
            message: [
                Frame::from_slice(TOPIC),
                Frame::from_slice(&[0xab; PAYLOAD_LEN]),
            ],
            frames: [Frame::new(), Frame::new()],
            now,
            next_seq: 1,
            scratch: zmq::Message::new(),
        }
    }

    /// Fills `frames` with the next message, as a receive would.
    fn receive(&mut self) {
        for (frame, part) in self.frames.iter_mut().zip(&mut self.message) {
            *frame = part.share();
        }
    }

    fn publish(&mut self) {
        self.receive();
        let routed = self.broker.on_publish(
            None,
            &mut self.frames,
            2,
            self.now,
            &mut RouterTransport::new(&mut self.router),
        );
        if routed != Ok(self.peers.len()) {
            panic!("routed {routed:?}, expected {}", self.peers.len());
        }
    }

    /// Routes `count` messages in batches of [`BATCH`], sending after each.
    fn publish_batched(&mut self, count: u64) {
        for i in 0..count {
            self.receive();
            let mut transport = RouterTransport::new(&mut self.router);
            let routed =
                self.broker
                    .route_publish(None, &mut self.frames, 2, self.now, &mut transport);
            if routed != Ok(self.peers.len()) {
                panic!("routed {routed:?}, expected {}", self.peers.len());
            }
            if (i + 1) % BATCH == 0 {
                self.broker.send_routed(&mut transport);
            }
        }
        self.broker
            .send_routed(&mut RouterTransport::new(&mut self.router));
    }

    /// Reads the `count` deliveries each peer got, checking their seqs, so
    /// queues do not grow from one sample to the next.
    fn drain(&mut self, count: u64) {
        for (i, peer) in self.peers.iter().enumerate() {
            for seq in self.next_seq..self.next_seq + count {
                peer.recv(&mut self.scratch, 0)
                    .unwrap_or_else(|e| panic!("peer {i} missing seq {seq}: {e}"));
                let got = protocol::parse_header(&self.scratch).map(|(s, _)| s);
                assert_eq!(got, Some(seq), "peer {i}");
                peer.recv(&mut self.scratch, 0).unwrap();
                assert_eq!(self.scratch.len(), PAYLOAD_LEN);
            }
        }
        self.next_seq += count;
        let counters = self.broker.counters();
        assert_eq!(counters.delivered, counters.routed, "nothing queued");
    }
}

/// The transport that costs nothing: what is left is the core.
struct NullTransport;

impl Transport<Rc<[u8]>> for NullTransport {
    fn deliver(
        &mut self,
        routing_id: &[u8],
        seq: u64,
        topic: &[u8],
        payload: &mut Rc<[u8]>,
        _: bool,
    ) -> SendOutcome {
        black_box((routing_id, seq, topic, &*payload));
        SendOutcome::Sent
    }
    fn reply(&mut self, routing_id: &[u8], frames: &[&[u8]]) -> SendOutcome {
        black_box((routing_id, frames));
        SendOutcome::Sent
    }
}

fn null_broker(subscribers: usize) -> (Broker<Rc<[u8]>>, Instant) {
    let now = Instant::now();
    let mut broker = Broker::new(BrokerConfig::default(), now);
    for i in 0..subscribers {
        // Same shape as libzmq's generated routing ids: 5 bytes.
        let id = [0, (i >> 24) as u8, (i >> 16) as u8, (i >> 8) as u8, i as u8];
        broker.on_command(
            &id,
            None,
            &[b"SUB", b"prefix", b"neutron.port."],
            3,
            now,
            &mut NullTransport,
        );
    }
    assert_eq!(broker.subscriber_count(), subscribers);
    (broker, now)
}

fn core(c: &mut Criterion) {
    let mut group = c.benchmark_group("forwarding");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for subscribers in [1usize, 10, 100, 1_000] {
        group.throughput(Throughput::Elements(subscribers as u64));

        let (mut broker, now) = null_broker(subscribers);
        let mut frames: [Rc<[u8]>; 2] = [Rc::from(TOPIC), Rc::from(&[0xab; PAYLOAD_LEN][..])];
        group.bench_function(BenchmarkId::new("core_null", subscribers), |b| {
            b.iter(|| broker.on_publish(None, &mut frames, 2, now, &mut NullTransport))
        });
        assert_eq!(broker.counters().dropped_queue_full, 0);
        drop(broker);

        let mut rig = RouterRig::new(subscribers);
        group.bench_function(BenchmarkId::new("core_router_inproc", subscribers), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    rig.publish();
                }
                let elapsed = start.elapsed();
                rig.drain(iters);
                elapsed
            })
        });
        group.bench_function(
            BenchmarkId::new("core_router_inproc_batched", subscribers),
            |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    rig.publish_batched(iters);
                    let elapsed = start.elapsed();
                    rig.drain(iters);
                    elapsed
                })
            },
        );
    }
    group.finish();
}

// ---------------------------------------------------------------------------
// 2. The whole broker, in-process
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Endpoint {
    Inproc,
    Ipc,
}

/// A running broker with one raw PUSH publisher and `n` raw DEALER
/// subscribers holding `prefix ""`, driven from one thread so the bench
/// takes a single core beside the broker's on a 2-core machine.
struct BrokerRig {
    // Field order is drop order: the clients close before the server stops
    // (a DEALER whose connection dies under it with a full receive queue
    // can abort, libzmq#3937), and before their context.
    publisher: zmq::Socket,
    subscribers: Vec<zmq::Socket>,
    _client_context: zmq::Context,
    stopper: Stopper,
    thread: Option<JoinHandle<Snapshot>>,
    _dir: Option<tempfile::TempDir>,
    /// Messages published so far; the next one's number (in its payload).
    published: u64,
    /// Per subscriber, the seq its next delivery must carry.
    next_seq: Vec<u64>,
    header: zmq::Message,
    payload: zmq::Message,
}

impl BrokerRig {
    fn start(endpoint: Endpoint, subscribers: usize) -> BrokerRig {
        let mut config = Config {
            // No PINGs are sent while measuring; never expire anyone.
            sub_timeout: Duration::from_secs(3600),
            linger: Duration::from_millis(100),
            ..Config::default()
        };
        // Room for whatever a sample publishes, so nothing is ever dropped
        // while subscribers fall behind.
        config.queue.max_messages = 10_000_000;
        config.queue.max_bytes = 1 << 30;
        config.queue.max_total_bytes = 8 << 30;
        let dir = match endpoint {
            Endpoint::Inproc => {
                config.pub_bind = vec![format!("inproc://bench-pub-{subscribers}")];
                config.sub_bind = vec![format!("inproc://bench-sub-{subscribers}")];
                None
            }
            Endpoint::Ipc => {
                let dir = tempfile::tempdir().expect("create a temp dir");
                config.pub_bind = vec![format!("ipc://{}/pub", dir.path().display())];
                config.sub_bind = vec![format!("ipc://{}/sub", dir.path().display())];
                Some(dir)
            }
        };
        let server = Server::bind(config).expect("bind the broker");
        // inproc endpoints exist only inside the server's context; over ipc
        // the clients get their own, as separate processes would.
        let client_context = match endpoint {
            Endpoint::Inproc => server.context(),
            Endpoint::Ipc => zmq::Context::new(),
        };
        let pub_endpoint = server.pub_endpoint().to_string();
        let sub_endpoint = server.sub_endpoint().to_string();
        let stopper = server.stopper();
        let thread = std::thread::spawn(move || server.run().expect("broker loop"));

        let subscribers: Vec<zmq::Socket> = (0..subscribers)
            .map(|_| {
                let socket = client_context.socket(zmq::DEALER).unwrap();
                socket.set_linger(0).unwrap();
                socket.set_rcvtimeo(RECV_TIMEOUT_MS).unwrap();
                socket.connect(&sub_endpoint).unwrap();
                socket
                    .send_multipart([&b"SUB"[..], b"prefix", b""], 0)
                    .unwrap();
                socket
            })
            .collect();
        for socket in &subscribers {
            let reply = socket.recv_multipart(0).expect("OK within the timeout");
            assert_eq!(reply, [&b"OK"[..], b"SUB", b"prefix", b""]);
        }
        let publisher = client_context.socket(zmq::PUSH).unwrap();
        publisher.set_linger(0).unwrap();
        publisher.connect(&pub_endpoint).unwrap();
        let next_seq = vec![1; subscribers.len()];
        BrokerRig {
            publisher,
            subscribers,
            _client_context: client_context,
            stopper,
            thread: Some(thread),
            _dir: dir,
            published: 0,
            next_seq,
            header: zmq::Message::new(),
            payload: zmq::Message::new(),
        }
    }

    /// Publishes `count` messages and returns once every subscriber has
    /// received all of them, checking each seq and payload number.
    fn run(&mut self, count: u64) -> Duration {
        let first = self.published;
        let end = first + count;
        let mut remaining = count * self.subscribers.len() as u64;
        let mut payload = [0u8; PAYLOAD_LEN];
        let deadline =
            Instant::now() + Duration::from_secs(30) + Duration::from_micros(count * 200);
        let start = Instant::now();
        while remaining > 0 {
            let mut progress = false;
            while self.published < end {
                payload[..8].copy_from_slice(&self.published.to_be_bytes());
                match self.publisher.send(TOPIC, zmq::SNDMORE | zmq::DONTWAIT) {
                    Ok(()) => {}
                    Err(zmq::Error::EAGAIN) => break,
                    Err(e) => panic!("publish: {e}"),
                }
                // Once the first part is in, libzmq takes the rest of the
                // message whatever the high-water mark.
                self.publisher
                    .send(&payload[..], zmq::DONTWAIT)
                    .expect("the second part of a started message");
                self.published += 1;
                progress = true;
            }
            for (i, socket) in self.subscribers.iter().enumerate() {
                loop {
                    match socket.recv(&mut self.header, zmq::DONTWAIT) {
                        Ok(()) => {}
                        Err(zmq::Error::EAGAIN) => break,
                        Err(e) => panic!("subscriber {i}: {e}"),
                    }
                    socket.recv(&mut self.payload, 0).expect("the payload part");
                    let seq = self.next_seq[i];
                    let got = protocol::parse_header(&self.header);
                    if got != Some((seq, TOPIC)) {
                        panic!("subscriber {i} expected seq {seq}, got {got:?}: lost messages");
                    }
                    // seq n is the n-th message published since it subscribed.
                    assert_eq!(self.payload[..8], (seq - 1).to_be_bytes(), "subscriber {i}");
                    self.next_seq[i] += 1;
                    remaining -= 1;
                    progress = true;
                }
            }
            if !progress {
                assert!(
                    Instant::now() < deadline,
                    "gave up: {remaining} deliveries of {count} messages missing ({} published); next seqs {:?}",
                    self.published - first,
                    self.next_seq
                );
                self.wait_for_io(self.published < end);
            }
        }
        start.elapsed()
    }

    /// Blocks until a subscriber can read or the publisher can write, at
    /// most 100 ms (the caller checks its deadline).
    fn wait_for_io(&self, sending: bool) {
        let mut items: Vec<zmq::PollItem> = self
            .subscribers
            .iter()
            .map(|s| s.as_poll_item(zmq::POLLIN))
            .collect();
        if sending {
            items.push(self.publisher.as_poll_item(zmq::POLLOUT));
        }
        zmq::poll(&mut items, 100).expect("zmq_poll");
    }

    /// Closes the clients, stops the broker and checks it dropped nothing.
    fn stop(mut self) {
        drop(std::mem::take(&mut self.subscribers));
        self.stopper.stop();
        let snapshot = self
            .thread
            .take()
            .expect("running")
            .join()
            .expect("broker thread");
        let counters = &snapshot.counters;
        assert_eq!(counters.dropped_queue_full, 0, "{snapshot:#?}");
        assert_eq!(counters.published, self.published, "{snapshot:#?}");
    }
}

fn whole_broker(c: &mut Criterion) {
    let mut group = c.benchmark_group("forwarding/broker");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for endpoint in [Endpoint::Inproc, Endpoint::Ipc] {
        for subscribers in [1usize, 10] {
            group.throughput(Throughput::Elements(subscribers as u64));
            let mut rig = BrokerRig::start(endpoint, subscribers);
            let name = format!("{endpoint:?}").to_lowercase();
            group.bench_function(BenchmarkId::new(name, format!("1to{subscribers}")), |b| {
                b.iter_custom(|iters| rig.run(iters))
            });
            rig.stop();
        }
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    core(&mut c);
    whole_broker(&mut c);
    c.final_summary();
}
