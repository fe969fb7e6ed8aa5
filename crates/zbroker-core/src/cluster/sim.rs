//! Two brokers linked in memory, driven by a script of operations, against
//! a model of what broker A's interest must be: the property test of the
//! interest table and the link protocol, and the `cluster_interest` fuzz
//! target (built with the `sim` feature).
//!
//! Broker A has local subscribers (DEALERs) and an XPUB front; its one
//! outgoing link goes to broker B, which serves it. Every frame either way
//! waits in a queue the script controls: it can be delivered, dropped (a
//! lossy or broken link), or B can see the link arrive on a new connection
//! (a reconnect) or restart with a new epoch, and time can pass (PINGs,
//! peer expiry). The model counts, per filter, how many of A's local
//! holders have it, updated from the replies A really sent (a SUB refused
//! by a limit changes nothing).
//!
//! Checked after every operation: A's interest table holds exactly the
//! model's counts. Checked at the end, once the link is left to settle
//! (frames delivered both ways, PINGs and their answers, until nothing is
//! owed): B holds, as A's interest, exactly the filters the model counts
//! above zero, and a message published on B is forwarded to A exactly
//! when one of them matches its topic.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::broker::{Broker, SendOutcome, Transport};
use crate::cluster::{Identity, LinkId};
use crate::config::BrokerConfig;
use crate::filter::{Filter, FilterKind};

type Bytes = Rc<[u8]>;

/// Filters the script picks from: overlapping, of all three kinds.
const FILTERS: [(FilterKind, &[u8]); 8] = [
    (FilterKind::Exact, b"a.b"),
    (FilterKind::Exact, b"a"),
    (FilterKind::Prefix, b""),
    (FilterKind::Prefix, b"a"),
    (FilterKind::Prefix, b"a.b"),
    (FilterKind::Pattern, b"a.*"),
    (FilterKind::Pattern, b"*.b"),
    (FilterKind::Pattern, b"a.>"),
];

/// Topics the final check publishes on B.
const TOPICS: [&[u8]; 6] = [b"a", b"a.b", b"a.c", b"b.b", b"a.b.c", b"c"];

/// What every broker sends, kept for the script to pass on.
#[derive(Default)]
struct Wire {
    /// Frames on A's link, towards B.
    to_b: VecDeque<Vec<u8>>,
    /// Frames B sent back on that link (PONG, RESET, REFUSED, FORWARD
    /// headers with their topic and payload).
    to_a: VecDeque<Vec<Vec<u8>>>,
    /// Replies to A's local subscribers: (routing id, first frame).
    replies: Vec<(Vec<u8>, Vec<u8>)>,
    /// Forwards from B, counted for the final check.
    forwards: usize,
}

/// The transport of broker A.
struct AOut<'a>(&'a mut Wire);

impl Transport<Bytes> for AOut<'_> {
    fn deliver(&mut self, _: &[u8], _: u64, _: &[u8], _: &mut Bytes, _: bool) -> SendOutcome {
        SendOutcome::Sent
    }
    fn reply(&mut self, to: &[u8], frames: &[&[u8]]) -> SendOutcome {
        let first = frames.first().map_or(Vec::new(), |f| f.to_vec());
        self.0.replies.push((to.to_vec(), first));
        SendOutcome::Sent
    }
    fn to_xpub(&mut self, _: &[u8], _: &mut Bytes, _: bool) -> SendOutcome {
        SendOutcome::Sent
    }
    fn to_link(&mut self, _: LinkId, frame: &[u8]) -> SendOutcome {
        self.0.to_b.push_back(frame.to_vec());
        SendOutcome::Sent
    }
}

/// The transport of broker B: what it sends on A's link goes back to A.
struct BOut<'a> {
    wire: &'a mut Wire,
    /// The routing id A's link has at B now; sends to another are lost.
    link_at_b: &'a [u8],
}

impl Transport<Bytes> for BOut<'_> {
    fn deliver(&mut self, _: &[u8], _: u64, _: &[u8], _: &mut Bytes, _: bool) -> SendOutcome {
        SendOutcome::Sent
    }
    fn reply(&mut self, _: &[u8], _: &[&[u8]]) -> SendOutcome {
        SendOutcome::Sent
    }
    fn forward(
        &mut self,
        to: &[u8],
        seq: u64,
        topic: &[u8],
        payload: &mut Bytes,
        _: bool,
    ) -> SendOutcome {
        if to != self.link_at_b {
            return SendOutcome::Unreachable;
        }
        let mut header = [0; super::wire::FORWARD_HEADER_MAX];
        let len = super::wire::forward_header(seq, &mut header);
        self.wire.forwards += 1;
        self.wire.to_a.push_back(vec![
            header[..len].to_vec(),
            topic.to_vec(),
            payload.to_vec(),
        ]);
        SendOutcome::Sent
    }
    fn to_peer(&mut self, to: &[u8], frame: &[u8]) -> SendOutcome {
        if to != self.link_at_b {
            return SendOutcome::Unreachable;
        }
        self.wire.to_a.push_back(vec![frame.to_vec()]);
        SendOutcome::Sent
    }
}

