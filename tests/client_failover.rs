//! The Rust client's failover across a list of brokers, with the brokers as
//! real processes: a subscriber whose broker is killed or goes silent moves
//! to the next and re-subscribes; a publisher whose broker is killed moves
//! to the next and keeps its stream in order there; an endpoint that never
//! answers is skipped.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use common::metrics::QUEUED_MESSAGES;
use common::{ChildBroker, DEADLINE};
use zbroker::client::{
    ClientError, Event, Message, Publisher, PublisherOptions, ResyncReason, Subscriber,
    SubscriberOptions,
};
use zbroker::filter::Filter;

/// A broker on loopback ports the system picks.
fn broker() -> ChildBroker {
    ChildBroker::start(&[
        "--pub-bind",
        "tcp://127.0.0.1:0",
        "--sub-bind",
        "tcp://127.0.0.1:0",
    ])
}

fn filter(spec: &str) -> Filter {
    Filter::parse_cli(spec, 1024).unwrap()
}

/// Short timers, so that a failover takes well under a second or two.
fn sub_options() -> SubscriberOptions {
    SubscriberOptions {
        heartbeat: Duration::from_millis(200),
        broker_timeout: Duration::from_secs(2),
        confirm_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_millis(500),
        ..SubscriberOptions::default()
    }
}

fn pub_options() -> PublisherOptions {
    PublisherOptions {
        send_timeout: Some(Duration::from_secs(10)),
        connect_timeout: Duration::from_millis(500),
        ..PublisherOptions::default()
    }
}

/// The next event, failing the test if none comes within the deadline.
fn next_event(sub: &mut Subscriber) -> Event {
    sub.recv_timeout(DEADLINE)
        .unwrap()
        .unwrap_or_else(|| panic!("no event within {DEADLINE:?} on {}", sub.endpoint()))
}

