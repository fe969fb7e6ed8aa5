//! Protocol v1 codec costs: validating a publish (`check_publish`), decoding
//! each subscriber command (`parse_command` for SUB exact/prefix/pattern,
//! UNSUB, PING and malformed input), writing and parsing the delivery header
//! (`write_header`, `parse_header`). The same header built as a ZeroMQ part,
//! and the other libzmq part operations per delivery, are in the server
//! crate's `benches/zmq_frames.rs` (this crate has no libzmq).
//!
//! Why: everything here runs once per published message or once per
//! delivery, so it bounds what routing can cost before libzmq is involved.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use zbroker_core::protocol::{self, DEFAULT_MAX_TOPIC_LEN};

/// 56 bytes, 4 segments: a Dragonflow-like object event.
const TOPIC: &[u8] = b"neutron.port.6f1c2a9e-3b7d-4e58-9a0c-d2e4f6a8b1c3.update";

fn publish(c: &mut Criterion) {
    let mut group = c.benchmark_group("frames/check_publish");
    group.bench_function("valid", |b| {
        b.iter(|| protocol::check_publish(black_box(2), black_box(TOPIC), DEFAULT_MAX_TOPIC_LEN))
    });
    group.bench_function("three_frames", |b| {
        b.iter(|| protocol::check_publish(black_box(3), black_box(TOPIC), DEFAULT_MAX_TOPIC_LEN))
    });
    group.finish();
}

fn commands(c: &mut Criterion) {
    let cases: [(&str, &[&[u8]]); 8] = [
        ("sub_exact", &[b"SUB", b"exact", TOPIC]),
        ("sub_prefix", &[b"SUB", b"prefix", b"neutron.port."]),
        (
            "sub_pattern",
            &[
                b"SUB",
                b"pattern",
                b"neutron.*.6f1c2a9e-3b7d-4e58-9a0c-d2e4f6a8b1c3.>",
            ],
        ),
        ("unsub_prefix", &[b"UNSUB", b"prefix", b"neutron.port."]),
        ("ping", &[b"PING"]),
        // Malformed input is refused before any allocation, except for a bad
        // pattern, which is only known bad once scanned.
        ("malformed_unknown_kind", &[b"SUB", b"glob", b"neutron.*"]),
        (
            "malformed_tail_not_last",
            &[b"SUB", b"pattern", b"neutron.>.port"],
        ),
        ("malformed_unknown_verb", &[b"SUBSCRIBE", b"prefix", b"x"]),
    ];
    let mut group = c.benchmark_group("frames/parse_command");
    for (name, frames) in cases {
        // Fail loudly if a case does not exercise what its name says.
        let parsed = protocol::parse_command(frames, DEFAULT_MAX_TOPIC_LEN);
        assert_eq!(parsed.is_err(), name.starts_with("malformed"), "{name}");
        group.bench_function(name, |b| {
            b.iter(|| protocol::parse_command(black_box(frames), DEFAULT_MAX_TOPIC_LEN))
        });
    }
    group.finish();
}

fn header(c: &mut Criterion) {
    let mut group = c.benchmark_group("frames/header");
    let mut buf = [0u8; 128];
    group.bench_function("write_header", |b| {
        b.iter(|| protocol::write_header(&mut buf, black_box(123_456), black_box(TOPIC)))
    });
    let n = protocol::write_header(&mut buf, 123_456, TOPIC);
    let written = buf[..n].to_vec();
    group.bench_function("parse_header", |b| {
        b.iter(|| protocol::parse_header(black_box(&written)))
    });
    group.bench_function("parse_header_not_a_header", |b| {
        b.iter(|| protocol::parse_header(black_box(b"PONG")))
    });
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
    targets = publish, commands, header
}
criterion_main!(benches);
