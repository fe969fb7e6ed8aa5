//! Cluster membership through a real etcd (tests/common/etcd.rs): brokers
//! see each other, a stopped broker leaves at once (its lease revoked), a
//! frozen one leaves when its lease expires and comes back when it thaws,
//! and etcd going away and coming back is reported and survived.
//!
//! Every event is received the way the broker's event loop will: only after
//! the `mio::Waker` woke a `mio::Poll`, so a missing wake-up fails the test.

mod common;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use common::DEADLINE;
use common::child::Reaped;
use common::etcd::Etcd;
use zbroker::membership::{EtcdMembership, EtcdSettings, Member, MembershipError, MembershipEvent};

/// Short, so that an expiring lease takes seconds; etcd's own minimum.
const TTL: Duration = Duration::from_secs(2);
const WAKER: mio::Token = mio::Token(0);
/// Set in the child process that `lease_expiry` starts: `ENDPOINT CLUSTER ID`.
const CHILD_ENV: &str = "ZBROKER_TEST_MEMBERSHIP_CHILD";
/// What the child prints before each event it receives.
const CHILD_EVENT: &str = "membership event: ";

fn member(id: &str) -> Member {
    Member {
        id: id.into(),
        endpoint: format!("tcp://127.0.0.1:{}", 5000 + id.len()),
        public_key: Some(format!("key-of-{id}")),
    }
}

fn settings(etcd_url: &str, cluster: &str) -> EtcdSettings {
    EtcdSettings {
        endpoints: vec![etcd_url.to_string()],
        cluster_name: cluster.to_string(),
        lease_ttl: TTL,
    }
}

/// A broker's membership, received as its event loop would.
struct Node {
    membership: Option<EtcdMembership>,
    poll: mio::Poll,
    events: Receiver<MembershipEvent>,
    received: VecDeque<MembershipEvent>,
}

impl Node {
    fn start(settings: EtcdSettings, me: Member) -> Node {
        let poll = mio::Poll::new().expect("a mio poll");
        let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER).expect("a mio waker"));
        let (sender, events) = channel();
        let membership = EtcdMembership::start(settings, me, sender, waker).expect("start");
        Node {
            membership: Some(membership),
            poll,
            events,
            received: VecDeque::new(),
        }
    }

    /// The next event, received after a wake-up; fails the test after
    /// `DEADLINE`.
    fn next(&mut self) -> MembershipEvent {
        self.next_within(DEADLINE)
            .unwrap_or_else(|| panic!("no membership event within {DEADLINE:?}"))
    }

    /// The next event, received after a wake-up, if one comes within
    /// `limit`.
    fn next_within(&mut self, limit: Duration) -> Option<MembershipEvent> {
        let deadline = Instant::now() + limit;
        let mut wakes = mio::Events::with_capacity(4);
        while self.received.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.poll.poll(&mut wakes, Some(left)) {
                Ok(()) => {}
                // SIGCONT interrupts a poll in the frozen child.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("poll: {e}"),
            }
            if wakes.iter().any(|w| w.token() == WAKER) {
                self.received.extend(self.events.try_iter());
            }
        }
        self.received.pop_front()
    }

    /// Receives events until one satisfies `done`; returns those before it
    /// and it.
    fn until(
        &mut self,
        what: &str,
        done: impl Fn(&MembershipEvent) -> bool,
    ) -> (Vec<MembershipEvent>, MembershipEvent) {
        let mut before = Vec::new();
        loop {
            let event = self.next();
            if done(&event) {
                return (before, event);
            }
            assert!(before.len() < 100, "no {what} in {before:#?}");
            before.push(event);
        }
    }

    /// Waits for a member list that satisfies `done`, and returns it.
    fn members_until(&mut self, what: &str, done: impl Fn(&[Member]) -> bool) -> Vec<Member> {
        let (_, event) = self.until(
            what,
            |e| matches!(e, MembershipEvent::Members(m) if done(m)),
        );
        match event {
            MembershipEvent::Members(members) => members,
            _ => unreachable!(),
        }
    }

    fn stop(&mut self) {
        if let Some(membership) = self.membership.take() {
            membership.stop();
        }
    }
}