fn next_message(sub: &mut Subscriber) -> Message {
    match next_event(sub) {
        Event::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// Waits for the subscriber's resync; no message may come first.
fn next_resync(sub: &mut Subscriber) -> ResyncReason {
    match next_event(sub) {
        Event::Resync(reason) => reason,
        other => panic!("expected a resync, got {other:?}"),
    }
}

/// SIGKILL, and waits until the process is gone (its sockets closed).
fn kill_9(broker: &mut ChildBroker) {
    broker.child.kill().unwrap();
    broker.wait(DEADLINE);
}

fn signal(broker: &ChildBroker, signal: &str) {
    let pid = broker.pid().to_string();
    let status = Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// A subscription proved in effect: a message published through a fresh
/// publisher on `broker` reaches `sub` (the publisher queues it until it is
/// connected, so no wait is needed first).
fn assert_delivers(broker: &ChildBroker, sub: &mut Subscriber, topic: &[u8], payload: &[u8]) {
    let mut publisher = Publisher::connect(&broker.pub_endpoint).unwrap();
    publisher.publish(topic, payload).unwrap();
    let m = next_message(sub);
    assert_eq!((m.topic.as_slice(), m.payload.as_slice()), (topic, payload));
}

#[test]
fn a_subscriber_whose_broker_is_killed_moves_to_the_next_and_resubscribes() {
    let mut a = broker();
    let b = broker();
    let mut sub =
        Subscriber::connect_any_with(&[&a.sub_endpoint, &b.sub_endpoint], sub_options()).unwrap();
    sub.subscribe(&filter("prefix:state.")).unwrap();
    assert_eq!(sub.endpoint(), a.sub_endpoint);
    assert_delivers(&a, &mut sub, b"state.1", b"through a");

    kill_9(&mut a);
    let reason = next_resync(&mut sub);
    assert_eq!(
        reason,
        ResyncReason::FailedOver {
            from: a.sub_endpoint.clone(),
            to: b.sub_endpoint.clone()
        }
    );
    assert_eq!(sub.endpoint(), b.sub_endpoint);
    assert_eq!(sub.filters().count(), 1);
    // The filter is held by b: what is published there now reaches us, on
    // a new connection (seq from 1).
    let mut publisher = Publisher::connect(&b.pub_endpoint).unwrap();
    publisher.publish(b"state.2", b"through b").unwrap();
    let m = next_message(&mut sub);
    assert_eq!(
        (m.payload.as_slice(), m.seq, m.gap),
        (&b"through b"[..], 1, false)
    );
}

/// The broker dies while the subscriber is behind: its receive queue is
/// full, so libzmq has stopped reading its connection, and the application
/// is busy. (libzmq 4.3 aborted the process here while the subscriber sent
/// ZMTP heartbeats.)
#[test]
fn a_subscriber_that_is_behind_when_its_broker_dies_moves_to_the_next() {
    let mut a = ChildBroker::start(&[
        "--pub-bind",
        "tcp://127.0.0.1:0",
        "--sub-bind",
        "tcp://127.0.0.1:0",
        "--metrics-bind",
        "127.0.0.1:0",
    ]);
    let b = broker();
    let options = SubscriberOptions {
        hwm: 10,
        ..sub_options()
    };
    let mut sub =
        Subscriber::connect_any_with(&[&a.sub_endpoint, &b.sub_endpoint], options).unwrap();
    sub.subscribe(&filter("prefix:")).unwrap();

    // Flood a until it queues for the subscriber: then everything between
    // them is full, the subscriber's side included.
    let no_linger = PublisherOptions {
        linger: Duration::ZERO,
        ..PublisherOptions::default()
    };
    let mut publisher = Publisher::connect_with(&a.pub_endpoint, &no_linger).unwrap();
    let payload = [0u8; 4096];
    let deadline = Instant::now() + DEADLINE;
    let mut sent = 0u64;
    loop {
        for _ in 0..1000 {
            publisher.publish(b"flood", &payload).unwrap();
        }
        sent += 1000;
        if a.metrics().get(QUEUED_MESSAGES) > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline && sent < 1_000_000,
            "a never queued"
        );
    }
    kill_9(&mut a);
    // The application is busy for a while as its broker dies: this pause
    // is the condition under test.
    std::thread::sleep(sub_options().heartbeat * 3);

    // What the old connection had received comes first, then the resync.
    let mut before = 0u64;
    let reason = loop {
        match next_event(&mut sub) {
            Event::Message(m) => assert_eq!(m.topic, b"flood"),
            Event::Resync(reason) => break reason,
        }
        before += 1;
        assert!(before <= sent, "more messages than were published");
    };
    println!("{sent} published to a, {before} received from it");
    assert_eq!(
        reason,
        ResyncReason::FailedOver {
            from: a.sub_endpoint.clone(),
            to: b.sub_endpoint.clone()
        }
    );
    assert_delivers(&b, &mut sub, b"after", b"through b");
}

#[test]
fn a_subscriber_whose_broker_goes_silent_moves_to_the_next() {
    let a = broker();
    let b = broker();
    let mut sub =
        Subscriber::connect_any_with(&[&a.sub_endpoint, &b.sub_endpoint], sub_options()).unwrap();
    sub.subscribe(&filter("exact:x")).unwrap();
    assert_eq!(sub.endpoint(), a.sub_endpoint);

    // Stopped, a's connections stay up but nothing answers: only the
    // missing PONGs tell. (Killed on drop, stopped or not.)
    signal(&a, "-STOP");
    let reason = next_resync(&mut sub);
    assert_eq!(
        reason,
        ResyncReason::FailedOver {
            from: a.sub_endpoint.clone(),
            to: b.sub_endpoint.clone()
        }
    );
    assert_eq!(sub.endpoint(), b.sub_endpoint);
    assert_delivers(&b, &mut sub, b"x", b"through b");
}

#[test]
fn a_publisher_whose_broker_is_killed_moves_to_the_next_and_keeps_its_order() {
    const TAIL: u64 = 200;
    let mut a = broker();
    let b = broker();
    let mut on_a = Subscriber::connect_with(&a.sub_endpoint, sub_options()).unwrap();
    on_a.subscribe(&filter("exact:n")).unwrap();
    let mut on_b = Subscriber::connect_with(&b.sub_endpoint, sub_options()).unwrap();
    on_b.subscribe(&filter("exact:n")).unwrap();
    let mut publisher =
        Publisher::connect_any_with(&[&a.pub_endpoint, &b.pub_endpoint], &pub_options()).unwrap();
    assert_eq!(publisher.endpoint(), a.pub_endpoint);

    // A numbered stream, without pause, from before a dies until TAIL
    // messages after the publisher moved to b.
    let to_b = b.pub_endpoint.clone();
    let stream = std::thread::spawn(move || {
        let deadline = Instant::now() + DEADLINE;
        let mut moved_at = None;
        let mut timeouts = 0;
        for n in 0u64.. {
            match publisher.publish(b"n", &n.to_be_bytes()) {
                Ok(()) => {
                    if moved_at.is_none() && publisher.endpoint() == to_b {
                        moved_at = Some(n);
                    }
                }
                // Not sent; the stream goes on without it.
                Err(ClientError::Timeout(_)) => timeouts += 1,
                Err(e) => panic!("publishing #{n}: {e}"),
            }
            if let Some(m) = moved_at
                && n >= m + TAIL
            {
                return (m, n, timeouts);
            }
            assert!(
                Instant::now() < deadline && timeouts < 3,
                "the publisher did not move to b ({timeouts} send timeouts, at #{n})"
            );
        }
        unreachable!("2^64 messages")
    });

    // Some of the stream reaches a: the publisher is connected through it.
    match next_event(&mut on_a) {
        Event::Message(m) => assert_eq!(m.topic, b"n"),
        other => panic!("expected a message through a, got {other:?}"),
    }
    // Messages around the kill may be lost (those a took, those still
    // queued for it); the publisher moves to b, and everything it publishes
    // from then on must arrive there, in order.
    kill_9(&mut a);
    let (moved_at, last, timeouts) = stream.join().expect("the publishing thread");
    println!("moved to b at #{moved_at}, {timeouts} send timeouts");
    assert!(moved_at > 0, "the stream started on a");

    let mut received = Vec::new();
    while received.last() != Some(&last) {
        let m = next_message(&mut on_b);
        let number = u64::from_be_bytes(m.payload.as_slice().try_into().unwrap());
        assert!(
            received.last().is_none_or(|&previous| number > previous),
            "out of order: #{number} after {:?}",
            received.last()
        );
        assert!(number <= last, "#{number} was never published");
        received.push(number);
    }
    // Nothing published before the move went to b, and nothing after it
    // was lost: one connection, to a live broker.
    assert_eq!(received, (moved_at..=last).collect::<Vec<_>>());
}

/// A broker that stops taking messages while its connection stays up
/// (SIGSTOP): `publish` times out, and the publisher moves on.
#[test]
fn a_publisher_whose_broker_takes_nothing_moves_to_the_next() {
    let a = broker();
    let b = broker();
    let mut on_b = Subscriber::connect_with(&b.sub_endpoint, sub_options()).unwrap();
    on_b.subscribe(&filter("exact:big")).unwrap();
    let options = PublisherOptions {
        send_timeout: Some(Duration::from_millis(300)),
        hwm: 10,
        linger: Duration::ZERO,
        ..pub_options()
    };
    let mut publisher =
        Publisher::connect_any_with(&[&a.pub_endpoint, &b.pub_endpoint], &options).unwrap();
    publisher.publish(b"big", b"through a").unwrap();
    assert_eq!(publisher.endpoint(), a.pub_endpoint);

    signal(&a, "-STOP");
    // Large messages fill the kernel's buffers and then the queue quickly.
    let payload = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + DEADLINE;
    let mut timeouts = 0;
    let mut n = 0u64;
    while publisher.endpoint() != b.pub_endpoint {
        match publisher.publish(b"big", &payload) {
            Ok(()) => {}
            Err(ClientError::Timeout(_)) => timeouts += 1,
            Err(e) => panic!("publishing: {e}"),
        }
        n += 1;
        assert!(
            Instant::now() < deadline && n < 100_000,
            "still on a after {n} messages, {timeouts} timeouts"
        );
    }
    assert!(timeouts > 0, "the move came after a send timed out");
    publisher.publish(b"big", b"through b").unwrap();
    let m = next_message(&mut on_b);
    assert_eq!((m.payload.as_slice(), m.seq), (&b"through b"[..], 1));
}

#[test]
fn endpoints_that_never_answer_are_skipped() {
    let b = broker();
    // Nothing listens on the first (the connection is refused); the second
    // accepts TCP connections in the kernel but never speaks ZMTP.
    let refused = format!("tcp://127.0.0.1:{}", common::free_port());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = format!("tcp://{}", listener.local_addr().unwrap());

    let mut sub =
        Subscriber::connect_any_with(&[&refused, &silent, &b.sub_endpoint], sub_options()).unwrap();
    assert_eq!(sub.endpoint(), refused);
    // Waits for a connection, which only the third endpoint gives.
    sub.subscribe(&filter("prefix:")).unwrap();
    assert_eq!(sub.endpoint(), b.sub_endpoint);

    let mut publisher =
        Publisher::connect_any_with(&[&refused, &silent, &b.pub_endpoint], &pub_options()).unwrap();
    assert_eq!(publisher.endpoint(), refused);
    publisher.publish(b"first", b"through b").unwrap();
    assert_eq!(publisher.endpoint(), b.pub_endpoint);
    // The first connection is no resync: the message is the first event.
    let m = next_message(&mut sub);
    assert_eq!(
        (m.topic.as_slice(), m.seq, m.gap),
        (&b"first"[..], 1, false)
    );
}

#[test]
fn an_empty_endpoint_list_is_refused() {
    let none: [&str; 0] = [];
    assert!(matches!(
        Subscriber::connect_any(&none),
        Err(ClientError::Zmq(zmq::Error::EINVAL))
    ));
    assert!(matches!(
        Publisher::connect_any(&none),
        Err(ClientError::Zmq(zmq::Error::EINVAL))
    ));
}
