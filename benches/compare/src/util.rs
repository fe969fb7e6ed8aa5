//! Clocks, the payload stamp, ports, /proc readings and a raw libzmq context
//! wrapper (the `zmq` crate cannot raise `ZMQ_MAX_SOCKETS`).

use std::ffi::c_void;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// CLOCK_MONOTONIC in nanoseconds: one clock shared by every process on the
/// machine, so a timestamp written by a publisher can be compared with the
/// time a subscriber (possibly in a child process) receives it.
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Warm-up messages prove a subscription is in place; they are not counted.
pub const KIND_WARM: u8 = 0;
/// Measured messages.
pub const KIND_MEASURE: u8 = 1;
/// Bytes of the stamp at the start of every payload (payloads are >= 64 B).
pub const STAMP_LEN: usize = 19;

/// What the load generator writes at the start of every payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub seq: u64,
    pub sent_ns: u64,
    pub publisher: u8,
    pub run: u8,
    pub kind: u8,
}

#[inline]
pub fn encode(buf: &mut [u8], s: Stamp) {
    buf[0..8].copy_from_slice(&s.seq.to_le_bytes());
    buf[8..16].copy_from_slice(&s.sent_ns.to_le_bytes());
    buf[16] = s.publisher;
    buf[17] = s.run;
    buf[18] = s.kind;
}

#[inline]
pub fn decode(buf: &[u8]) -> Option<Stamp> {
    if buf.len() < STAMP_LEN {
        return None;
    }
    Some(Stamp {
        seq: u64::from_le_bytes(buf[0..8].try_into().ok()?),
        sent_ns: u64::from_le_bytes(buf[8..16].try_into().ok()?),
        publisher: buf[16],
        run: buf[17],
        kind: buf[18],
    })
}

/// A payload of `len` bytes: stamp space then a fixed filler, identical for
/// every system.
pub fn payload_buffer(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// A free TCP port on 127.0.0.1 (bound and released; the small race is
/// acceptable on a benchmark machine).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
pub fn wait_port(port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "nothing listens on 127.0.0.1:{port} after {timeout:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// utime + stime of every thread of `pid`, in seconds (from /proc/pid/stat).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck() as f64)
}

/// A `VmXxx:` line of /proc/pid/status, in KiB.
pub fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// A libzmq context made through the C API so `ZMQ_MAX_SOCKETS` can be
/// raised; sockets made from it are ordinary `zmq::Socket`s. Every holder of
/// a socket also holds an `Arc<Ctx>`, and drops the socket first.
pub struct Ctx {
    raw: *mut c_void,
}

// SAFETY: libzmq contexts are thread safe.
unsafe impl Send for Ctx {}
unsafe impl Sync for Ctx {}

impl Ctx {
    pub fn new(io_threads: i32, max_sockets: i32) -> Ctx {
        // SAFETY: plain libzmq calls on a fresh context.
        unsafe {
            let raw = zmq_sys::zmq_ctx_new();
            assert!(!raw.is_null(), "zmq_ctx_new failed");
            zmq_sys::zmq_ctx_set(raw, zmq_sys::ZMQ_IO_THREADS as i32, io_threads);
            zmq_sys::zmq_ctx_set(raw, zmq_sys::ZMQ_MAX_SOCKETS as i32, max_sockets);
            Ctx { raw }
        }
    }

    pub fn socket(&self, kind: zmq::SocketType) -> zmq::Socket {
        let raw_kind = match kind {
            zmq::PUB => zmq_sys::ZMQ_PUB,
            zmq::SUB => zmq_sys::ZMQ_SUB,
            zmq::DEALER => zmq_sys::ZMQ_DEALER,
            zmq::PUSH => zmq_sys::ZMQ_PUSH,
            zmq::PULL => zmq_sys::ZMQ_PULL,
            zmq::XPUB => zmq_sys::ZMQ_XPUB,
            zmq::XSUB => zmq_sys::ZMQ_XSUB,
            other => panic!("socket type {other:?} not used here"),
        };
        // SAFETY: valid context; a non-null result is a fresh socket we own.
        unsafe {
            let s = zmq_sys::zmq_socket(self.raw, raw_kind as i32);
            assert!(
                !s.is_null(),
                "zmq_socket: {}",
                zmq::Error::from_raw(zmq_sys::zmq_errno())
            );
            let s = zmq::Socket::from_raw(s);
            s.set_linger(0).expect("set linger");
            s
        }
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: all sockets are closed by now (see the type's docs).
        unsafe { zmq_sys::zmq_ctx_term(self.raw) };
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit.
pub fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0)
}

/// "1.23 M", "456 k", "789".
pub fn si(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0} k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// "1,000", "12,345".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}
