//! The workloads: who publishes which topics, who subscribes to which, and
//! how many deliveries each subscriber must see. Topics are fixed-width so a
//! ZeroMQ prefix subscription, an exact filter, a Redis channel, a NATS
//! subject and an MQTT topic all select exactly the same messages.

#[derive(Clone, Debug)]
pub struct Workload {
    /// Short name used on the command line and in tables.
    pub name: &'static str,
    /// Description for the report.
    pub label: &'static str,
    /// Axis label for the plot.
    pub short: &'static str,
    pub pubs: usize,
    pub subs: usize,
    pub payload: usize,
    pub shape: Shape,
    /// Which node of a cluster each client connects to (a single broker
    /// has only node 0).
    pub placement: Placement,
    /// Latency workloads: every run is paced at this total rate and
    /// records latency (no calibration, no flat-out run).
    pub fixed_rate: Option<f64>,
}

/// Where clients sit in a cluster of nodes A, B, C (publishers always on
/// A); on fewer nodes, node numbers wrap around (all on the one broker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Everything on A.
    Local,
    /// Subscribers on B: every delivery crosses one link.
    Remote,
    /// Subscriber s on node s % 3 (100 subscribers: 34 on A, 33 on B, 33
    /// on C).
    Spread,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Every subscriber holds the one topic the publisher uses.
    SameTopic,
    /// Subscriber i holds `s.<i>`; the publisher round-robins the first
    /// `hot` of them.
    Selective { hot: usize },
    /// Publisher p uses `m.<p>`; every subscriber holds all of them.
    Mesh,
}

pub fn all() -> Vec<Workload> {
    vec![
        Workload {
            name: "1to1-64",
            short: "1→1, 64 B",
            label: "1→1, 64 B",
            pubs: 1,
            subs: 1,
            payload: 64,
            shape: Shape::SameTopic,
            placement: Placement::Local,
            fixed_rate: None,
        },
        Workload {
            name: "1to1-1k",
            short: "1→1, 1 KiB",
            label: "1→1, 1 KiB",
            pubs: 1,
            subs: 1,
            payload: 1024,
            shape: Shape::SameTopic,
            placement: Placement::Local,
            fixed_rate: None,
        },
        Workload {
            name: "fanout-10",
            short: "1→10, 64 B",
            label: "1→10 fan-out, 64 B",
            pubs: 1,
            subs: 10,
            payload: 64,
            shape: Shape::SameTopic,
            placement: Placement::Local,
            fixed_rate: None,
        },
        Workload {
            name: "fanout-100",
            short: "1→100, 64 B",
            label: "1→100 fan-out, 64 B",
            pubs: 1,
            subs: 100,
            payload: 64,
            shape: Shape::SameTopic,
            placement: Placement::Local,
            fixed_rate: None,
        },
        Workload {
            name: "selective-1000",
            short: "1,000 subs / 10 hot",
            label: "1,000 subs, 10 hot topics, 64 B",
            pubs: 1,
            subs: 1000,
            payload: 64,
            shape: Shape::Selective { hot: 10 },
            placement: Placement::Local,
            fixed_rate: None,
        },
        Workload {
            name: "4to4",
            short: "4→4, 64 B",
            label: "4 pubs → 4 subs (each gets all), 64 B",
            pubs: 4,
            subs: 4,
            payload: 64,
            shape: Shape::Mesh,
            placement: Placement::Local,
            fixed_rate: None,
        },
    ]
}

/// The publish rate of the cluster latency workloads: moderate, so that
/// every system (three brokers and the clients on two cores included)
/// carries it without queueing.
pub const LATENCY_RATE: f64 = 10_000.0;

