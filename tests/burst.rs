//! A burst of 100,000 messages while the broker is busy arrives whole: the
//! event loop does not stall on ZMQ_FD's edge-triggered wake-ups.

mod common;

use common::{TestBroker, Transport};

const BURST: usize = 100_000;
const PUBLISHERS: usize = 2;

fn burst(transport: Transport) {
    let mut config = common::test_config();
    // Room for the whole burst, so a slow test reader cannot cause drops:
    // this test is about stalls, not overflow.
    config.queue.max_messages = BURST + 10;
    // The reader does not ping while it reads; expiry is not under test.
    config.sub_timeout = std::time::Duration::from_secs(120);
    let broker = TestBroker::start(transport, config);
    let ctx = zmq::Context::new();
    let sub = common::RawSubscriber::connect(&ctx, &broker.sub_endpoint);
    sub.subscribe("prefix", b"burst.");

    // Keep the broker busy with commands on the ROUTER side while the
    // publishers flood the PULL side.
    let churn_endpoint = broker.sub_endpoint.clone();
    let churn_ctx = ctx.clone();
    let churn = std::thread::spawn(move || {
        let churner = common::RawSubscriber::connect(&churn_ctx, &churn_endpoint);
        for i in 0..2_000 {
            let filter = format!("other.{i}");
            churner.subscribe("exact", filter.as_bytes());
            let reply = churner.call(&[b"UNSUB", b"exact", filter.as_bytes()]);
            assert_eq!(reply[0], b"OK");
        }
    });
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let endpoint = broker.pub_endpoint.clone();
            let ctx = ctx.clone();
            std::thread::spawn(move || {
                let socket = common::publisher(&ctx, &endpoint);
                for n in 0..BURST / PUBLISHERS {
                    let topic = format!("burst.{p}");
                    common::publish(&socket, topic.as_bytes(), &(n as u64).to_be_bytes());
                }
                socket // kept open until everything has arrived
            })
        })
        .collect();

    // Every message, each publisher's in order, with consecutive seqs. A
    // stall shows as the receive timeout failing the test.
    let mut next = [0u64; PUBLISHERS];
    for expected_seq in 1..=BURST as u64 {
        let (seq, topic, payload) = match sub.socket.poll(zmq::POLLIN, 10_000) {
            Ok(1) => sub.recv_message(),
            _ => panic!(
                "{transport:?}: stalled after {} messages: {:#?}",
                expected_seq - 1,
                broker.stats.snapshot()
            ),
        };
        assert_eq!(seq, expected_seq, "{transport:?}: gap in seq");
        let p: usize = std::str::from_utf8(&topic[6..]).unwrap().parse().unwrap();
        let n = u64::from_be_bytes(payload.try_into().unwrap());
        assert_eq!(n, next[p], "{transport:?}: publisher {p} out of order");
        next[p] += 1;
    }
    let sockets: Vec<zmq::Socket> = publishers.into_iter().map(|p| p.join().unwrap()).collect();
    drop(sockets);
    churn.join().unwrap();
    let stats = broker.stop();
    assert_eq!(stats.counters.delivered, BURST as u64);
    assert_eq!(stats.counters.dropped_queue_full, 0);
}

#[test]
fn burst_of_100k_is_fully_delivered_over_tcp() {
    burst(Transport::Tcp);
}

#[test]
fn burst_of_100k_is_fully_delivered_over_ipc() {
    burst(Transport::Ipc);
}