fn key(cluster: &str, id: &str) -> String {
    format!("/zbroker/{cluster}/members/{id}")
}

#[test]
fn brokers_see_each_other_and_a_stopped_one_leaves_at_once() {
    let etcd = Etcd::start();
    let mut a = Node::start(settings(&etcd.client_url, "c1"), member("a"));
    // Alone: the first read reports an empty list (this broker left out).
    assert_eq!(a.next(), MembershipEvent::Members(vec![]));

    let b_member = Member {
        public_key: None,
        ..member("b")
    };
    let mut b = Node::start(settings(&etcd.client_url, "c1"), b_member.clone());
    assert_eq!(b.next(), MembershipEvent::Members(vec![member("a")]));
    assert_eq!(
        a.members_until("b", |m| !m.is_empty()),
        vec![b_member.clone()]
    );
    let stored = etcd.get_prefix("/zbroker/c1/");
    assert_eq!(
        stored
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect::<Vec<_>>(),
        vec![
            (key("c1", "a").as_str(), "tcp://127.0.0.1:5001 key-of-a"),
            (key("c1", "b").as_str(), "tcp://127.0.0.1:5001"),
        ]
    );
    assert!(stored.iter().all(|kv| kv.lease != 0), "{stored:?}");

    // Another cluster's brokers are not members.
    let mut other = Node::start(settings(&etcd.client_url, "c2"), member("z"));
    assert_eq!(other.next(), MembershipEvent::Members(vec![]));

    // stop() revokes the lease before it returns: the key is gone now, not
    // after the TTL, and the watch tells the other broker.
    b.stop();
    assert_eq!(
        etcd.get_prefix("/zbroker/c1/")
            .into_iter()
            .map(|kv| kv.key)
            .collect::<Vec<_>>(),
        vec![key("c1", "a")]
    );
    assert_eq!(a.members_until("b gone", |m| m.is_empty()), vec![]);
    a.stop();
    other.stop();
    assert_eq!(etcd.get_prefix("/zbroker/"), vec![]);
}

#[test]
fn unreadable_registrations_are_skipped() {
    let etcd = Etcd::start();
    let prefix = "/zbroker/c/members/";
    for (id, value) in [
        (&b"three"[..], &b"tcp://a:1 key extra"[..]),
        (b"empty", b""),
        (b"tab", b"tcp://a:1\tkey"),
        (b"\xff\xfe", b"tcp://a:1"),
        (b"binary", b"\xff\x00\x01"),
        (b"sub/dir", b"tcp://a:1"),
        (b"", b"tcp://a:1"),
        (b"good", b"tcp://10.0.0.1:1 goodkey"),
    ] {
        etcd.put(&[prefix.as_bytes(), id].concat(), value);
    }
    let mut a = Node::start(settings(&etcd.client_url, "c"), member("a"));
    let good = Member {
        id: "good".into(),
        endpoint: "tcp://10.0.0.1:1".into(),
        public_key: Some("goodkey".into()),
    };
    assert_eq!(a.next(), MembershipEvent::Members(vec![good.clone()]));

    // Garbage written while watching is skipped too, and the thread lives
    // on: a later valid registration is reported.
    etcd.put(format!("{prefix}junk").as_bytes(), b"  ");
    etcd.put(format!("{prefix}later").as_bytes(), b"tcp://10.0.0.2:2");
    let later = Member {
        id: "later".into(),
        endpoint: "tcp://10.0.0.2:2".into(),
        public_key: None,
    };
    assert_eq!(
        a.members_until("later", |m| m.len() == 2),
        vec![good, later]
    );
}