/// The workloads of `compare cluster`: a cluster's nodes A, B and C, the
/// publisher on A (on a single broker everything is on it).
pub fn cluster() -> Vec<Workload> {
    let one = |name, label, short, payload, placement, fixed_rate| Workload {
        name,
        label,
        short,
        pubs: 1,
        subs: 1,
        payload,
        shape: Shape::SameTopic,
        placement,
        fixed_rate,
    };
    vec![
        one(
            "hop-1to1-64",
            "1→1 across brokers (A→B), 64 B",
            "1→1 A→B, 64 B",
            64,
            Placement::Remote,
            None,
        ),
        one(
            "hop-1to1-1k",
            "1→1 across brokers (A→B), 1 KiB",
            "1→1 A→B, 1 KiB",
            1024,
            Placement::Remote,
            None,
        ),
        Workload {
            name: "spread-fanout-100",
            label: "1→100, subscribers 34/33/33 on A/B/C, 64 B",
            short: "1→100 spread, 64 B",
            pubs: 1,
            subs: 100,
            payload: 64,
            shape: Shape::SameTopic,
            placement: Placement::Spread,
            fixed_rate: None,
        },
        one(
            "lat-local",
            "latency at 10k msg/s, publisher and subscriber on A, 64 B",
            "latency A→A",
            64,
            Placement::Local,
            Some(LATENCY_RATE),
        ),
        one(
            "lat-hop",
            "latency at 10k msg/s, publisher on A, subscriber on B, 64 B",
            "latency A→B",
            64,
            Placement::Remote,
            Some(LATENCY_RATE),
        ),
    ]
}

pub fn by_name(name: &str) -> Option<Workload> {
    all().into_iter().chain(cluster()).find(|w| w.name == name)
}

impl Workload {
    /// The node publisher `p` connects to: always A.
    pub fn pub_node(&self, _p: usize) -> usize {
        0
    }

    /// The node subscriber `s` connects to.
    pub fn sub_node(&self, s: usize) -> usize {
        match self.placement {
            Placement::Local => 0,
            Placement::Remote => 1,
            Placement::Spread => s % 3,
        }
    }

    /// Topics publisher `p` round-robins while measuring.
    pub fn pub_topics(&self, p: usize) -> Vec<String> {
        match self.shape {
            Shape::SameTopic => vec!["b.0000".into()],
            Shape::Selective { hot } => (0..hot).map(|i| format!("s.{i:04}")).collect(),
            Shape::Mesh => vec![format!("m.{p:04}")],
        }
    }

    /// Topics publisher `p` sends warm-up messages to: every topic some
    /// subscriber holds, so every subscription is proven before measuring.
    pub fn warm_topics(&self, p: usize) -> Vec<String> {
        match self.shape {
            Shape::Selective { .. } => (0..self.subs).map(|i| format!("s.{i:04}")).collect(),
            _ => self.pub_topics(p),
        }
    }

    /// Topics subscriber `s` holds.
    pub fn sub_topics(&self, s: usize) -> Vec<String> {
        match self.shape {
            Shape::SameTopic => vec!["b.0000".into()],
            Shape::Selective { .. } => vec![format!("s.{s:04}")],
            Shape::Mesh => (0..self.pubs).map(|p| format!("m.{p:04}")).collect(),
        }
    }

    /// The warm-up bits subscriber `s` must collect (one per publisher whose
    /// warm-up topics it holds).
    pub fn ready_mask(&self, s: usize) -> u64 {
        let mine = self.sub_topics(s);
        (0..self.pubs)
            .filter(|&p| self.warm_topics(p).iter().any(|t| mine.contains(t)))
            .fold(0, |m, p| m | 1 << p)
    }

    /// Measured messages subscriber `s` must receive when publisher p sent
    /// `sent[p]` (publisher p sends its k-th message to
    /// `pub_topics(p)[k % len]`).
    pub fn expected(&self, s: usize, sent: &[u64]) -> u64 {
        let mine = self.sub_topics(s);
        let mut total = 0;
        for (p, &n) in sent.iter().enumerate() {
            let topics = self.pub_topics(p);
            let len = topics.len() as u64;
            for (t, topic) in topics.iter().enumerate() {
                if mine.contains(topic) {
                    total += n / len + u64::from((t as u64) < n % len);
                }
            }
        }
        total
    }

    /// Subscribers that receive measured messages.
    pub fn receivers(&self) -> Vec<usize> {
        (0..self.subs)
            .filter(|&s| self.expected(s, &vec![1_000_000; self.pubs]) > 0)
            .collect()
    }

    /// Deliveries per published message.
    pub fn fan(&self) -> f64 {
        match self.shape {
            Shape::SameTopic => self.subs as f64,
            Shape::Selective { .. } => 1.0,
            Shape::Mesh => self.subs as f64,
        }
    }

    /// Whether brokerless PUB/SUB (not PUSH→PULL) is the direct ceiling.
    pub fn direct_is_pubsub(&self) -> bool {
        !(self.pubs == 1 && self.subs == 1)
    }
}
