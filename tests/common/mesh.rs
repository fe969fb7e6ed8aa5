//! Three brokers as separate processes on loopback tcp, linked as a
//! cluster (static peers or etcd), and the subscribers of a test on them:
//! shared by `tests/cluster.rs` and `tests/cluster_etcd.rs`.
//!
//! Interest travels asynchronously: a subscriber's OK covers publishers on
//! its own broker at once and those on other brokers once its broker's
//! link has carried the filter. The tests wait for that with a handshake,
//! never a sleep: each subscriber also holds `exact:probe.<name>`, and a
//! publisher repeats probes until each subscriber has received its own.
//! Changes on a link arrive in order, so once a probe filter has reached a
//! broker, every filter its subscriber took before has too.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::child::Options;
use super::{ChildBroker, DEADLINE, Metrics, Rng, free_port, test_seed};
use zbroker::client::{Event, Message, Subscriber, SubscriberOptions};
use zbroker::filter::{Filter, FilterKind};

/// How the brokers find each other.
#[derive(Clone)]
pub enum Membership {
    /// `--cluster-peers`: the same list for all, each one's own included.
    Static,
    /// `--cluster-etcd URL --cluster-name NAME`.
    Etcd { url: String, name: String },
}

/// Three brokers named a, b and c, each with fixed ports so one can be
/// restarted where it was.
pub struct Mesh {
    membership: Membership,
    names: Vec<&'static str>,
    /// Flags every broker gets besides its endpoints.
    extra: Vec<String>,
    ports: BTreeMap<&'static str, Ports>,
    brokers: BTreeMap<&'static str, ChildBroker>,
}

#[derive(Clone, Copy)]
pub struct Ports {
    publishers: u16,
    subscribers: u16,
    cluster: u16,
}

impl Mesh {
    /// Three brokers with static peers, linked.
    pub fn start() -> Mesh {
        Mesh::start_with(Membership::Static, &[])
    }

