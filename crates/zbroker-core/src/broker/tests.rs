//! The broker's behaviour, driven through its public entry points with a
//! transport that can be told which peers are full or gone.

use std::rc::Rc;
use std::time::{Duration, Instant};

use hashbrown::HashSet;

use super::{Broker, MAX_STAGED_MESSAGES, SendOutcome, Transport};
use crate::config::{BrokerConfig, OverflowPolicy};
use crate::protocol::PublishError;

type Bytes = Rc<[u8]>;

/// A transport that records deliveries and replies, and can be told that
/// some peers are full or gone.
#[derive(Default)]
struct Recorder {
    delivered: Vec<(Vec<u8>, u64, Vec<u8>)>,
    replies: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
    full: HashSet<Vec<u8>>,
    gone: HashSet<Vec<u8>>,
}

impl Recorder {
    fn outcome(&self, to: &[u8]) -> SendOutcome {
        if self.gone.contains(to) {
            SendOutcome::Unreachable
        } else if self.full.contains(to) {
            SendOutcome::WouldBlock
        } else {
            SendOutcome::Sent
        }
    }
}

impl Transport<Bytes> for Recorder {
    fn deliver(
        &mut self,
        to: &[u8],
        seq: u64,
        topic: &[u8],
        _: &mut Bytes,
        _: bool,
    ) -> SendOutcome {
        let outcome = self.outcome(to);
        if outcome == SendOutcome::Sent {
            self.delivered.push((to.to_vec(), seq, topic.to_vec()));
        }
        outcome
    }
    fn reply(&mut self, to: &[u8], frames: &[&[u8]]) -> SendOutcome {
        let outcome = self.outcome(to);
        if outcome == SendOutcome::Sent {
            self.replies
                .push((to.to_vec(), frames.iter().map(|f| f.to_vec()).collect()));
        }
        outcome
    }
}

fn publish(b: &mut Broker<Bytes>, out: &mut Recorder, topic: &str, now: Instant) -> usize {
    let mut frames: [Bytes; 2] = [Rc::from(topic.as_bytes()), Rc::from(&b"p"[..])];
    b.on_publish(None, &mut frames, 2, now, out).unwrap()
}

/// Routes a publish without sending it (`route_publish`).
fn stage(b: &mut Broker<Bytes>, out: &mut Recorder, topic: &str, now: Instant) {
    let mut frames: [Bytes; 2] = [Rc::from(topic.as_bytes()), Rc::from(&b"p"[..])];
    b.route_publish(None, &mut frames, 2, now, out).unwrap();
}

fn command(b: &mut Broker<Bytes>, out: &mut Recorder, who: &[u8], frames: &[&[u8]]) {
    b.on_command(who, None, frames, frames.len(), Instant::now(), out);
}

fn last_reply(out: &Recorder) -> Vec<&[u8]> {
    out.replies
        .last()
        .unwrap()
        .1
        .iter()
        .map(|f| &f[..])
        .collect()
}

#[test]
fn subscribe_publish_unsubscribe() {
    let now = Instant::now();
    let mut b = Broker::new(BrokerConfig::default(), now);
    let mut out = Recorder::default();
    command(&mut b, &mut out, b"a", &[b"SUB", b"exact", b"x.y"]);
    assert_eq!(last_reply(&out), [&b"OK"[..], b"SUB", b"exact", b"x.y"]);
    command(&mut b, &mut out, b"a", &[b"SUB", b"pattern", b"x.*"]);
    command(&mut b, &mut out, b"a", &[b"SUB", b"pattern", b"x.*"]);
    assert_eq!(b.subscription_count(), 2, "SUB twice is idempotent");
    assert_eq!(
        publish(&mut b, &mut out, "x.y", now),
        1,
        "once despite two filters"
    );
    assert_eq!(publish(&mut b, &mut out, "x.z", now), 1);
    assert_eq!(publish(&mut b, &mut out, "q", now), 0);
    let seqs: Vec<u64> = out.delivered.iter().map(|d| d.1).collect();
    assert_eq!(seqs, [1, 2]);
    command(&mut b, &mut out, b"a", &[b"UNSUB", b"prefix", b"x"]);
    assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"not-subscribed"]);
    command(&mut b, &mut out, b"a", &[b"UNSUB", b"pattern", b"x.*"]);
    assert_eq!(last_reply(&out)[..2], [&b"OK"[..], b"UNSUB"]);
    assert_eq!(publish(&mut b, &mut out, "x.z", now), 0);
}

