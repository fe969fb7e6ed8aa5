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
        },
        Workload {
            name: "1to1-1k",
            short: "1→1, 1 KiB",
            label: "1→1, 1 KiB",
            pubs: 1,
            subs: 1,
            payload: 1024,
            shape: Shape::SameTopic,
        },
        Workload {
            name: "fanout-10",
            short: "1→10, 64 B",
            label: "1→10 fan-out, 64 B",
            pubs: 1,
            subs: 10,
            payload: 64,
            shape: Shape::SameTopic,
        },
        Workload {
            name: "fanout-100",
            short: "1→100, 64 B",
            label: "1→100 fan-out, 64 B",
            pubs: 1,
            subs: 100,
            payload: 64,
            shape: Shape::SameTopic,
        },
        Workload {
            name: "selective-1000",
            short: "1,000 subs / 10 hot",
            label: "1,000 subs, 10 hot topics, 64 B",
            pubs: 1,
            subs: 1000,
            payload: 64,
            shape: Shape::Selective { hot: 10 },
        },
        Workload {
            name: "4to4",
            short: "4→4, 64 B",
            label: "4 pubs → 4 subs (each gets all), 64 B",
            pubs: 4,
            subs: 4,
            payload: 64,
            shape: Shape::Mesh,
        },
    ]
}

pub fn by_name(name: &str) -> Option<Workload> {
    all().into_iter().find(|w| w.name == name)
}

impl Workload {
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
