//! A cluster of three brokers as separate processes on loopback tcp, with
//! static peers: one-hop forwarding checked against the brute-force
//! matcher, a broker killed and restarted, and interest churn converging.
//! The harness and its handshakes are `tests/common/mesh.rs`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::Rng;
use common::mesh::*;
use zbroker::client::{Event, ResyncReason};
use zbroker::filter::Filter;

#[test]
fn subscribers_on_three_brokers_get_exactly_the_matching_messages_once_in_order() {
    let mut rng = Rng::new(seed());
    let mesh = Mesh::start();
    let mut members = random_members(&mesh, &mut rng, 4);
    let ctx = zmq::Context::new();
    let publisher = common::publisher(&ctx, &mesh.pub_endpoint("a"));
    let mut all: Vec<&mut Member> = members.iter_mut().collect();
    let mut published = Vec::new();
    publish_and_collect(&publisher, &mut rng, 400, "m", &mut all, &mut published);
    for member in &all {
        assert_exactly_matching(member, &published);
    }
    // One hop: b and c forwarded nothing (they have no publishers), and
    // what a forwarded to each arrived whole.
    for peer in ["b", "c"] {
        let sent = mesh.broker("a").wait_for("forwards counted", |m| {
            peer_gauge(m, "zbroker_peer_messages_forwarded_total", peer).is_some_and(|n| n > 0)
        });
        let forwarded = peer_gauge(&sent, "zbroker_peer_messages_forwarded_total", peer).unwrap();
        let there = mesh.broker(peer).wait_for("forwards received", |m| {
            peer_gauge(m, "zbroker_peer_messages_received_total", "a") == Some(forwarded)
        });
        assert_eq!(
            peer_gauge(&there, "zbroker_peer_messages_lost_total", "a"),
            Some(0)
        );
        assert_eq!(
            there.get("zbroker_cluster_messages_forwarded_total"),
            0,
            "{peer} forwarded a peer's message"
        );
    }
}

#[test]
fn a_broker_killed_and_restarted_costs_its_peers_nothing_and_rejoins() {
    let mut mesh = Mesh::start();
    let mut a0 = Member::join("a0", &mesh.sub_endpoint("a"), everything());
    let mut b0 = Member::join("b0", &mesh.sub_endpoint("b"), everything());
    let mut c0 = Member::join("c0", &mesh.sub_endpoint("c"), everything());
    let on_b_then_c = [mesh.sub_endpoint("b"), mesh.sub_endpoint("c")];
    let on_b_then_c: Vec<&str> = on_b_then_c.iter().map(String::as_str).collect();
    let mut mover = Member::join_any("mover", &on_b_then_c, everything());
    let ctx = zmq::Context::new();
    let publisher = common::publisher(&ctx, &mesh.pub_endpoint("a"));
    probe_all(&publisher, &mut [&mut a0, &mut b0, &mut c0, &mut mover]);
    let mut rng = Rng::new(seed());
    let mut published = publish_random(&publisher, &mut rng, 100, "before");
    collect_all(
        &publisher,
        &mut [&mut a0, &mut b0, &mut c0],
        &[100, 100, 100],
    );
    assert_exactly_matching(&b0, &published);

    mesh.kill("b");
    // b's subscriber with a list of brokers moves to the next one and
    // says so.
    let failed_over = (0..200).find_map(|_| {
        let (_, resyncs) = mover.drain(Duration::from_millis(50));
        resyncs.into_iter().next()
    });
    match failed_over {
        Some(Event::Resync(ResyncReason::FailedOver { to, .. })) => {
            assert_eq!(to, mesh.sub_endpoint("c"), "b's subscriber moved elsewhere")
        }
        other => panic!("b's subscriber did not fail over: {other:?}"),
    }
    mover.received.clear();
    probe_all(&publisher, &mut [&mut mover]);
    let without_b = publish_random(&publisher, &mut rng, 100, "without-b");
    published.extend(without_b.iter().cloned());
    collect_all(
        &publisher,
        &mut [&mut a0, &mut c0, &mut mover],
        &[200, 200, 100],
    );
    assert_exactly_matching(&a0, &published);
    assert_exactly_matching(&c0, &published);
    assert_exactly_matching(&mover, &without_b);
    mesh.broker("a").wait_for("b marked down", |m| {
        peer_gauge(m, "zbroker_peer_up", "b") == Some(0)
    });

    // A publisher of b's queues while b is down; the restarted b reads it
    // only once a's and c's interest is in, so their subscribers get all
    // of it.
    let at_b = common::publisher(&ctx, &mesh.pub_endpoint("b"));
    let queued = publish_random(&at_b, &mut rng, 30, "queued-at-b");
    mesh.start_broker("b");
    mesh.wait_until_linked();
    // b0's client notices its broker restarted (a new connection) and
    // subscribes again on the new b.
    let resynced = (0..200).any(|_| !b0.drain(Duration::from_millis(50)).1.is_empty());
    assert!(resynced, "b0 never reported a Resync after b restarted");
    for member in [&mut a0, &mut c0] {
        let deadline = std::time::Instant::now() + common::DEADLINE;
        let from_b = |m: &Member| {
            m.received
                .iter()
                .filter(|m| m.payload.starts_with(b"queued-at-b"))
                .map(|m| (m.topic.clone(), m.payload.clone()))
                .collect::<Vec<_>>()
        };
        while from_b(member).len() < queued.len() && std::time::Instant::now() < deadline {
            member.drain(Duration::from_millis(20));
        }
        assert_eq!(
            from_b(member),
            queued,
            "{} missed what b's publisher queued while b was down",
            member.name
        );
        member
            .received
            .retain(|m| !m.payload.starts_with(b"queued-at-b"));
    }
    let mut b1 = Member::join("b1", &mesh.sub_endpoint("b"), everything());
    probe_all(&publisher, &mut [&mut a0, &mut b0, &mut b1, &mut c0]);
    let after = publish_random(&publisher, &mut rng, 100, "after");
    published.extend(after.iter().cloned());
    b0.received.clear();
    collect_all(
        &publisher,
        &mut [&mut a0, &mut b0, &mut b1, &mut c0],
        &[300, 100, 100, 300],
    );
    assert_exactly_matching(&a0, &published);
    assert_exactly_matching(&c0, &published);
    assert_exactly_matching(&b1, &after);
    assert_exactly_matching(&b0, &after);
}