#[test]
fn malformed_input_is_refused_and_counted() {
    let now = Instant::now();
    let mut b = Broker::new(BrokerConfig::default(), now);
    let mut out = Recorder::default();
    command(&mut b, &mut out, b"a", &[b"HELLO"]);
    assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"bad-command"]);
    b.on_command(b"a", None, &[b"SUB", b"exact", b"x"], 9, now, &mut out);
    assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"bad-command"]);
    command(&mut b, &mut out, b"a", &[b"SUB", b"pattern", b">.x"]);
    assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"bad-filter"]);
    assert_eq!(b.counters().malformed_commands, 3);
    assert_eq!(b.subscriber_count(), 0, "bad commands register nobody");
    let mut one: [Bytes; 1] = [Rc::from(&b"t"[..])];
    assert_eq!(
        b.on_publish(None, &mut one, 1, now, &mut out),
        Err(PublishError::FrameCount(1))
    );
    let mut three: [Bytes; 2] = [Rc::from(&b"t"[..]), Rc::from(&b"p"[..])];
    assert_eq!(
        b.on_publish(None, &mut three, 3, now, &mut out),
        Err(PublishError::FrameCount(3))
    );
    assert_eq!(b.counters().malformed_publishes, 2);
}

#[test]
fn staged_deliveries_go_out_per_subscriber_in_order() {
    let now = Instant::now();
    let mut b = Broker::new(BrokerConfig::default(), now);
    let mut out = Recorder::default();
    command(&mut b, &mut out, b"a", &[b"SUB", b"prefix", b""]);
    command(&mut b, &mut out, b"b", &[b"SUB", b"exact", b"x"]);
    command(&mut b, &mut out, b"c", &[b"SUB", b"prefix", b""]);
    out.gone.insert(b"c".to_vec());
    for topic in ["x", "y", "x"] {
        stage(&mut b, &mut out, topic, now);
    }
    assert!(out.delivered.is_empty(), "staged, not sent");
    assert_eq!(b.staged_deliveries(), 8);
    assert_eq!(
        b.subscriber(b"a").unwrap().last_seq,
        3,
        "seqs taken when routed"
    );
    b.send_routed(&mut out);
    let mut sent: Vec<(&[u8], u64, &[u8])> = out
        .delivered
        .iter()
        .map(|(to, seq, topic)| (&to[..], *seq, &topic[..]))
        .collect();
    let runs = 1 + sent.windows(2).filter(|w| w[0].0 != w[1].0).count();
    assert_eq!(runs, 2, "one run per subscriber: {sent:?}");
    sent.sort_by_key(|d| d.0);
    let want: [(&[u8], u64, &[u8]); 5] = [
        (b"a", 1, b"x"),
        (b"a", 2, b"y"),
        (b"a", 3, b"x"),
        (b"b", 1, b"x"),
        (b"b", 2, b"x"),
    ];
    assert_eq!(sent, want, "each subscriber's run in order");
    assert_eq!(b.staged_deliveries(), 0);
    assert!(b.subscriber(b"c").is_none(), "unreachable: forgotten");
    let c = b.counters();
    assert_eq!(c.dropped_subscriber_gone, 3, "all of c's staged deliveries");
    assert_eq!(c.routed, c.delivered + c.dropped_subscriber_gone);

    // A command sends what is staged before its reply.
    out.delivered.clear();
    stage(&mut b, &mut out, "x", now);
    command(&mut b, &mut out, b"b", &[b"PING"]);
    assert_eq!(out.delivered.len(), 2);
    assert_eq!(b.staged_deliveries(), 0);
}

