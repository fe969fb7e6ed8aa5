//! A cluster of three brokers as separate processes on loopback tcp, with
//! static peers: one-hop forwarding checked against the brute-force
//! matcher, a broker killed and restarted, and interest churn converging.
//!
//! Interest travels asynchronously: a subscriber's OK covers publishers on
//! its own broker at once and those on other brokers once its broker's
//! link has carried the filter. The tests wait for that with a handshake,
//! never a sleep: each subscriber also holds `exact:probe.<name>`, and a
//! publisher repeats probes until each subscriber has received its own.
//! Changes on a link arrive in order, so once a probe filter has reached a
//! broker, every filter its subscriber took before has too.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::child::Options;
use common::{ChildBroker, DEADLINE, Metrics, Rng, free_port, test_seed};
use zbroker::client::{Event, Message, Subscriber, SubscriberOptions};
use zbroker::filter::{Filter, FilterKind};

/// Three brokers named a, b and c, each with fixed ports so one can be
/// restarted where it was.
struct Mesh {
    names: Vec<&'static str>,
    /// Flags every broker gets besides its endpoints.
    extra: Vec<String>,
    ports: BTreeMap<&'static str, Ports>,
    brokers: BTreeMap<&'static str, ChildBroker>,
}

#[derive(Clone, Copy)]
struct Ports {
    publishers: u16,
    subscribers: u16,
    cluster: u16,
}

