//! State shared between the coordinator and the subscriber threads/tasks:
//! one cache-line-aligned slot of counters per subscriber.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

use hdrhistogram::Histogram;

use crate::util::{KIND_WARM, decode};

#[repr(align(128))]
#[derive(Default)]
pub struct Slot {
    /// Measured messages of the current run.
    pub received: AtomicU64,
    /// Receive time of the first and last measured message (CLOCK_MONOTONIC ns).
    pub first_ns: AtomicU64,
    pub last_ns: AtomicU64,
    /// Warm-up bits seen in the current run (one per publisher).
    pub ready: AtomicU64,
    /// zbroker only: messages skipped in `seq` (drops the broker announced).
    pub gaps: AtomicU64,
    /// Messages that were not ours (bad stamp): must stay 0.
    pub foreign: AtomicU64,
    /// Highest measured seq + 1 seen (tells a lost tail from holes).
    pub max_seq: AtomicU64,
    /// Every payload received, of any run or kind; never reset (shows
    /// that something is still arriving).
    pub any: AtomicU64,
    /// Measured messages whose seq was not above the previous one.
    pub reordered: AtomicU64,
}

/// A latency histogram (ns) that threads or tasks record into.
pub type Lat = Mutex<Option<Histogram<u64>>>;

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(100, 120_000_000_000, 3).expect("histogram bounds")
}

pub struct Shared {
    pub slots: Vec<Slot>,
    /// The run whose messages count (messages carry their run id).
    pub run: AtomicU64,
    /// Record latencies in this run.
    pub latency: AtomicBool,
    /// Subscriber threads and tasks stop when set.
    pub stop: AtomicBool,
    /// Subscribers whose subscription the system confirmed.
    pub subscribed: AtomicUsize,
    /// Subscriber connections the system closed (Redis output buffer limit,
    /// MQTT reconnects); never reset.
    pub disconnects: AtomicU64,
    /// Latency sinks, one per subscriber thread or task group.
    pub lat: Vec<Lat>,
}

impl Shared {
    pub fn new(subs: usize, lat_sinks: usize) -> Shared {
        Shared {
            slots: (0..subs).map(|_| Slot::default()).collect(),
            run: AtomicU64::new(0),
            latency: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            subscribed: AtomicUsize::new(0),
            disconnects: AtomicU64::new(0),
            lat: (0..lat_sinks.max(1)).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Accounts one received payload for subscriber `s`; `sink` picks the
    /// latency histogram.
    #[inline]
    pub fn on_payload(&self, s: usize, sink: usize, payload: &[u8], now: u64) {
        let slot = &self.slots[s];
        slot.any.fetch_add(1, Relaxed);
        let Some(stamp) = decode(payload) else {
            slot.foreign.fetch_add(1, Relaxed);
            return;
        };
        if u64::from(stamp.run) != self.run.load(Relaxed) {
            return; // a straggler from an earlier run or its warm-up
        }
        if stamp.kind == KIND_WARM {
            let bit = 1u64 << stamp.publisher;
            if slot.ready.load(Relaxed) & bit == 0 {
                slot.ready.fetch_or(bit, Relaxed);
            }
            return;
        }
        let prev = slot.max_seq.load(Relaxed);
        if stamp.seq + 1 > prev {
            slot.max_seq.store(stamp.seq + 1, Relaxed);
        } else {
            slot.reordered.fetch_add(1, Relaxed);
        }
        if slot.received.fetch_add(1, Relaxed) == 0 {
            slot.first_ns.store(now, Relaxed);
        }
        slot.last_ns.store(now, Relaxed);
        if self.latency.load(Relaxed) {
            let mut h = self.lat[sink % self.lat.len()].lock().unwrap();
            h.get_or_insert_with(new_hist)
                .saturating_record(now.saturating_sub(stamp.sent_ns));
        }
    }

    /// Whether `payload` is a measured message of the current run.
    #[inline]
    pub fn is_measured(&self, payload: &[u8]) -> bool {
        decode(payload).is_some_and(|stamp| {
            stamp.kind != KIND_WARM && u64::from(stamp.run) == self.run.load(Relaxed)
        })
    }

    /// Payloads received so far, of any kind.
    pub fn any_received(&self) -> u64 {
        self.slots.iter().map(|s| s.any.load(Relaxed)).sum()
    }

    /// Starts run `run`: clears the per-run counters.
    pub fn begin_run(&self, run: u8, latency: bool) {
        self.run.store(u64::from(run), Relaxed);
        for slot in &self.slots {
            slot.received.store(0, Relaxed);
            slot.first_ns.store(0, Relaxed);
            slot.last_ns.store(0, Relaxed);
            slot.ready.store(0, Relaxed);
            slot.gaps.store(0, Relaxed);
            slot.foreign.store(0, Relaxed);
            slot.max_seq.store(0, Relaxed);
            slot.reordered.store(0, Relaxed);
        }
        for l in &self.lat {
            *l.lock().unwrap() = None;
        }
        self.latency.store(latency, Relaxed);
    }

    /// All latency samples of the run, merged.
    pub fn take_latency(&self) -> Option<Histogram<u64>> {
        let mut all: Option<Histogram<u64>> = None;
        for l in &self.lat {
            if let Some(h) = l.lock().unwrap().take() {
                match all.as_mut() {
                    Some(a) => a.add(&h).expect("same bounds"),
                    None => all = Some(h),
                }
            }
        }
        all
    }
}
