#![no_main]
//! `link_frames`: arbitrary frames on both ends of a peer link. Broker B
//! serves a link whose peer sends the input's frames (a HELLO first, so
//! that interest, snapshot and PING frames reach a record); broker A reads
//! the input's frames as answers on its own link (FORWARDs among them).
//! Nothing may panic, every unreadable frame is counted, and the brokers
//! still route afterwards.
//!
//! Input: frames separated by the byte `0xff`; the first half goes to B,
//! the rest to A.

use std::rc::Rc;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use zbroker_core::broker::{Broker, SendOutcome, Transport};
use zbroker_core::cluster::Identity;
use zbroker_core::cluster::wire::{LINK_PROTOCOL_VERSION, LinkMessage};
use zbroker_core::config::BrokerConfig;

type Bytes = Rc<[u8]>;

struct Sink;

impl Transport<Bytes> for Sink {
    fn deliver(&mut self, _: &[u8], _: u64, _: &[u8], _: &mut Bytes, _: bool) -> SendOutcome {
        SendOutcome::Sent
    }
    fn reply(&mut self, _: &[u8], _: &[&[u8]]) -> SendOutcome {
        SendOutcome::Sent
    }
    fn forward(&mut self, _: &[u8], _: u64, _: &[u8], _: &mut Bytes, _: bool) -> SendOutcome {
        SendOutcome::Sent
    }
    fn to_peer(&mut self, _: &[u8], _: &[u8]) -> SendOutcome {
        SendOutcome::Sent
    }
    fn to_link(&mut self, _: u64, _: &[u8]) -> SendOutcome {
        SendOutcome::Sent
    }
}

fn broker(id: &str, now: Instant) -> Broker<Bytes> {
    let mut broker = Broker::new(BrokerConfig::default(), now);
    broker.enable_cluster(
        Identity {
            broker_id: id.into(),
            epoch: 1,
        },
        now,
    );
    broker
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut a = broker("a", now);
    let mut b = broker("b", now);
    let link = a.add_link("inproc://b", now).unwrap();
    a.on_command(b"s", None, &[b"SUB", b"prefix", b""], 3, now, &mut Sink);
    let hello = LinkMessage::Hello {
        version: LINK_PROTOCOL_VERSION,
        broker_id: "a",
        epoch: 1,
    }
    .encode();
    b.on_peer_message(b"link", &[&hello], 1, now, &mut Sink);
    let frames: Vec<&[u8]> = data.split(|&byte| byte == 0xff).collect();
    let (to_b, to_a) = frames.split_at(frames.len() / 2);
    for frame in to_b {
        b.on_peer_message(b"link", &[frame], 1, now, &mut Sink);
    }
    for group in to_a.chunks(3) {
        let mut parts: Vec<Bytes> = group.iter().map(|f| Bytes::from(*f)).collect();
        let count = parts.len();
        a.on_link_message(link, &mut parts, count, now, &mut Sink);
    }
    let mut message: [Bytes; 2] = [Bytes::from(&b"t"[..]), Bytes::from(&b"x"[..])];
    let routed = a.on_publish(None, &mut message, 2, now, &mut Sink);
    assert!(
        routed.is_ok_and(|n| n >= 1),
        "A no longer routes to its subscriber"
    );
    let _ = b.tick(now, &mut Sink);
});
