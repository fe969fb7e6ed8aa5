//! Cluster membership: which brokers exist, so that brokers find each other.
//!
//! The registry is an etcd v3 cluster ([`EtcdMembership`]). Each broker
//! keeps one key, bound to a lease it keeps alive, and watches the others:
//!
//! - key: `/zbroker/<cluster_name>/members/<id>`;
//! - value: the broker's endpoint, or its endpoint, one space and its CURVE
//!   public key (`tcp://10.0.0.5:5556 rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7`).
//!   Neither part may contain whitespace, so the value splits unambiguously
//!   at its single space.
//!
//! When a broker stops, it revokes its lease and its key goes at once; when
//! it dies or is cut off, its lease expires and the key goes after the lease
//! TTL. A value this module cannot read (not UTF-8, empty, more than two
//! parts; or a key whose id is not UTF-8) is skipped with a warning, never
//! trusted and never a panic: anything may be written under the prefix.
//!
//! The etcd client is async; the broker's event loop is a single-threaded
//! mio loop. So the membership runs on a thread of its own with a
//! current-thread tokio runtime, and reports [`MembershipEvent`]s over a
//! `std::sync::mpsc` channel, waking the event loop through a `mio::Waker`
//! after each one.

mod etcd;

use std::fmt;
use std::time::Duration;

pub use etcd::{DEFAULT_LEASE_TTL, EtcdMembership, EtcdSettings};

/// One broker as registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Unique within the cluster; the last part of the key. Not empty, no
    /// `/`.
    pub id: String,
    /// Where peers reach this broker (a ZeroMQ endpoint). Not empty, no
    /// whitespace.
    pub endpoint: String,
    /// The broker's CURVE public key (Z85), when it uses CURVE. Not empty,
    /// no whitespace.
    pub public_key: Option<String>,
}

impl Member {
    /// The value stored in etcd: `endpoint` or `endpoint public_key`.
    pub fn value(&self) -> String {
        match &self.public_key {
            Some(key) => format!("{} {key}", self.endpoint),
            None => self.endpoint.clone(),
        }
    }

    /// Reads a member from its id and stored value; `Err` says what is wrong
    /// with the value. Never panics, whatever the bytes.
    pub fn parse(id: &str, value: &[u8]) -> Result<Member, String> {
        check_id(id)?;
        let value = std::str::from_utf8(value).map_err(|e| format!("not UTF-8: {e}"))?;
        let mut parts = value.split(' ');
        let endpoint = parts.next().unwrap_or_default();
        let public_key = parts.next();
        if parts.next().is_some() {
            return Err("more than two space-separated parts".into());
        }
        check_word("endpoint", endpoint)?;
        if let Some(key) = public_key {
            check_word("public key", key)?;
        }
        Ok(Member {
            id: id.to_string(),
            endpoint: endpoint.to_string(),
            public_key: public_key.map(str::to_string),
        })
    }

    /// Whether this member can be registered: `Err` names the field at
    /// fault.
    pub fn validate(&self) -> Result<(), String> {
        check_id(&self.id)?;
        check_word("endpoint", &self.endpoint)?;
        if let Some(key) = &self.public_key {
            check_word("public key", key)?;
        }
        Ok(())
    }
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("the member id is empty".into());
    }
    if id.contains('/') {
        return Err(format!("the member id {id:?} contains '/'"));
    }
    Ok(())
}

/// An endpoint or key: one non-empty word, since the value is split at
/// spaces.
fn check_word(what: &str, word: &str) -> Result<(), String> {
    if word.is_empty() {
        return Err(format!("the {what} is empty"));
    }
    if word.chars().any(char::is_whitespace) {
        return Err(format!("the {what} {word:?} contains whitespace"));
    }
    Ok(())
}