#[test]
fn staged_deliveries_to_a_full_pipe_queue_in_order() {
    let now = Instant::now();
    let mut b = Broker::new(BrokerConfig::default(), now);
    let mut out = Recorder::default();
    command(&mut b, &mut out, b"a", &[b"SUB", b"prefix", b""]);
    out.full.insert(b"a".to_vec());
    for _ in 0..3 {
        stage(&mut b, &mut out, "t", now);
    }
    b.send_routed(&mut out);
    assert_eq!(b.queued_messages(), 3);
    out.full.clear();
    assert!(!b.flush(&mut out));
    let seqs: Vec<u64> = out.delivered.iter().map(|d| d.1).collect();
    assert_eq!(seqs, [1, 2, 3]);
}

#[test]
fn staging_is_bounded() {
    let now = Instant::now();
    let mut b = Broker::new(BrokerConfig::default(), now);
    let mut out = Recorder::default();
    command(&mut b, &mut out, b"a", &[b"SUB", b"prefix", b""]);
    for _ in 0..MAX_STAGED_MESSAGES + 10 {
        stage(&mut b, &mut out, "t", now);
        assert!(b.staged_deliveries() < MAX_STAGED_MESSAGES);
    }
    assert_eq!(out.delivered.len(), MAX_STAGED_MESSAGES);
}

#[test]
fn full_pipe_queues_in_order_then_drops_with_a_gap() {
    let now = Instant::now();
    let mut config = BrokerConfig::default();
    config.queue.max_messages = 3;
    let (mut b, mut out) = one_full_subscriber(config, now);
    for _ in 0..5 {
        publish(&mut b, &mut out, "t", now);
    }
    assert_eq!(b.queued_messages(), 3);
    assert_eq!(b.counters().dropped_queue_full, 2);
    out.full.clear();
    assert!(!b.flush(&mut out));
    publish(&mut b, &mut out, "t", now);
    let seqs: Vec<u64> = out.delivered.iter().map(|d| d.1).collect();
    assert_eq!(
        seqs,
        [1, 2, 3, 6],
        "drop-new keeps the oldest; 4 and 5 are the gap"
    );
    assert_eq!(b.subscriber("a".as_bytes()).unwrap().dropped, 2);
}

#[test]
fn drop_old_keeps_the_newest() {
    let now = Instant::now();
    let mut config = BrokerConfig::default();
    config.queue.max_messages = 2;
    config.queue.policy = OverflowPolicy::DropOld;
    let (mut b, mut out) = one_full_subscriber(config, now);
    for _ in 0..5 {
        publish(&mut b, &mut out, "t", now);
    }
    out.full.clear();
    b.flush(&mut out);
    let seqs: Vec<u64> = out.delivered.iter().map(|d| d.1).collect();
    assert_eq!(seqs, [4, 5]);
    assert_eq!(b.counters().dropped_queue_full, 3);
}

#[test]
fn unreachable_and_silent_subscribers_are_freed() {
    let now = Instant::now();
    let mut b = Broker::new(BrokerConfig::default(), now);
    let mut out = Recorder::default();
    command(&mut b, &mut out, b"a", &[b"SUB", b"prefix", b""]);
    command(&mut b, &mut out, b"b", &[b"SUB", b"prefix", b""]);
    out.gone.insert(b"a".to_vec());
    assert_eq!(publish(&mut b, &mut out, "t", now), 2);
    assert_eq!(b.subscriber_count(), 1);
    assert_eq!(b.subscription_count(), 1);
    let later = Instant::now() + Duration::from_secs(11);
    b.tick(later, &mut out);
    assert_eq!(b.subscriber_count(), 0);
    assert_eq!(b.subscription_count(), 0);
    assert_eq!(b.counters().expired_subscribers, 1);
    assert_eq!(b.counters().unreachable_subscribers, 1);
}