impl Mesh {
    fn start() -> Mesh {
        Mesh::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Mesh {
        let names = vec!["a", "b", "c"];
        let ports = names
            .iter()
            .map(|&name| {
                (
                    name,
                    Ports {
                        publishers: free_port(),
                        subscribers: free_port(),
                        cluster: free_port(),
                    },
                )
            })
            .collect();
        let mut mesh = Mesh {
            names,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            ports,
            brokers: BTreeMap::new(),
        };
        for name in mesh.names.clone() {
            mesh.start_broker(name);
        }
        mesh.wait_until_linked();
        mesh
    }

    /// Every broker's peer list: the same for all, each one's own included.
    fn peers(&self) -> String {
        self.names
            .iter()
            .map(|n| format!("tcp://127.0.0.1:{}", self.ports[n].cluster))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_broker(&mut self, name: &'static str) {
        let ports = self.ports[name];
        let args = [
            "--pub-bind".to_string(),
            format!("tcp://127.0.0.1:{}", ports.publishers),
            "--sub-bind".into(),
            format!("tcp://127.0.0.1:{}", ports.subscribers),
            "--cluster-bind".into(),
            format!("tcp://127.0.0.1:{}", ports.cluster),
            "--cluster-peers".into(),
            self.peers(),
            "--cluster-id".into(),
            name.to_string(),
            "--cluster-ping-interval".into(),
            "100ms".into(),
            "--cluster-peer-timeout".into(),
            "1s".into(),
            "--sub-timeout".into(),
            "3s".into(),
            "--metrics-bind".into(),
            "127.0.0.1:0".into(),
        ];
        let args: Vec<String> = args.into_iter().chain(self.extra.iter().cloned()).collect();
        let broker = ChildBroker::start_with(&args, Options::default());
        self.brokers.insert(name, broker);
    }

    fn broker(&self, name: &str) -> &ChildBroker {
        &self.brokers[name]
    }

    fn sub_endpoint(&self, name: &str) -> String {
        format!("tcp://127.0.0.1:{}", self.ports[name].subscribers)
    }

    fn pub_endpoint(&self, name: &str) -> String {
        format!("tcp://127.0.0.1:{}", self.ports[name].publishers)
    }

    /// Waits until every broker's link to every other running broker is up.
    fn wait_until_linked(&self) {
        for (name, broker) in &self.brokers {
            let others: Vec<&str> = self
                .brokers
                .keys()
                .copied()
                .filter(|other| other != name)
                .collect();
            broker.wait_for("links to every peer up", |m| {
                others
                    .iter()
                    .all(|peer| peer_gauge(m, "zbroker_peer_up", peer) == Some(1))
            });
        }
    }

    /// Kills a broker with SIGKILL: no goodbye to peers or subscribers.
    fn kill(&mut self, name: &str) {
        let mut broker = self.brokers.remove(name).expect("a running broker");
        broker.child.kill().expect("kill -9 the broker");
        broker.child.wait().expect("reap the broker");
    }
}

/// A per-peer series, if exported.
fn peer_gauge(metrics: &Metrics, name: &str, peer: &str) -> Option<u64> {
    metrics
        .0
        .get(&format!("{name}{{peer=\"{peer}\"}}"))
        .copied()
}

/// A subscriber of the test, on one broker, with the filters it holds.
struct Member {
    name: String,
    client: Subscriber,
    filters: Vec<Filter>,
    received: Vec<Message>,
}

impl Member {
    fn join(name: &str, endpoint: &str, filters: Vec<Filter>) -> Member {
        let options = SubscriberOptions {
            heartbeat: Duration::from_millis(500),
            broker_timeout: Duration::from_secs(2),
            broker_sub_timeout: Duration::from_secs(3),
            ..SubscriberOptions::default()
        };
        let mut client = Subscriber::connect_with(endpoint, options).expect("connect a subscriber");
        for filter in &filters {
            client.subscribe(filter).expect("subscribe");
        }
        client
            .subscribe(&probe_filter(name))
            .expect("subscribe to the probe");
        Member {
            name: name.to_string(),
            client,
            filters,
            received: Vec::new(),
        }
    }

    fn probe_topic(&self) -> Vec<u8> {
        format!("probe.{}", self.name).into_bytes()
    }

    fn wants(&self, topic: &[u8]) -> bool {
        self.filters.iter().any(|f| f.matches(topic))
    }

    /// Takes what arrived within `wait`: messages kept (probes left out),
    /// returns whether its own probe came and any Resync.
    fn drain(&mut self, wait: Duration) -> (bool, Vec<Event>) {
        let mut probed = false;
        let mut resyncs = Vec::new();
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.client.recv_timeout(left).expect("receive") {
                None => return (probed, resyncs),
                Some(Event::Message(m)) if m.topic.starts_with(b"probe.") => {
                    probed |= m.topic == self.probe_topic();
                }
                Some(Event::Message(m)) => self.received.push(m),
                Some(event @ Event::Resync(_)) => resyncs.push(event),
            }
        }
    }
}

fn probe_filter(name: &str) -> Filter {
    Filter::new(FilterKind::Exact, format!("probe.{name}").as_bytes(), 1024).unwrap()
}

/// Publishes every member's probe from `publisher` until each has received
/// its own: then every filter each took before is known on the
/// publisher's broker.
fn probe_all(publisher: &zmq::Socket, members: &mut [&mut Member]) {
    let deadline = Instant::now() + DEADLINE;
    let mut waiting: BTreeSet<usize> = (0..members.len()).collect();
    while !waiting.is_empty() {
        assert!(
            Instant::now() < deadline,
            "probes never reached {:?}",
            waiting
                .iter()
                .map(|&i| &members[i].name)
                .collect::<Vec<_>>()
        );
        for &i in &waiting {
            common::publish(publisher, &members[i].probe_topic(), b"probe");
        }
        waiting.retain(|&i| !members[i].drain(Duration::from_millis(50)).0);
    }
}

/// Receives until every member holds `expected` messages of its own (or the
/// deadline), then proves nothing more is on its way: a probe published
/// after everything arrives after everything.
fn collect_all(publisher: &zmq::Socket, members: &mut [&mut Member], expected: &[usize]) {
    let deadline = Instant::now() + DEADLINE;
    for (member, &want) in members.iter_mut().zip(expected) {
        while member.received.len() < want && Instant::now() < deadline {
            member.drain(Duration::from_millis(20));
        }
    }
    probe_all(publisher, members);
}

/// Random filters over topics of up to three segments from a small
/// alphabet, so that filters overlap.
fn random_filters(rng: &mut Rng) -> Vec<Filter> {
    let count = 1 + rng.below(3);
    (0..count)
        .map(|_| {
            let topic = random_topic(rng);
            match rng.below(3) {
                0 => Filter::new(FilterKind::Exact, &topic, 1024).unwrap(),
                1 => {
                    let cut = 1 + rng.below(topic.len());
                    Filter::new(FilterKind::Prefix, &topic[..cut], 1024).unwrap()
                }
                _ => {
                    let mut segments: Vec<&[u8]> = topic.split(|&b| b == b'.').collect();
                    let at = rng.below(segments.len());
                    segments[at] = b"*";
                    if rng.below(2) == 0 {
                        let last = segments.len() - 1;
                        segments[last] = b">";
                    }
                    Filter::new(FilterKind::Pattern, &segments.join(&b'.'), 1024)
                        .unwrap_or_else(|_| Filter::new(FilterKind::Pattern, b"x.>", 1024).unwrap())
                }
            }
        })
        .collect()
}

fn random_topic(rng: &mut Rng) -> Vec<u8> {
    let segments = 1 + rng.below(3);
    let words: [&[u8]; 4] = [b"net", b"port", b"db", b"vm"];
    (0..segments)
        .map(|_| rng.pick(&words).to_vec())
        .collect::<Vec<_>>()
        .join(&b'.')
}

fn seed() -> u64 {
    let seed = test_seed().unwrap_or(0x5eed_c105);
    eprintln!("seed {seed} (ZBROKER_TEST_SEED to repeat)");
    seed
}

/// Asserts a member got exactly the matching messages of `published`, once
/// each, in publishing order.
fn assert_exactly_matching(member: &Member, published: &[(Vec<u8>, Vec<u8>)]) {
    let expected: Vec<&(Vec<u8>, Vec<u8>)> =
        published.iter().filter(|(t, _)| member.wants(t)).collect();
    let got: Vec<(Vec<u8>, Vec<u8>)> = member
        .received
        .iter()
        .map(|m| (m.topic.clone(), m.payload.clone()))
        .collect();
    let expected: Vec<(Vec<u8>, Vec<u8>)> = expected.into_iter().cloned().collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "{} (filters {:?}) got {} messages, expected {}",
        member.name,
        member.filters,
        got.len(),
        expected.len()
    );
    assert_eq!(
        got, expected,
        "{} got other messages or another order",
        member.name
    );
    assert!(
        member.received.iter().all(|m| !m.gap),
        "{} saw a gap with nothing lost",
        member.name
    );
}

