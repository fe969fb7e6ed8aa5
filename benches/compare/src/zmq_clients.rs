//! ZeroMQ clients: zbroker in every configuration (PUSH publishers, DEALER
//! subscribers speaking protocol v1), the brokerless ceiling (PUSH→PULL, or PUB→SUB for fan-out)
//! and libzmq's XSUB/XPUB proxy (PUB publishers, SUB subscribers).
//!
//! Subscribers are spread over two threads, each polling its share of the
//! sockets with `zmq::poll` and draining every readable socket into two
//! reused `zmq::Message`s: no allocation per message on the receive path.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::servers::{ProxyTuning, Server, is_proxy, speaks_v1};
use crate::session::{PubSink, Subs};
use crate::shared::Shared;
use crate::util::{Ctx, free_port, now_ns};
use crate::workload::Workload;

/// Subscriber threads per session (the machine has two cores).
pub const SUB_THREADS: usize = 2;

/// High-water mark of every load-generator socket (publishers' SNDHWM,
/// subscribers' RCVHWM), so the load generator itself never drops: what is
/// lost is lost in the system under test. The brokers' own sockets keep
/// their defaults (libzmq's 1,000; zbroker's `--pub-hwm 1000` and
/// `--sub-hwm 3000` plus its queue), or zbroker's for `proxy-tuned`.
pub const CLIENT_HWM: i32 = 100_000;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// `[MSG|seq|topic, payload]` deliveries and `[OK, ...]` replies.
    Zbroker,
    /// `[topic, payload]`.
    Plain,
}

pub struct ZPub {
    // Field order is drop order: the socket closes before the context.
    sock: zmq::Socket,
    topics: Vec<Vec<u8>>,
    _ctx: Arc<Ctx>,
}

impl PubSink for ZPub {
    #[inline]
    fn send(&mut self, topic: usize, payload: &[u8]) {
        self.sock
            .send(&self.topics[topic][..], zmq::SNDMORE)
            .expect("send topic");
        self.sock.send(payload, 0).expect("send payload");
    }
}