/// What the membership thread reports, in order, each followed by a wake-up
/// of the event loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipEvent {
    /// Every *other* member under the cluster's prefix (this broker is left
    /// out), sorted by id. Sent once after the first successful read, after
    /// each [`MembershipEvent::EtcdBack`], and after each change the watch
    /// sees that alters the list; bursts of changes are coalesced into one
    /// event.
    Members(Vec<Member>),
    /// etcd cannot be reached, or this broker's lease was lost (with why).
    /// Sent once per outage, also at start when etcd is down then. The
    /// broker should keep its last known members: nothing is reported
    /// until etcd is back.
    EtcdLost(String),
    /// etcd is reachable again and this broker is registered again under a
    /// new lease; a [`MembershipEvent::Members`] follows.
    EtcdBack,
}

/// Why [`EtcdMembership::start`] refused the settings or could not start.
#[derive(Debug)]
pub enum MembershipError {
    /// No etcd endpoint was given.
    NoEndpoints,
    /// An etcd endpoint cannot be used.
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The cluster name cannot be part of a key.
    ClusterName(String),
    /// This broker's own [`Member`] cannot be registered (the reason).
    Member(String),
    /// The lease TTL is out of range.
    LeaseTtl(Duration),
    /// The thread or its runtime could not be created.
    Thread(std::io::Error),
}

impl fmt::Display for MembershipError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MembershipError::NoEndpoints => write!(
                f,
                "no etcd endpoint given: give at least one, e.g. http://127.0.0.1:2379"
            ),
            MembershipError::Endpoint { endpoint, reason } => write!(
                f,
                "etcd endpoint {endpoint:?} cannot be used: {reason}; \
                 give it as http://HOST:PORT or HOST:PORT"
            ),
            MembershipError::ClusterName(name) => write!(
                f,
                "cluster name {name:?} cannot be used: it must be non-empty and contain no '/'"
            ),
            MembershipError::Member(reason) => write!(
                f,
                "this broker cannot register: {reason} (the id must be non-empty without '/'; \
                 the endpoint and public key non-empty without whitespace)"
            ),
            MembershipError::LeaseTtl(ttl) => write!(
                f,
                "lease TTL {ttl:?} is out of range: give between 1 s and 1 h \
                 (it is rounded up to whole seconds)"
            ),
            MembershipError::Thread(e) => {
                write!(f, "cannot start the etcd membership thread: {e}")
            }
        }
    }
}

impl std::error::Error for MembershipError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, endpoint: &str, key: Option<&str>) -> Member {
        Member {
            id: id.into(),
            endpoint: endpoint.into(),
            public_key: key.map(Into::into),
        }
    }

    #[test]
    fn values_round_trip() {
        for m in [
            member("a", "tcp://127.0.0.1:5556", None),
            member(
                "b-1",
                "tcp://[::1]:1",
                Some("rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"),
            ),
        ] {
            m.validate().unwrap();
            assert_eq!(Member::parse(&m.id, m.value().as_bytes()), Ok(m.clone()));
        }
    }

    #[test]
    fn unreadable_values_are_errors_not_panics() {
        for value in [
            &b""[..],
            b" ",
            b"tcp://a:1 ",
            b" key",
            b"tcp://a:1  key",
            b"tcp://a:1 key extra",
            b"tcp://a:1\tkey",
            b"\xff\xfe",
            b"tcp://a:1 \xc3",
        ] {
            assert!(Member::parse("x", value).is_err(), "{value:?} was accepted");
        }
        assert!(Member::parse("", b"tcp://a:1").is_err());
        assert!(Member::parse("a/b", b"tcp://a:1").is_err());
    }

    #[test]
    fn invalid_members_are_refused() {
        assert!(member("", "e", None).validate().is_err());
        assert!(member("a/b", "e", None).validate().is_err());
        assert!(member("a", "", None).validate().is_err());
        assert!(member("a", "tcp://x y", None).validate().is_err());
        assert!(member("a", "e", Some("")).validate().is_err());
        assert!(member("a", "e", Some("k k")).validate().is_err());
    }
}