#[test]
fn disconnect_policy_cuts_off_and_tells() {
    let now = Instant::now();
    let mut config = BrokerConfig::default();
    config.queue.max_messages = 1;
    config.queue.policy = OverflowPolicy::Disconnect;
    let (mut b, mut out) = one_full_subscriber(config, now);
    publish(&mut b, &mut out, "t", now);
    publish(&mut b, &mut out, "t", now);
    b.tick(now + Duration::from_secs(6), &mut out);
    assert_eq!(b.counters().slow_disconnects, 1);
    assert_eq!(b.subscription_count(), 0);
    out.full.clear();
    b.flush(&mut out);
    assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"limit"]);
}

/// A broker on `config` with subscriber "a" on everything and its pipe
/// full, so what is routed to it queues.
fn one_full_subscriber(config: BrokerConfig, now: Instant) -> (Broker<Bytes>, Recorder) {
    let mut b = Broker::new(config, now);
    let mut out = Recorder::default();
    command(&mut b, &mut out, b"a", &[b"SUB", b"prefix", b""]);
    out.full.insert(b"a".to_vec());
    (b, out)
}

/// The backpressure policy, queues of 4 messages, "a" behind a full pipe.
fn backpressured(now: Instant) -> (Broker<Bytes>, Recorder) {
    let mut config = BrokerConfig::default();
    config.queue.max_messages = 4;
    config.queue.policy = OverflowPolicy::Backpressure;
    config.queue.disconnect_after = Duration::from_secs(5);
    one_full_subscriber(config, now)
}

#[test]
fn backpressure_pauses_publishers_at_half_a_queue_and_loses_nothing() {
    let now = Instant::now();
    let (mut b, mut out) = backpressured(now);
    let mut published = 0;
    while !b.publishers_paused() {
        publish(&mut b, &mut out, "t", now);
        published += 1;
        assert!(published <= 4, "never paused");
    }
    assert_eq!(published, 2, "paused at half of max_messages");
    assert!(
        b.publishers_paused(),
        "stays paused while the queue is full"
    );
    out.full.clear();
    assert!(!b.flush(&mut out));
    assert!(!b.publishers_paused(), "resumes once the queue drained");
    let seqs: Vec<u64> = out.delivered.iter().map(|d| d.1).collect();
    assert_eq!(seqs, [1, 2]);
    assert_eq!(b.counters().dropped_queue_full, 0);
    assert_eq!(b.counters().backpressure_pauses, 1);
    assert_eq!(b.snapshot().publishers_paused, 0);
}

#[test]
fn backpressure_counts_staged_deliveries_toward_the_mark() {
    let now = Instant::now();
    let (mut b, mut out) = backpressured(now);
    stage(&mut b, &mut out, "t", now);
    assert!(!b.publishers_paused());
    stage(&mut b, &mut out, "t", now);
    assert!(b.publishers_paused(), "two staged reach the mark of two");
    b.send_routed(&mut out);
    assert!(b.publishers_paused(), "now two queued behind the full pipe");
}

#[test]
fn backpressure_counts_staged_bytes_toward_the_mark() {
    let now = Instant::now();
    let mut config = BrokerConfig::default();
    config.queue.max_bytes = 100;
    config.queue.policy = OverflowPolicy::Backpressure;
    let (mut b, mut out) = one_full_subscriber(config, now);
    let mut stage_30 = |b: &mut Broker<Bytes>| {
        let mut frames: [Bytes; 2] = [Rc::from(&b"t"[..]), Rc::from(&[0u8; 29][..])];
        b.route_publish(None, &mut frames, 2, now, &mut out)
            .unwrap();
    };
    stage_30(&mut b);
    assert!(!b.publishers_paused(), "30 of 100 bytes");
    stage_30(&mut b);
    assert!(
        b.publishers_paused(),
        "60 staged bytes reach the mark of 50"
    );
}