/// The two brokers, the frames between them, and the model.
struct Sim {
    a: Broker<Bytes>,
    b: Broker<Bytes>,
    link: LinkId,
    /// A's link's routing id at B: a new one for every reconnect.
    link_at_b: Vec<u8>,
    wire: Wire,
    now: Instant,
    /// Per filter, how many of A's local holders have it.
    model: BTreeMap<Filter, u32>,
    /// Which filters each of A's subscribers holds (by index in FILTERS).
    held: [[bool; FILTERS.len()]; 4],
    /// SUB sockets' subscriptions on A's XPUB front, per prefix filter.
    xpub: BTreeMap<usize, u32>,
    restarts: u64,
    connections: u64,
}

fn config() -> BrokerConfig {
    let mut config = BrokerConfig {
        sub_timeout: Duration::from_secs(3600),
        ..BrokerConfig::default()
    };
    config.limits.max_commands_per_sec = 1_000_000;
    config
}

fn filter(i: usize) -> Filter {
    let (kind, text) = FILTERS[i % FILTERS.len()];
    Filter::new(kind, text, 64).expect("the script's filters are valid")
}

impl Sim {
    fn new() -> Sim {
        let now = Instant::now();
        let mut a = Broker::new(config(), now);
        a.open_xpub_front();
        a.enable_cluster(
            Identity {
                broker_id: "a".into(),
                epoch: 1,
            },
            now,
        );
        let mut b = Broker::new(config(), now);
        b.enable_cluster(
            Identity {
                broker_id: "b".into(),
                epoch: 1,
            },
            now,
        );
        let link = a.add_link("inproc://b", now).expect("A is clustered");
        Sim {
            a,
            b,
            link,
            link_at_b: b"link-0".to_vec(),
            wire: Wire::default(),
            now,
            model: BTreeMap::new(),
            held: [[false; FILTERS.len()]; 4],
            xpub: BTreeMap::new(),
            restarts: 0,
            connections: 0,
        }
    }

    fn hold(&mut self, f: &Filter, add: bool) {
        let count = self.model.entry(f.clone()).or_insert(0);
        if add {
            *count += 1;
        } else {
            *count -= 1;
            if *count == 0 {
                self.model.remove(f);
            }
        }
    }

    /// A local subscriber of A subscribes (or unsubscribes) a filter; the
    /// model follows A's reply.
    fn command(&mut self, who: usize, which: usize, subscribe: bool) {
        let who = who % self.held.len();
        let which = which % FILTERS.len();
        let f = filter(which);
        let routing_id = [b's', who as u8];
        let verb: &[u8] = if subscribe { b"SUB" } else { b"UNSUB" };
        self.wire.replies.clear();
        self.a.on_command(
            &routing_id,
            None,
            &[verb, f.kind().as_bytes(), f.text()],
            3,
            self.now,
            &mut AOut(&mut self.wire),
        );
        let ok = self
            .wire
            .replies
            .iter()
            .any(|(to, first)| to == &routing_id && first == b"OK");
        if ok && self.held[who][which] != subscribe {
            self.held[who][which] = subscribe;
            self.hold(&f, subscribe);
        }
    }

    /// A SUB socket on A's XPUB front subscribes or unsubscribes a prefix.
    fn notice(&mut self, which: usize, subscribe: bool) {
        // Only the prefix filters.
        let prefixes: Vec<usize> = (0..FILTERS.len())
            .filter(|&i| FILTERS[i].0 == FilterKind::Prefix)
            .collect();
        let which = prefixes[which % prefixes.len()];
        let f = filter(which);
        let mut message = vec![u8::from(subscribe)];
        message.extend_from_slice(f.text());
        let outcome = self.a.on_xpub_notice(&message, self.now);
        let counted = matches!(outcome, crate::broker::NoticeOutcome::Counted { .. });
        if counted {
            let count = self.xpub.entry(which).or_insert(0);
            if subscribe {
                *count += 1;
                if *count == 1 {
                    self.hold(&f, true);
                }
            } else {
                *count -= 1;
                if *count == 0 {
                    self.xpub.remove(&which);
                    self.hold(&f, false);
                }
            }
        }
        // Notices carry no transport: what they changed leaves with A's
        // next flush.
        self.a.flush(&mut AOut(&mut self.wire));
    }

    fn deliver_to_b(&mut self, count: usize) {
        for _ in 0..count {
            let Some(frame) = self.wire.to_b.pop_front() else {
                return;
            };
            let mut out = BOut {
                wire: &mut self.wire,
                link_at_b: &self.link_at_b,
            };
            self.b
                .on_peer_message(&self.link_at_b, &[&frame], 1, self.now, &mut out);
        }
    }

    fn deliver_to_a(&mut self, count: usize) {
        for _ in 0..count {
            let Some(frames) = self.wire.to_a.pop_front() else {
                return;
            };
            let mut parts: Vec<Bytes> = frames.iter().map(|f| Bytes::from(&f[..])).collect();
            let n = parts.len();
            self.a.on_link_message(
                self.link,
                &mut parts,
                n,
                self.now,
                &mut AOut(&mut self.wire),
            );
        }
    }