#[test]
fn etcd_going_away_is_reported_once_and_its_return_re_registers() {
    let mut etcd = Etcd::start();
    let mut a = Node::start(settings(&etcd.client_url, "c"), member("a"));
    let mut b = Node::start(settings(&etcd.client_url, "c"), member("b"));
    assert_eq!(a.members_until("b", |m| !m.is_empty()), vec![member("b")]);
    assert_eq!(b.members_until("a", |m| !m.is_empty()), vec![member("a")]);
    let before = etcd.revision();

    etcd.stop();
    for node in [&mut a, &mut b] {
        let (_, lost) = node.until("EtcdLost", |e| matches!(e, MembershipEvent::EtcdLost(_)));
        eprintln!("reported: {lost:?}");
    }
    etcd.restart();
    for (node, other) in [(&mut a, "b"), (&mut b, "a")] {
        // While etcd was away nothing else was said: no second EtcdLost and
        // no member list, so the broker keeps the one it had.
        let (during, _) = node.until("EtcdBack", |e| *e == MembershipEvent::EtcdBack);
        assert_eq!(during, vec![], "events while etcd was away");
        assert_eq!(node.next(), MembershipEvent::Members(vec![member(other)]));
    }
    // Registered again: both keys were put after etcd came back.
    let stored = etcd.get_prefix("/zbroker/c/");
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(
        stored.iter().all(|kv| kv.mod_revision > before),
        "keys not put again since revision {before}: {stored:?}"
    );
}

#[test]
fn start_with_etcd_down_reports_lost_then_back() {
    let mut etcd = Etcd::start();
    etcd.stop();
    // start() does not wait for etcd.
    let mut a = Node::start(settings(&etcd.client_url, "c"), member("a"));
    let lost = a.next();
    assert!(matches!(lost, MembershipEvent::EtcdLost(_)), "{lost:?}");
    etcd.restart();
    assert_eq!(a.next(), MembershipEvent::EtcdBack);
    assert_eq!(a.next(), MembershipEvent::Members(vec![]));
    assert_eq!(
        etcd.get_prefix("/zbroker/c/")
            .into_iter()
            .map(|kv| kv.key)
            .collect::<Vec<_>>(),
        vec![key("c", "a")]
    );
}

#[test]
fn a_hung_etcd_is_lost_and_stop_still_returns() {
    let etcd = Etcd::start();
    let mut a = Node::start(settings(&etcd.client_url, "c"), member("a"));
    assert_eq!(a.next(), MembershipEvent::Members(vec![]));
    // Connections stay open but nothing answers: only the module's own
    // deadlines can notice.
    etcd.freeze();
    let (_, lost) = a.until("EtcdLost", |e| matches!(e, MembershipEvent::EtcdLost(_)));
    eprintln!("reported: {lost:?}");
    // The revocation cannot succeed; stop() gives up on it rather than hang.
    let membership = a.membership.take().expect("running");
    let (stopped, done) = channel();
    std::thread::spawn(move || {
        membership.stop();
        let _ = stopped.send(());
    });
    done.recv_timeout(DEADLINE)
        .expect("stop() returns while etcd hangs");
    etcd.thaw();
}

/// A membership in a process of its own, frozen with SIGSTOP past its
/// lease TTL: the real way a broker loses its lease (a stopped or starved
/// process), with nothing in the module bent for the test. The child is
/// this test binary, re-run on the ignored test `membership_child`.
#[test]
fn a_frozen_member_leaves_when_its_lease_expires_and_returns_when_thawed() {
    let etcd = Etcd::start();
    let mut a = Node::start(settings(&etcd.client_url, "c"), member("a"));
    assert_eq!(a.next(), MembershipEvent::Members(vec![]));

    let mut child = Reaped(
        Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                "membership_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{} c frozen", etcd.client_url))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run the child"),
    );
    let lines = stdout_events(&mut child);
    let next_line = || -> String {
        lines
            .recv_timeout(DEADLINE)
            .expect("the child reports an event within the deadline")
    };
    assert!(next_line().starts_with("Members"));
    assert_eq!(
        a.members_until("the child", |m| !m.is_empty()),
        vec![member("frozen")]
    );

    let pid = child.0.id().to_string();
    signal("-STOP", &pid);
    // Only the lease's expiry can remove it now.
    assert_eq!(a.members_until("the child gone", |m| m.is_empty()), vec![]);
    signal("-CONT", &pid);

    // Thawed, it finds its lease gone, says so once, and registers again.
    let lost = next_line();
    assert!(lost.starts_with("EtcdLost"), "{lost}");
    eprintln!("the child reported: {lost}");
    assert_eq!(next_line(), "EtcdBack");
    let members = next_line();
    assert!(
        members.starts_with("Members([Member { id: \"a\""),
        "{members}"
    );
    assert_eq!(
        a.members_until("the child back", |m| !m.is_empty()),
        vec![member("frozen")]
    );
}