#[test]
fn backpressure_clocks_every_backlog_while_all_queues_hold_half_the_total() {
    let now = Instant::now();
    let mut config = BrokerConfig::default();
    config.queue.max_total_bytes = 40;
    config.queue.policy = OverflowPolicy::Backpressure;
    config.queue.disconnect_after = Duration::from_secs(5);
    let mut b = Broker::new(config, now);
    let mut out = Recorder::default();
    for who in [&b"a"[..], b"b"] {
        command(&mut b, &mut out, who, &[b"SUB", b"prefix", b""]);
        out.full.insert(who.to_vec());
    }
    for published in 1.. {
        publish(&mut b, &mut out, "t", now);
        if b.publishers_paused() {
            assert_eq!(published, 5, "2 queues x 5 x 2 bytes = 20 of 40");
            break;
        }
        assert!(published < 5, "never paused");
    }
    assert_eq!(b.queues.over_mark, 0, "no queue is past its own mark");
    b.tick(now, &mut out);
    b.tick(now + Duration::from_secs(5), &mut out);
    assert_eq!(b.counters().slow_disconnects, 2);
    assert!(!b.publishers_paused());
}

#[test]
fn backpressure_cuts_off_a_subscriber_that_takes_nothing() {
    let now = Instant::now();
    let (mut b, mut out) = backpressured(now);
    publish(&mut b, &mut out, "t", now);
    publish(&mut b, &mut out, "t", now);
    assert!(b.publishers_paused());
    // The clock starts at the first tick that sees it holding
    // publishers back, and taking something restarts it.
    b.tick(now, &mut out);
    out.full.clear();
    b.flush(&mut out); // it takes its queue: progress
    out.full.insert(b"a".to_vec());
    publish(&mut b, &mut out, "t", now);
    publish(&mut b, &mut out, "t", now);
    let later = now + Duration::from_secs(3);
    b.tick(later, &mut out);
    b.tick(now + Duration::from_secs(6), &mut out);
    assert_eq!(b.counters().slow_disconnects, 0, "it took something at 0 s");
    b.tick(later + Duration::from_secs(5), &mut out);
    assert_eq!(b.counters().slow_disconnects, 1);
    assert_eq!(b.subscription_count(), 0);
    assert!(
        !b.publishers_paused(),
        "a cut-off subscriber holds nothing back"
    );
    assert_eq!(b.counters().dropped_queue_full, 2, "its queue, counted");
}

#[test]
fn limits_refuse_with_err_limit() {
    let now = Instant::now();
    let mut config = BrokerConfig::default();
    config.limits.max_subscribers = 1;
    config.limits.max_filters_per_subscriber = 1;
    let mut b = Broker::new(config, now);
    let mut out = Recorder::default();
    command(&mut b, &mut out, b"a", &[b"SUB", b"exact", b"x"]);
    command(&mut b, &mut out, b"a", &[b"SUB", b"exact", b"y"]);
    assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"limit"]);
    command(&mut b, &mut out, b"b", &[b"PING"]);
    assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"limit"]);
    assert_eq!(b.counters().refused_limit, 2);
}

#[test]
fn patterns_over_the_segment_limit_are_refused() {
    let now = Instant::now();
    let mut config = BrokerConfig::default();
    config.limits.max_pattern_segments = 3;
    let mut b = Broker::new(config, now);
    let mut out = Recorder::default();
    command(&mut b, &mut out, b"a", &[b"SUB", b"pattern", b"a.*.c"]);
    assert_eq!(last_reply(&out)[0], b"OK");
    command(&mut b, &mut out, b"a", &[b"SUB", b"pattern", b"a.*.c.>"]);
    assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"limit"]);
    // Exact and prefix filters are matched byte by byte: no segment limit.
    command(&mut b, &mut out, b"a", &[b"SUB", b"exact", b"a.b.c.d.e"]);
    assert_eq!(last_reply(&out)[0], b"OK");
    assert_eq!(b.counters().refused_limit, 1);
    assert_eq!(b.subscription_count(), 2);
}