fn publish_random(
    publisher: &zmq::Socket,
    rng: &mut Rng,
    count: usize,
    tag: &str,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let topic = random_topic(rng);
            let payload = format!("{tag}-{i}").into_bytes();
            common::publish(publisher, &topic, &payload);
            (topic, payload)
        })
        .collect()
}

#[test]
fn subscribers_on_three_brokers_get_exactly_the_matching_messages_once_in_order() {
    let mut rng = Rng::new(seed());
    let mesh = Mesh::start();
    let mut members: Vec<Member> = Vec::new();
    for name in ["a", "b", "c"] {
        for i in 0..4 {
            let filters = random_filters(&mut rng);
            members.push(Member::join(
                &format!("{name}{i}"),
                &mesh.sub_endpoint(name),
                filters,
            ));
        }
    }
    let ctx = zmq::Context::new();
    let publisher = common::publisher(&ctx, &mesh.pub_endpoint("a"));
    let mut all: Vec<&mut Member> = members.iter_mut().collect();
    probe_all(&publisher, &mut all);

    let published = publish_random(&publisher, &mut rng, 400, "m");
    let expected: Vec<usize> = all
        .iter()
        .map(|m| published.iter().filter(|(t, _)| m.wants(t)).count())
        .collect();
    collect_all(&publisher, &mut all, &expected);
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

fn everything() -> Vec<Filter> {
    vec![Filter::new(FilterKind::Prefix, b"", 1024).unwrap()]
}

#[test]
fn a_broker_killed_and_restarted_costs_its_peers_nothing_and_rejoins() {
    let mut mesh = Mesh::start();
    let mut a0 = Member::join("a0", &mesh.sub_endpoint("a"), everything());
    let mut b0 = Member::join("b0", &mesh.sub_endpoint("b"), everything());
    let mut c0 = Member::join("c0", &mesh.sub_endpoint("c"), everything());
    let ctx = zmq::Context::new();
    let publisher = common::publisher(&ctx, &mesh.pub_endpoint("a"));
    probe_all(&publisher, &mut [&mut a0, &mut b0, &mut c0]);
    let mut rng = Rng::new(seed());
    let mut published = publish_random(&publisher, &mut rng, 100, "before");
    collect_all(
        &publisher,
        &mut [&mut a0, &mut b0, &mut c0],
        &[100, 100, 100],
    );
    assert_exactly_matching(&b0, &published);

    mesh.kill("b");
    published.extend(publish_random(&publisher, &mut rng, 100, "without-b"));
    collect_all(&publisher, &mut [&mut a0, &mut c0], &[200, 200]);
    assert_exactly_matching(&a0, &published);
    assert_exactly_matching(&c0, &published);
    mesh.broker("a").wait_for("b marked down", |m| {
        peer_gauge(m, "zbroker_peer_up", "b") == Some(0)
    });

    mesh.start_broker("b");
    mesh.wait_until_linked();
    // b0's client notices its broker restarted (a new connection) and
    // subscribes again on the new b.
    let resynced = (0..200).any(|_| !b0.drain(Duration::from_millis(50)).1.is_empty());
    assert!(resynced, "b0 never reported a Resync after b restarted");
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
    let mesh = Mesh::start_with(&["--max-commands-per-sec", "1000000"]);
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
        probe_all(&publisher, &mut all);
        let batch = publish_random(&publisher, &mut rng, 150, name);
        published.extend(batch);
        let expected: Vec<usize> = all
            .iter()
            .map(|m| published.iter().filter(|(t, _)| m.wants(t)).count())
            .collect();
        collect_all(&publisher, &mut all, &expected);
    }
    for member in &all {
        assert_exactly_matching(member, &published);
    }
}
