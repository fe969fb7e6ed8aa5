#![no_main]
//! `publish_frames`: arbitrary multipart messages on the publisher endpoint.
//!
//! Publishers are untrusted and have no reply path, so the only defence is
//! that the core refuses bad input with a typed error and keeps going. Each
//! message goes both into `protocol::check_publish` and into a real
//! `Broker<Rc<[u8]>>` through `on_publish`, called exactly as the server
//! calls it (at most the first two frames, plus the true frame count).
//! Checked:
//! - nothing panics (debug assertions and overflow checks are on);
//! - both give the refusal PROTOCOL.md prescribes, re-derived here from the
//!   spec (not exactly two frames, then empty topic, then topic too long);
//! - a valid message reaches the catch-all subscriber exactly once, with its
//!   bytes intact and the next seq; a refused one reaches nobody;
//! - the counters agree with what was sent.
//!
//! Input: byte 0 picks `max_topic_len` (255 means the 1024 default); then
//! messages until the input ends, each a frame-count byte (`% 6`) followed
//! by that many length-prefixed frames (see `common::Input::frame`).

mod common;

use std::rc::Rc;
use std::time::Instant;

use common::Input;
use libfuzzer_sys::fuzz_target;
use zbroker_core::broker::{Broker, SendOutcome, Transport};
use zbroker_core::config::BrokerConfig;
use zbroker_core::protocol::{self, DEFAULT_MAX_TOPIC_LEN, PublishError};

type Bytes = Rc<[u8]>;

/// What the transport was asked to send; the target's transport always
/// accepts, so the broker never queues and every delivery is visible at once.
#[derive(Default)]
struct Recorder {
    deliveries: Vec<(Vec<u8>, u64, Vec<u8>, Vec<u8>)>,
    replies: usize,
}

impl Transport<Bytes> for Recorder {
    fn deliver(
        &mut self,
        to: &[u8],
        seq: u64,
        topic: &[u8],
        payload: &mut Bytes,
        _: bool,
    ) -> SendOutcome {
        self.deliveries
            .push((to.to_vec(), seq, topic.to_vec(), payload.to_vec()));
        SendOutcome::Sent
    }

    fn reply(&mut self, _: &[u8], _: &[&[u8]]) -> SendOutcome {
        self.replies += 1;
        SendOutcome::Sent
    }
}

/// PROTOCOL.md's rule, written independently of `check_publish`.
fn expected(frames: &[&[u8]], max_topic_len: usize) -> Result<(), PublishError> {
    match frames {
        [topic, _payload] if topic.is_empty() => Err(PublishError::EmptyTopic),
        [topic, _payload] if topic.len() > max_topic_len => Err(PublishError::TopicTooLong {
            len: topic.len(),
            max: max_topic_len,
        }),
        [_, _] => Ok(()),
        _ => Err(PublishError::FrameCount(frames.len())),
    }
}

const SUBSCRIBER: &[u8] = b"everything";

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let max_topic_len = match input.byte() {
        255 => DEFAULT_MAX_TOPIC_LEN,
        n => n as usize,
    };
    let mut config = BrokerConfig::default();
    config.limits.max_topic_len = max_topic_len;
    let now = Instant::now();
    let mut broker: Broker<Bytes> = Broker::new(config, now);
    let mut out = Recorder::default();
    // The empty prefix matches every topic, so every accepted message must
    // come out the other side.
    broker.on_command(
        SUBSCRIBER,
        None,
        &[b"SUB", b"prefix", b""],
        3,
        now,
        &mut out,
    );
    assert_eq!(out.replies, 1);

    let (mut accepted, mut refused) = (0u64, 0u64);
    while !input.is_empty() {
        let count = input.byte() as usize % 6;
        let frames: Vec<&[u8]> = (0..count).map(|_| input.frame()).collect();
        let want = expected(&frames, max_topic_len);

        let topic = frames.first().copied().unwrap_or_default();
        assert_eq!(
            protocol::check_publish(count, topic, max_topic_len),
            want,
            "check_publish on {frames:?}"
        );

        // The server hands over at most the first two frames and the count.
        let mut parts: Vec<Bytes> = frames.iter().take(2).map(|f| Rc::from(*f)).collect();
        out.deliveries.clear();
        let got = broker.on_publish(None, &mut parts, count, now, &mut out);
        match want {
            Ok(()) => {
                accepted += 1;
                assert_eq!(got, Ok(1), "on_publish on {frames:?}");
                let expected_delivery = (
                    SUBSCRIBER.to_vec(),
                    accepted,
                    frames[0].to_vec(),
                    frames[1].to_vec(),
                );
                assert_eq!(out.deliveries, [expected_delivery]);
            }
            Err(e) => {
                refused += 1;
                assert_eq!(got, Err(e), "on_publish on {frames:?}");
                assert!(out.deliveries.is_empty(), "a refused publish was routed");
                // Logged by the broker, so formatting must not panic either.
                let _ = e.to_string();
            }
        }
        assert_eq!(out.replies, 1, "publishers get no replies");
    }
    let counters = broker.counters();
    assert_eq!(counters.published, accepted);
    assert_eq!(counters.malformed_publishes, refused);
    assert_eq!(counters.routed, accepted);
    assert_eq!(counters.delivered, accepted);
});