#[test]
fn ten_thousand_interest_changes_converge_to_one_brokers_routing() {
    let mut rng = Rng::new(seed());
    let mesh = Mesh::start_with(Membership::Static, &["--max-commands-per-sec", "1000000"]);
    let pool: Vec<Filter> = (0..60).flat_map(|_| random_filters(&mut rng)).collect();
    let mut members: Vec<Member> = Vec::new();
    for name in ["a", "b", "c"] {
        for i in 0..3 {
            members.push(Member::join(
                &format!("{name}{i}"),
                &mesh.sub_endpoint(name),
                Vec::new(),
            ));
        }
    }
    let mut held: Vec<BTreeSet<Filter>> = vec![BTreeSet::new(); members.len()];
    for _ in 0..10_000 {
        let who = rng.below(members.len());
        let filter = rng.pick(&pool).clone();
        if held[who].contains(&filter) {
            members[who]
                .client
                .unsubscribe(&filter)
                .expect("unsubscribe");
            held[who].remove(&filter);
        } else {
            members[who].client.subscribe(&filter).expect("subscribe");
            held[who].insert(filter);
        }
    }
    for (member, filters) in members.iter_mut().zip(&held) {
        member.filters = filters.iter().cloned().collect();
    }
    // Every broker holds, for each peer, exactly the distinct filters that
    // peer's subscribers hold (probes included).
    for name in ["a", "b", "c"] {
        let local: BTreeSet<&Filter> = members
            .iter()
            .zip(&held)
            .filter(|(m, _)| m.name.starts_with(name))
            .flat_map(|(_, f)| f.iter())
            .collect();
        let distinct = local.len() as u64 + 3;
        mesh.broker(name).wait_for("its interest counted", |m| {
            m.get("zbroker_cluster_interest_filters") == distinct
        });
        for other in ["a", "b", "c"].into_iter().filter(|o| *o != name) {
            mesh.broker(other)
                .wait_for("the peer's interest converged", |m| {
                    peer_gauge(m, "zbroker_peer_interest_entries", name) == Some(distinct)
                });
        }
    }
    // And routes as one broker would: publish from each broker in turn.
    let ctx = zmq::Context::new();
    let mut all: Vec<&mut Member> = members.iter_mut().collect();
    let mut published = Vec::new();
    for name in ["a", "b", "c"] {
        let publisher = common::publisher(&ctx, &mesh.pub_endpoint(name));
        publish_and_collect(&publisher, &mut rng, 150, name, &mut all, &mut published);
    }
    for member in &all {
        assert_exactly_matching(member, &published);
    }
}