fn signal(which: &str, pid: &str) {
    let status = Command::new("kill")
        .args([which, pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {which} {pid}");
}

/// The child's events, as the `Debug` text it printed after
/// [`CHILD_EVENT`].
fn stdout_events(child: &mut Reaped) -> Receiver<String> {
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (sender, receiver) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest's "test NAME ... " may start the line.
            if let Some((_, event)) = line.split_once(CHILD_EVENT)
                && sender.send(event.to_string()).is_err()
            {
                break;
            }
        }
    });
    receiver
}

/// The child half of the test above: registers, prints every event, and
/// lives until killed (or a bounded while, should its parent die).
#[test]
#[ignore = "run as a child process by a_frozen_member_leaves_when_its_lease_expires_and_returns_when_thawed"]
fn membership_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let [endpoint, cluster, id] = spec.split(' ').collect::<Vec<_>>()[..] else {
        panic!("{CHILD_ENV} is ENDPOINT CLUSTER ID, not {spec:?}");
    };
    let mut node = Node::start(settings(endpoint, cluster), member(id));
    let end = Instant::now() + 4 * DEADLINE;
    while Instant::now() < end {
        if let Some(event) = node.next_within(Duration::from_secs(1)) {
            println!("{CHILD_EVENT}{event:?}");
        }
    }
}

#[test]
fn settings_that_cannot_work_are_refused_with_advice() {
    let poll = mio::Poll::new().expect("a mio poll");
    let waker = Arc::new(mio::Waker::new(poll.registry(), WAKER).expect("a mio waker"));
    let start = |settings: EtcdSettings, me: Member| {
        let (sender, _) = channel();
        match EtcdMembership::start(settings, me, sender, Arc::clone(&waker)) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        }
    };
    let ok = EtcdSettings::new(vec!["http://127.0.0.1:1".into()], "c");
    let cases: Vec<(EtcdSettings, Member, &str)> = vec![
        (
            EtcdSettings {
                endpoints: vec![],
                ..ok.clone()
            },
            member("a"),
            "give at least one",
        ),
        (
            EtcdSettings {
                endpoints: vec!["https://127.0.0.1:1".into()],
                ..ok.clone()
            },
            member("a"),
            "TLS is not supported",
        ),
        (
            EtcdSettings {
                endpoints: vec!["http://[::1".into()],
                ..ok.clone()
            },
            member("a"),
            "http://[::1",
        ),
        (
            EtcdSettings {
                cluster_name: "a/b".into(),
                ..ok.clone()
            },
            member("a"),
            "contain no '/'",
        ),
        (
            EtcdSettings {
                cluster_name: String::new(),
                ..ok.clone()
            },
            member("a"),
            "must be non-empty",
        ),
        (
            EtcdSettings {
                lease_ttl: Duration::from_millis(500),
                ..ok.clone()
            },
            member("a"),
            "between 1 s and 1 h",
        ),
        (ok.clone(), member(""), "the member id is empty"),
        (ok.clone(), member("x/y"), "contains '/'"),
        (
            ok.clone(),
            Member {
                endpoint: "tcp://a b".into(),
                ..member("a")
            },
            "contains whitespace",
        ),
    ];
    for (settings, me, advice) in cases {
        let error: MembershipError = start(settings.clone(), me.clone());
        let message = error.to_string();
        assert!(
            message.contains(advice),
            "{settings:?} {me:?}: {message:?} does not say {advice:?}"
        );
    }
}