fn zerr(what: &str) -> impl Fn(zmq::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Whether `system` is one of the ZeroMQ systems [`open`] handles.
pub fn handles(system: &str) -> bool {
    speaks_v1(system) || is_proxy(system) || system == "direct"
}

/// Opens publishers and subscribers for `system` (a zbroker configuration,
/// "direct", "proxy" or "proxy-tuned"); returns once every subscription is confirmed (zbroker) or
/// requested (the others; the warm-up then proves them).
pub fn open(
    system: &str,
    wl: &Workload,
    server: &mut Server,
    shared: &Arc<Shared>,
) -> Result<(Vec<Box<dyn PubSink>>, Subs), String> {
    let pub_ctx = Arc::new(Ctx::new(1, 1024));
    let sub_ctx = Arc::new(Ctx::new(1, 65536));
    let mut pubs: Vec<Box<dyn PubSink>> = Vec::new();
    let mut direct_endpoints = Vec::new();
    let zbroker = speaks_v1(system);
    for p in 0..wl.pubs {
        let topics = wl
            .warm_topics(p)
            .into_iter()
            .map(String::into_bytes)
            .collect();
        let sock = match system {
            _ if zbroker => {
                let s = pub_ctx.socket(zmq::PUSH);
                s.connect(&format!(
                    "tcp://127.0.0.1:{}",
                    server.node_port(wl.pub_node(p), 0)
                ))
                .map_err(zerr("connect PUSH"))?;
                s
            }
            _ if is_proxy(system) => {
                let s = pub_ctx.socket(zmq::PUB);
                s.connect(&format!("tcp://127.0.0.1:{}", server.ports[0]))
                    .map_err(zerr("connect PUB"))?;
                s
            }
            "direct" => {
                let kind = if wl.direct_is_pubsub() {
                    zmq::PUB
                } else {
                    zmq::PUSH
                };
                let s = pub_ctx.socket(kind);
                let ep = format!("tcp://127.0.0.1:{}", free_port());
                s.bind(&ep).map_err(zerr("bind direct publisher"))?;
                direct_endpoints.push(ep);
                s
            }
            other => return Err(format!("not a zmq system: {other}")),
        };
        sock.set_sndhwm(CLIENT_HWM).map_err(zerr("set SNDHWM"))?;
        pubs.push(Box::new(ZPub {
            sock,
            topics,
            _ctx: Arc::clone(&pub_ctx),
        }));
    }

    let mut socks = Vec::with_capacity(wl.subs);
    for s in 0..wl.subs {
        let topics = wl.sub_topics(s);
        let sock = match system {
            _ if zbroker => {
                let d = sub_ctx.socket(zmq::DEALER);
                d.set_rcvhwm(CLIENT_HWM).map_err(zerr("set RCVHWM"))?;
                d.connect(&format!(
                    "tcp://127.0.0.1:{}",
                    server.node_port(wl.sub_node(s), 1)
                ))
                .map_err(zerr("connect DEALER"))?;
                for t in &topics {
                    d.send_multipart([&b"SUB"[..], b"exact", t.as_bytes()], 0)
                        .map_err(zerr("send SUB"))?;
                }
                d
            }
            _ if is_proxy(system) => {
                let d = sub_ctx.socket(zmq::SUB);
                d.set_rcvhwm(CLIENT_HWM).map_err(zerr("set RCVHWM"))?;
                d.connect(&format!("tcp://127.0.0.1:{}", server.ports[1]))
                    .map_err(zerr("connect SUB"))?;
                for t in &topics {
                    d.set_subscribe(t.as_bytes()).map_err(zerr("subscribe"))?;
                }
                d
            }
            _ => {
                if wl.direct_is_pubsub() {
                    let d = sub_ctx.socket(zmq::SUB);
                    d.set_rcvhwm(CLIENT_HWM).map_err(zerr("set RCVHWM"))?;
                    for t in &topics {
                        d.set_subscribe(t.as_bytes()).map_err(zerr("subscribe"))?;
                    }
                    for ep in &direct_endpoints {
                        d.connect(ep).map_err(zerr("connect SUB"))?;
                    }
                    d
                } else {
                    let d = sub_ctx.socket(zmq::PULL);
                    d.set_rcvhwm(CLIENT_HWM).map_err(zerr("set RCVHWM"))?;
                    for ep in &direct_endpoints {
                        d.connect(ep).map_err(zerr("connect PULL"))?;
                    }
                    d
                }
            }
        };
        socks.push((s, sock));
    }
    let proto = if zbroker {
        wait_oks(wl, &socks, Duration::from_secs(60))?;
        Proto::Zbroker
    } else {
        Proto::Plain
    };
    shared.subscribed.store(wl.subs, Relaxed);

    let threads = SUB_THREADS.min(wl.subs);
    let mut groups: Vec<Vec<(usize, zmq::Socket)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, s) in socks.into_iter().enumerate() {
        groups[i % threads].push(s);
    }
    let handles = groups
        .into_iter()
        .enumerate()
        .map(|(t, group)| {
            let shared = Arc::clone(shared);
            let ctx = Arc::clone(&sub_ctx);
            std::thread::Builder::new()
                .name(format!("zsub-{t}"))
                .spawn(move || {
                    poller(group, proto, &shared, t);
                    drop(ctx);
                })
                .expect("spawn subscriber thread")
        })
        .collect();
    Ok((pubs, Subs::Threads(Arc::clone(shared), handles)))
}

