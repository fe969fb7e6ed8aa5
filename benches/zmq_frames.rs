//! The libzmq part operations the forwarding path performs per delivery:
//! building the delivery header as a ZeroMQ part (`Frame::header`), a part
//! for the routing id (`Frame::from_slice`) and a shared handle on the
//! payload (`Frame::share`). The pure codec under them is benched in
//! `crates/zbroker-core/benches/frames.rs`; the group names are the same.
//!
//! `Frame::header` is measured with a short topic (the header fits libzmq's
//! 33-byte inline part) and with a realistic 56-byte topic (it does not, so
//! libzmq allocates per delivery), to show what the topic length costs.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use zbroker::frame::Frame;

/// 56 bytes, 4 segments: a Dragonflow-like object event.
const TOPIC: &[u8] = b"neutron.port.6f1c2a9e-3b7d-4e58-9a0c-d2e4f6a8b1c3.update";
/// Short enough that `MSG | seq | topic` (11 + 19 bytes) stays inline.
const SHORT_TOPIC: &[u8] = b"node.compute-1.port";

fn header(c: &mut Criterion) {
    let mut group = c.benchmark_group("frames/header");
    for (name, topic) in [("inline_19B_topic", SHORT_TOPIC), ("heap_56B_topic", TOPIC)] {
        group.bench_function(BenchmarkId::new("Frame::header", name), |b| {
            b.iter(|| Frame::header(black_box(123_456), black_box(topic)))
        });
    }
    group.finish();
}

fn frame_ops(c: &mut Criterion) {
    let mut group = c.benchmark_group("frames/frame");
    // What `RouterTransport` does per delivery besides the header: a part
    // for the routing id (libzmq's default ids are 5 bytes) and a shared
    // handle on the payload.
    group.bench_function("from_slice_routing_id", |b| {
        b.iter(|| Frame::from_slice(black_box(b"\0\x80\0\0\x01")))
    });
    for len in [64usize, 256 << 10] {
        let mut payload = Frame::from_slice(&vec![0xab; len]);
        group.bench_function(BenchmarkId::new("share", format!("{len}B")), |b| {
            b.iter(|| payload.share())
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = header, frame_ops
}
criterion_main!(benches);