#[test]
fn the_index_byte_limit_refuses_once_passed() {
    let now = Instant::now();
    let mut config = BrokerConfig::default();
    config.limits.max_index_bytes = 4096;
    let mut b = Broker::new(config, now);
    let mut out = Recorder::default();
    let mut confirmed = 0;
    for i in 0..1000 {
        let filter = format!("topic.{i:04}.{}", "x".repeat(100));
        command(
            &mut b,
            &mut out,
            b"a",
            &[b"SUB", b"exact", filter.as_bytes()],
        );
        match last_reply(&out)[0] {
            b"OK" => confirmed += 1,
            _ => break,
        }
    }
    assert_eq!(last_reply(&out)[..2], [&b"ERR"[..], b"limit"]);
    assert!(confirmed > 0 && confirmed < 1000, "{confirmed} confirmed");
    // Refused from the first filter past the limit on: one filter's
    // worth of overshoot at most.
    assert!(
        b.index_heap_bytes() < 4096 + 512,
        "{}",
        b.index_heap_bytes()
    );
}

#[test]
fn one_key_cannot_hold_more_than_its_quota() {
    let now = Instant::now();
    let mut config = BrokerConfig::default();
    config.limits.max_filters_per_key = 3;
    let mut b = Broker::new(config, now);
    let mut out = Recorder::default();
    let sub = |b: &mut Broker<Bytes>, out: &mut Recorder, who: &[u8], key, f: &str| {
        b.on_command(who, key, &[b"SUB", b"exact", f.as_bytes()], 3, now, out);
        out.replies.last().unwrap().1[0].clone()
    };
    // Two connections of the same key share its quota.
    assert_eq!(sub(&mut b, &mut out, b"a", Some("K"), "1"), b"OK");
    assert_eq!(sub(&mut b, &mut out, b"b", Some("K"), "2"), b"OK");
    assert_eq!(sub(&mut b, &mut out, b"b", Some("K"), "3"), b"OK");
    assert_eq!(sub(&mut b, &mut out, b"a", Some("K"), "4"), b"ERR");
    // Another key is not affected.
    assert_eq!(sub(&mut b, &mut out, b"c", Some("L"), "4"), b"OK");
    // An UNSUB, or a subscriber forgotten, gives quota back.
    b.on_command(
        b"b",
        Some("K"),
        &[b"UNSUB", b"exact", b"3"],
        3,
        now,
        &mut out,
    );
    assert_eq!(sub(&mut b, &mut out, b"a", Some("K"), "4"), b"OK");
    assert_eq!(sub(&mut b, &mut out, b"a", Some("K"), "5"), b"ERR");
    out.gone.insert(b"b".to_vec());
    let mut frames: [Bytes; 2] = [Rc::from(&b"2"[..]), Rc::from(&b"p"[..])];
    let _ = b.on_publish(None, &mut frames, 2, now, &mut out);
    assert_eq!(sub(&mut b, &mut out, b"a", Some("K"), "5"), b"OK");
}

#[test]
fn garbage_from_strangers_shares_one_rate_limit() {
    let now = Instant::now();
    let mut config = BrokerConfig::default();
    config.limits.max_commands_per_sec = 10;
    let mut b = Broker::new(config, now);
    let mut out = Recorder::default();
    for i in 0..100u32 {
        // A new routing id each time: no record, no bucket of its own.
        b.on_command(&i.to_be_bytes(), None, &[b"NOPE"], 1, now, &mut out);
    }
    assert_eq!(
        out.replies.len(),
        10,
        "the shared bucket holds a second's worth"
    );
    assert_eq!(b.counters().malformed_commands, 100);
    assert_eq!(b.counters().refused_rate, 90);
    // A well-formed first command from a newcomer is not held back.
    command(&mut b, &mut out, b"honest", &[b"PING"]);
    assert_eq!(last_reply(&out), [b"PONG"]);
    // The bucket refills with time.
    let later = now + Duration::from_millis(500);
    b.on_command(b"x", None, &[b"NOPE"], 1, later, &mut out);
    assert_eq!(last_reply(&out)[0], b"ERR");
}