    fn pass_time(&mut self, millis: u64) {
        self.now += Duration::from_millis(millis);
        self.a.tick(self.now, &mut AOut(&mut self.wire));
        let mut out = BOut {
            wire: &mut self.wire,
            link_at_b: &self.link_at_b,
        };
        self.b.tick(self.now, &mut out);
    }

    /// B restarts: a new epoch, nothing held; frames in flight are lost.
    fn restart_b(&mut self) {
        self.restarts += 1;
        let mut b = Broker::new(config(), self.now);
        b.enable_cluster(
            Identity {
                broker_id: "b".into(),
                epoch: 1 + self.restarts,
            },
            self.now,
        );
        self.b = b;
        self.wire.to_b.clear();
        self.wire.to_a.clear();
    }

    /// A's link comes back on a new connection: what was in flight is lost.
    fn reconnect(&mut self) {
        self.connections += 1;
        self.link_at_b = format!("link-{}", self.connections).into_bytes();
        self.wire.to_b.clear();
        self.wire.to_a.clear();
        self.a
            .on_link_connected(self.link, &mut AOut(&mut self.wire));
    }

    fn check_counts(&self) -> Result<(), String> {
        let table: BTreeMap<Filter, u32> = self
            .a
            .interest()
            .map(|f| (f.clone(), self.a.interest_holders(f)))
            .collect();
        if table != self.model {
            return Err(format!(
                "A's interest table {table:?} != model {:?}",
                self.model
            ));
        }
        Ok(())
    }

    /// Lets the link settle: frames both ways and PINGs, until nothing is
    /// in flight after a ping round.
    fn settle(&mut self) -> Result<(), String> {
        for _ in 0..50 {
            self.pass_time(1000);
            for _ in 0..20 {
                if self.wire.to_b.is_empty() && self.wire.to_a.is_empty() {
                    break;
                }
                self.deliver_to_b(usize::MAX);
                self.deliver_to_a(usize::MAX);
            }
            let owed = self.a.links().iter().any(|l| l.needs_hello);
            if !owed && self.b.peer_interest("a").is_some() {
                return Ok(());
            }
        }
        Err("the link never settled".into())
    }

    fn check_settled(&mut self) -> Result<(), String> {
        self.settle()?;
        let held: Vec<Filter> = self
            .b
            .peer_interest("a")
            .map(|i| {
                let mut v: Vec<Filter> = i.cloned().collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        let expected: Vec<Filter> = self.model.keys().cloned().collect();
        if held != expected {
            return Err(format!(
                "B holds {held:?} as A's interest, A's holders hold {expected:?}"
            ));
        }
        for topic in TOPICS {
            let before = self.wire.forwards;
            let mut frames: [Bytes; 2] = [Bytes::from(topic), Bytes::from(&b"x"[..])];
            let mut out = BOut {
                wire: &mut self.wire,
                link_at_b: &self.link_at_b,
            };
            let _ = self.b.on_publish(None, &mut frames, 2, self.now, &mut out);
            let forwarded = self.wire.forwards - before;
            let wanted = usize::from(self.model.keys().any(|f| f.matches(topic)));
            if forwarded != wanted {
                return Err(format!(
                    "a publish on {:?} at B was forwarded {forwarded} times, wanted {wanted}",
                    String::from_utf8_lossy(topic)
                ));
            }
        }
        Ok(())
    }
}

/// Runs the script `data` (one opcode byte and one argument byte per
/// operation) and checks it; `Err` says what diverged from the model.
pub fn run(data: &[u8]) -> Result<(), String> {
    let mut sim = Sim::new();
    for op in data.chunks(2) {
        let (code, arg) = (op[0], op.get(1).copied().unwrap_or(0) as usize);
        match code % 10 {
            0 | 1 => sim.command(arg >> 4, arg, true),
            2 => sim.command(arg >> 4, arg, false),
            3 => sim.notice(arg, arg & 0x80 == 0),
            4 => sim.deliver_to_b(1 + arg % 4),
            5 => sim.deliver_to_a(1 + arg % 4),
            6 => {
                sim.wire.to_b.pop_front();
            }
            7 => sim.pass_time(arg as u64 * 40),
            8 => sim.reconnect(),
            _ => sim.restart_b(),
        }
        sim.check_counts()?;
    }
    sim.check_settled()
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_scripts_converge_to_the_model() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for round in 0..300 {
            let len = 2 * (round % 120 + 1);
            let script: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if let Err(e) = super::run(&script) {
                panic!("script {script:?}: {e}");
            }
        }
    }

    #[test]
    fn a_lost_change_is_repaired_by_a_snapshot() {
        // Subscribe, deliver the HELLO and snapshot, then lose the next
        // change; settling must still converge.
        let script = [0, 0x01, 4, 3, 4, 3, 0, 0x12, 6, 0, 0, 0x23];
        super::run(&script).unwrap();
    }
}