    /// Three brokers finding each other through `membership`, with `extra`
    /// flags each, linked.
    pub fn start_with(membership: Membership, extra: &[&str]) -> Mesh {
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
            membership,
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
    pub fn peers(&self) -> String {
        self.names
            .iter()
            .map(|n| format!("tcp://127.0.0.1:{}", self.ports[n].cluster))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn start_broker(&mut self, name: &'static str) {
        let ports = self.ports[name];
        let args = [
            "--pub-bind".to_string(),
            format!("tcp://127.0.0.1:{}", ports.publishers),
            "--sub-bind".into(),
            format!("tcp://127.0.0.1:{}", ports.subscribers),
            "--cluster-bind".into(),
            format!("tcp://127.0.0.1:{}", ports.cluster),
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
        let membership = match &self.membership {
            Membership::Static => vec!["--cluster-peers".to_string(), self.peers()],
            Membership::Etcd { url, name } => vec![
                "--cluster-etcd".to_string(),
                url.clone(),
                "--cluster-name".into(),
                name.clone(),
                "--cluster-lease-ttl".into(),
                "2s".into(),
            ],
        };
        let args: Vec<String> = args
            .into_iter()
            .chain(membership)
            .chain(self.extra.iter().cloned())
            .collect();
        let broker = ChildBroker::start_with(&args, Options::default());
        self.brokers.insert(name, broker);
    }

    pub fn broker(&self, name: &str) -> &ChildBroker {
        &self.brokers[name]
    }

    pub fn sub_endpoint(&self, name: &str) -> String {
        format!("tcp://127.0.0.1:{}", self.ports[name].subscribers)
    }

    pub fn pub_endpoint(&self, name: &str) -> String {
        format!("tcp://127.0.0.1:{}", self.ports[name].publishers)
    }

    /// Waits until every broker's link to every other running broker is up.
    pub fn wait_until_linked(&self) {
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
    pub fn kill(&mut self, name: &str) {
        let mut broker = self.brokers.remove(name).expect("a running broker");
        broker.child.kill().expect("kill -9 the broker");
        broker.child.wait().expect("reap the broker");
    }
}

/// A per-peer series, if exported.
pub fn peer_gauge(metrics: &Metrics, name: &str, peer: &str) -> Option<u64> {
    metrics
        .0
        .get(&format!("{name}{{peer=\"{peer}\"}}"))
        .copied()
}

/// A subscriber of the test, on one broker, with the filters it holds.
pub struct Member {
    pub name: String,
    pub client: Subscriber,
    pub filters: Vec<Filter>,
    pub received: Vec<Message>,
}

impl Member {
    pub fn join(name: &str, endpoint: &str, filters: Vec<Filter>) -> Member {
        Member::join_any(name, &[endpoint], filters)
    }

    /// A member whose client fails over across `endpoints`, first to last.
    pub fn join_any(name: &str, endpoints: &[&str], filters: Vec<Filter>) -> Member {
        let options = SubscriberOptions {
            heartbeat: Duration::from_millis(500),
            broker_timeout: Duration::from_secs(2),
            broker_sub_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
            ..SubscriberOptions::default()
        };
        let mut client =
            Subscriber::connect_any_with(endpoints, options).expect("connect a subscriber");
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

    pub fn probe_topic(&self) -> Vec<u8> {
        format!("probe.{}", self.name).into_bytes()
    }

    pub fn wants(&self, topic: &[u8]) -> bool {
        self.filters.iter().any(|f| f.matches(topic))
    }

    /// Takes what arrived within `wait`: messages kept (probes left out),
    /// returns whether its own probe came and any Resync.
    pub fn drain(&mut self, wait: Duration) -> (bool, Vec<Event>) {
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

pub fn probe_filter(name: &str) -> Filter {
    Filter::new(FilterKind::Exact, format!("probe.{name}").as_bytes(), 1024).unwrap()
}

/// Publishes every member's probe from `publisher` until each has received
/// its own: then every filter each took before is known on the
/// publisher's broker.
pub fn probe_all(publisher: &zmq::Socket, members: &mut [&mut Member]) {
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
            super::publish(publisher, &members[i].probe_topic(), b"probe");
        }
        waiting.retain(|&i| !members[i].drain(Duration::from_millis(50)).0);
    }
}

/// Receives until every member holds `expected` messages of its own (or the
/// deadline), then proves nothing more is on its way: a probe published
/// after everything arrives after everything.
pub fn collect_all(publisher: &zmq::Socket, members: &mut [&mut Member], expected: &[usize]) {
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
pub fn random_filters(rng: &mut Rng) -> Vec<Filter> {
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

pub fn random_topic(rng: &mut Rng) -> Vec<u8> {
    let segments = 1 + rng.below(3);
    let words: [&[u8]; 4] = [b"net", b"port", b"db", b"vm"];
    (0..segments)
        .map(|_| rng.pick(&words).to_vec())
        .collect::<Vec<_>>()
        .join(&b'.')
}

pub fn seed() -> u64 {
    let seed = test_seed().unwrap_or(0x5eed_c105);
    eprintln!("seed {seed} (ZBROKER_TEST_SEED to repeat)");
    seed
}

/// Asserts a member got exactly the matching messages of `published`, once
/// each, in publishing order.
pub fn assert_exactly_matching(member: &Member, published: &[(Vec<u8>, Vec<u8>)]) {
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

pub fn publish_random(
    publisher: &zmq::Socket,
    rng: &mut Rng,
    count: usize,
    tag: &str,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let topic = random_topic(rng);
            let payload = format!("{tag}-{i}").into_bytes();
            super::publish(publisher, &topic, &payload);
            (topic, payload)
        })
        .collect()
}

/// The one filter matching every topic.
pub fn everything() -> Vec<Filter> {
    vec![Filter::new(FilterKind::Prefix, b"", 1024).unwrap()]
}

/// `per_broker` members on each broker, each with random filters.
pub fn random_members(mesh: &Mesh, rng: &mut Rng, per_broker: usize) -> Vec<Member> {
    let mut members = Vec::new();
    for name in mesh.names.clone() {
        for i in 0..per_broker {
            let filters = random_filters(rng);
            members.push(Member::join(
                &format!("{name}{i}"),
                &mesh.sub_endpoint(name),
                filters,
            ));
        }
    }
    members
}

/// Publishes `count` random messages through `publisher` once every member
/// is probed, waits until each member has what it wants of them, and
/// returns them (appended to `published`, which the members are checked
/// against at the end).
pub fn publish_and_collect(
    publisher: &zmq::Socket,
    rng: &mut Rng,
    count: usize,
    tag: &str,
    members: &mut [&mut Member],
    published: &mut Vec<(Vec<u8>, Vec<u8>)>,
) {
    probe_all(publisher, members);
    published.extend(publish_random(publisher, rng, count, tag));
    let expected: Vec<usize> = members
        .iter()
        .map(|m| published.iter().filter(|(t, _)| m.wants(t)).count())
        .collect();
    collect_all(publisher, members, &expected);
}