/// Reads zbroker's replies until every `SUB` is answered `OK`.
fn wait_oks(
    wl: &Workload,
    socks: &[(usize, zmq::Socket)],
    timeout: Duration,
) -> Result<(), String> {
    let mut missing: Vec<usize> = socks.iter().map(|(s, _)| wl.sub_topics(*s).len()).collect();
    let mut left: usize = missing.iter().sum();
    let deadline = Instant::now() + timeout;
    while left > 0 {
        if Instant::now() > deadline {
            return Err(format!(
                "zbroker: {left} SUB commands unanswered after {timeout:?}"
            ));
        }
        let mut items: Vec<zmq::PollItem> = socks
            .iter()
            .map(|(_, s)| s.as_poll_item(zmq::POLLIN))
            .collect();
        zmq::poll(&mut items, 100).map_err(zerr("poll"))?;
        for (i, item) in items.iter().enumerate() {
            if !item.is_readable() {
                continue;
            }
            while let Ok(parts) = socks[i].1.recv_multipart(zmq::DONTWAIT) {
                match parts.first().map(Vec::as_slice) {
                    Some(b"OK") => {
                        missing[i] -= 1;
                        left -= 1;
                    }
                    Some(b"ERR") => {
                        let text: Vec<String> = parts
                            .iter()
                            .map(|p| String::from_utf8_lossy(p).into())
                            .collect();
                        return Err(format!("zbroker refused a SUB: {text:?}"));
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// Receives on `group` until `shared.stop`.
///
/// One epoll set over the sockets' `ZMQ_FD`s, so a wake-up costs in
/// proportion to the sockets that have input, not to all of them
/// (`zmq_poll` over thousands of sockets costs two system calls per socket
/// per call and became the bottleneck). `ZMQ_FD` is edge-triggered and only
/// means "look at `ZMQ_EVENTS`": a socket is drained until `EAGAIN`, then
/// `ZMQ_EVENTS` is read (which re-arms the edge) and the socket goes back in
/// the work list if it still has input. A sweep over all sockets every
/// 100 ms guards against a missed edge.
pub fn poller(group: Vec<(usize, zmq::Socket)>, proto: Proto, shared: &Shared, sink: usize) {
    let mut head = zmq::Message::new();
    let mut body = zmq::Message::new();
    let n = group.len();
    let mut last_seq = vec![0u64; n];
    // SAFETY: plain epoll calls on descriptors we own or libzmq lends us.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1");
    for (i, (_, sock)) in group.iter().enumerate() {
        let fd = sock.get_fd().expect("ZMQ_FD");
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: i as u64,
        };
        // SAFETY: ep and fd are valid; ev lives across the call.
        let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        assert!(rc == 0, "epoll_ctl: {}", std::io::Error::last_os_error());
    }
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let mut queued = vec![true; n];
    let mut work: Vec<usize> = (0..n).collect();
    let mut next: Vec<usize> = Vec::with_capacity(n);
    let mut last_sweep = std::time::Instant::now();
    while !shared.stop.load(Relaxed) {
        for &i in &work {
            let (slot, sock) = &group[i];
            let mut more = true;
            // Bounded so one busy socket cannot starve the others.
            for _ in 0..1024 {
                if sock.recv(&mut head, zmq::DONTWAIT).is_err() {
                    more = false;
                    break;
                }
                if !head.get_more() {
                    continue; // a one-part reply (PONG)
                }
                if sock.recv(&mut body, 0).is_err() {
                    break;
                }
                if body.get_more() {
                    // A reply of three or more parts: skip the rest.
                    while body.get_more() && sock.recv(&mut body, 0).is_ok() {}
                    continue;
                }
                let now = now_ns();
                if proto == Proto::Zbroker {
                    if head.len() < 12 || &head[..3] != b"MSG" {
                        continue;
                    }
                    let seq = u64::from_be_bytes(head[3..11].try_into().expect("8 bytes"));
                    let last = &mut last_seq[i];
                    // A gap shows on the next delivery after the drop: when
                    // that is a warm-up message or a straggler, the drop
                    // happened before this run's measured messages (the
                    // previous run's lost tail, already counted missing
                    // there), so it is not this run's.
                    if seq != *last + 1 && shared.is_measured(&body) {
                        shared.slots[*slot]
                            .gaps
                            .fetch_add(seq.saturating_sub(*last + 1), Relaxed);
                    }
                    *last = seq;
                }
                shared.on_payload(*slot, sink, &body, now);
            }
            // Reading ZMQ_EVENTS re-arms the edge and tells whether more
            // input arrived meanwhile.
            if more
                || sock
                    .get_events()
                    .map(|e| e.contains(zmq::POLLIN))
                    .unwrap_or(false)
            {
                next.push(i);
            } else {
                queued[i] = false;
            }
        }
        std::mem::swap(&mut work, &mut next);
        next.clear();
        let timeout = if work.is_empty() { 50 } else { 0 };
        // SAFETY: events has room for its length.
        let got =
            unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, timeout) };
        for e in events.iter().take(got.max(0) as usize) {
            let i = e.u64 as usize;
            if !queued[i] {
                queued[i] = true;
                work.push(i);
            }
        }
        if last_sweep.elapsed() > std::time::Duration::from_millis(100) {
            last_sweep = std::time::Instant::now();
            for (i, (_, sock)) in group.iter().enumerate() {
                if !queued[i]
                    && sock
                        .get_events()
                        .map(|e| e.contains(zmq::POLLIN))
                        .unwrap_or(false)
                {
                    queued[i] = true;
                    work.push(i);
                }
            }
        }
    }
    // SAFETY: closing our own epoll descriptor.
    unsafe { libc::close(ep) };
}

/// `compare proxy FRONT BACK [PUB_HWM SUB_HWM IO_BATCH]`: libzmq's XSUB/XPUB
/// proxy as a process of its own, so its CPU time and memory are measured
/// like a broker's; with `tuning`, its sockets get zbroker's libzmq settings
/// instead of libzmq's defaults (1,000-message queues, 8 KiB batches).
pub fn run_proxy(front: &str, back: &str, tuning: Option<ProxyTuning>) -> Result<(), String> {
    let ctx = zmq::Context::new();
    let mut xsub = ctx.socket(zmq::XSUB).map_err(zerr("XSUB"))?;
    let mut xpub = ctx.socket(zmq::XPUB).map_err(zerr("XPUB"))?;
    if let Some(t) = tuning {
        xsub.set_rcvhwm(t.pub_hwm).map_err(zerr("set RCVHWM"))?;
        xpub.set_sndhwm(t.sub_hwm).map_err(zerr("set SNDHWM"))?;
        set_int_option(&mut xsub, ZMQ_IN_BATCH_SIZE, t.io_batch)
            .map_err(zerr("set ZMQ_IN_BATCH_SIZE"))?;
        set_int_option(&mut xpub, ZMQ_OUT_BATCH_SIZE, t.io_batch)
            .map_err(zerr("set ZMQ_OUT_BATCH_SIZE"))?;
    }
    xsub.bind(front).map_err(zerr("bind XSUB"))?;
    xpub.bind(back).map_err(zerr("bind XPUB"))?;
    zmq::proxy(&xsub, &xpub).map_err(zerr("zmq_proxy"))?;
    Ok(())
}

/// libzmq's DRAFT batch-size options (zmq.h), which the `zmq` crate has no
/// setter for; vendor/zmq-sys builds libzmq with them.
const ZMQ_IN_BATCH_SIZE: i32 = 101;
const ZMQ_OUT_BATCH_SIZE: i32 = 102;

fn set_int_option(socket: &mut zmq::Socket, option: i32, value: i32) -> zmq::Result<()> {
    // SAFETY: the handle is live while `socket` is, and libzmq reads exactly
    // `size_of::<i32>()` bytes from `value`, which outlives the call.
    let rc = unsafe {
        zmq_sys::zmq_setsockopt(
            socket.as_mut_ptr(),
            option,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: zmq_errno only reads the calling thread's errno.
        Err(zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() }))
    }
}
