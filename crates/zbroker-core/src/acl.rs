//! Topic access control: which filters each CURVE key may publish to or
//! subscribe with, decided here without IO. The server crate loads the key
//! files and runs the ZAP handler that admits only listed keys; the key a
//! connection authenticated with reaches the core with each message, and
//! [`Acl`] decides.
//!
//! Key list text has one key per line: the Z85 public key, then the filters
//! it may use, written like the CLI's (`prefix:net.`, `pattern:ports.>`,
//! `exact:x`); `prefix:` allows every topic. `#` starts a comment.
//!
//! ```
//! use zbroker_core::acl::KeyList;
//! use zbroker_core::filter::Filter;
//!
//! let list = KeyList::parse(
//!     "# compute-node agents\n\
//!      rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7  prefix:net.  pattern:ports.*.status\n",
//!     1024,
//! ).unwrap();
//! let key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7";
//! assert_eq!(list.allowed(key).unwrap().len(), 2);
//! ```

use std::fmt;

use hashbrown::HashMap;

use crate::filter::{Filter, FilterKind, ONE_SEGMENT, SEPARATOR, TAIL};

/// A line of key-list text that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyListError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong, and how to fix it.
    pub problem: String,
}

impl fmt::Display for KeyListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)
    }
}

impl std::error::Error for KeyListError {}

/// Z85's alphabet (ZeroMQ RFC 32), in digit order.
const Z85_ALPHABET: &[u8; 85] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

/// Whether `text` is a Z85-encoded CURVE key: 40 characters for 32 bytes,
/// every group of five a base-85 number that fits 32 bits (what libzmq's
/// `zmq_z85_decode` accepts).
pub fn is_z85_key(text: &str) -> bool {
    text.len() == 40
        && text.as_bytes().chunks(5).all(|group| {
            group
                .iter()
                .try_fold(0u64, |value, &c| {
                    let digit = Z85_ALPHABET.iter().position(|&a| a == c)?;
                    Some(value * 85 + digit as u64)
                })
                .is_some_and(|value| value <= u64::from(u32::MAX))
        })
}

/// Public keys and the filters each may use.
#[derive(Clone, Debug, Default)]
pub struct KeyList {
    keys: HashMap<String, Vec<Filter>>,
}

impl KeyList {
    /// Parses key-list text; filters longer than `max_filter_len` are
    /// refused, as a subscriber's would be.
    pub fn parse(text: &str, max_filter_len: usize) -> Result<KeyList, KeyListError> {
        let mut keys = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let problem = |problem: String| KeyListError {
                line: i + 1,
                problem,
            };
            let mut words = line.split_whitespace();
            let Some(key) = words.next() else {
                continue;
            };
            // Z85 keys may contain '#', so a comment is a line whose first
            // word is not a key, or anything after the filters.
            if key.starts_with('#') && !is_z85_key(key) {
                continue;
            }
            let words = words.take_while(|w| !w.starts_with('#'));
            if !is_z85_key(key) {
                return Err(problem(format!(
                    "{key:?} is not a Z85 public key (40 characters, as written by `zbroker keygen`)"
                )));
            }
            let filters = words
                .map(|w| Filter::parse_cli(w, max_filter_len))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| problem(e.to_string()))?;
            if filters.is_empty() {
                return Err(problem(format!(
                    "key {key} lists no topics; add the filters it may use (prefix: allows all)"
                )));
            }
            keys.insert(key.to_string(), filters);
        }
        Ok(KeyList { keys })
    }

    /// Whether `key` (Z85) is listed.
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// The filters `key` may use, if it is listed.
    pub fn allowed(&self, key: &str) -> Option<&[Filter]> {
        self.keys.get(key).map(Vec::as_slice)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is listed.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The brokers of a cluster, by public key: who may open a link to this
/// broker's cluster endpoint, and which key each peer endpoint must prove.
///
/// Text form: one peer per line, its Z85 public key and, optionally, its
/// cluster endpoint (needed for static peers: a link to that endpoint
/// checks the broker there by that key). `#` starts a comment, as in key
/// lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerKeys {
    peers: Vec<(String, Option<String>)>,
}

impl PeerKeys {
    /// Parses peer-key text.
    pub fn parse(text: &str) -> Result<PeerKeys, KeyListError> {
        let mut peers = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let mut words = line.split_whitespace();
            let Some(key) = words.next() else {
                continue;
            };
            if key.starts_with('#') && !is_z85_key(key) {
                continue;
            }
            let problem = |problem: String| KeyListError {
                line: i + 1,
                problem,
            };
            if !is_z85_key(key) {
                return Err(problem(format!(
                    "{key:?} is not a Z85 public key (40 characters, as written by `zbroker keygen`)"
                )));
            }
            let mut words = words.take_while(|w| !w.starts_with('#'));
            let endpoint = words.next().map(str::to_string);
            if let Some(extra) = words.next() {
                return Err(problem(format!(
                    "{extra:?} after the endpoint; write the key, then at most one endpoint"
                )));
            }
            peers.push((key.to_string(), endpoint));
        }
        Ok(PeerKeys { peers })
    }

    /// Whether `key` (Z85) is a listed peer.
    pub fn contains(&self, key: &str) -> bool {
        self.peers.iter().any(|(k, _)| k == key)
    }

    /// The key listed for the peer at `endpoint`.
    pub fn key_for(&self, endpoint: &str) -> Option<&str> {
        self.peers
            .iter()
            .find(|(_, e)| e.as_deref() == Some(endpoint))
            .map(|(k, _)| k.as_str())
    }

    /// Number of peers listed.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer is listed.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

/// Who may publish and subscribe to what, and which brokers may link.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    /// Keys admitted on the publisher endpoint.
    pub publishers: KeyList,
    /// Keys admitted on the subscriber endpoint.
    pub subscribers: KeyList,
    /// Keys admitted on the cluster endpoint (empty unless clustered).
    pub peers: PeerKeys,
}

impl Acl {
    /// Whether `key` may publish on `topic`: some filter it is allowed
    /// matches the topic.
    pub fn may_publish(&self, key: Option<&str>, topic: &[u8]) -> bool {
        key.and_then(|k| self.publishers.allowed(k))
            .is_some_and(|allowed| allowed.iter().any(|a| a.matches(topic)))
    }

    /// Whether `key` may subscribe to `filter`: every topic the filter can
    /// match must be allowed, so the filter must lie within one allowed
    /// filter (checked conservatively: when in doubt, refuse).
    pub fn may_subscribe(&self, key: Option<&str>, filter: &Filter) -> bool {
        key.and_then(|k| self.subscribers.allowed(k))
            .is_some_and(|allowed| allowed.iter().any(|a| filter_within(filter, a)))
    }
}

fn segments(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|&b| b == SEPARATOR)
}

fn is_wildcard(segment: &[u8]) -> bool {
    segment == ONE_SEGMENT || segment == TAIL
}

/// The bytes every topic matched by `pattern` starts with, and whether the
/// pattern matches exactly that one topic (no wildcard).
fn pattern_prefix(pattern: &[u8]) -> (Vec<u8>, bool) {
    let mut prefix = Vec::new();
    for (i, segment) in segments(pattern).enumerate() {
        if is_wildcard(segment) {
            if i > 0 {
                prefix.push(SEPARATOR);
            }
            return (prefix, false);
        }
        if i > 0 {
            prefix.push(SEPARATOR);
        }
        prefix.extend_from_slice(segment);
    }
    (prefix, true)
}

/// Whether every topic `filter` matches is also matched by `allowed`. Sound
/// (never says yes wrongly) but not complete: some contained filters, such
/// as a prefix under a pattern, are refused.
pub fn filter_within(filter: &Filter, allowed: &Filter) -> bool {
    use FilterKind::*;
    let (f, a) = (filter.text(), allowed.text());
    match (filter.kind(), allowed.kind()) {
        (Exact, _) => allowed.matches(f),
        (Pattern, _) if pattern_prefix(f).1 => allowed.matches(f),
        (Prefix, Prefix) => f.starts_with(a),
        (Pattern, Prefix) => pattern_prefix(f).0.starts_with(a),
        (Pattern, Pattern) => pattern_within(f, a),
        (Prefix, Exact | Pattern) | (Pattern, Exact) => false,
    }
}

fn pattern_within(filter: &[u8], allowed: &[u8]) -> bool {
    let mut f = segments(filter);
    for a in segments(allowed) {
        let Some(s) = f.next() else {
            return false; // allowed needs more segments than filter has
        };
        if a == TAIL {
            return true; // filter has at least one more segment here
        }
        if s == TAIL {
            return false; // filter takes any tail, allowed does not
        }
        if a != ONE_SEGMENT && s != a {
            return false; // a literal in allowed needs the same literal
        }
    }
    f.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(spec: &str) -> Filter {
        Filter::parse_cli(spec, 1024).unwrap()
    }

    #[test]
    fn containment_examples() {
        assert!(filter_within(&f("exact:net.a"), &f("prefix:net.")));
        assert!(filter_within(&f("prefix:net.a"), &f("prefix:net.")));
        assert!(!filter_within(&f("prefix:ne"), &f("prefix:net.")));
        assert!(!filter_within(&f("prefix:"), &f("prefix:net.")));
        assert!(filter_within(&f("pattern:net.*.port"), &f("prefix:net.")));
        assert!(!filter_within(&f("pattern:*.port"), &f("prefix:net.")));
        assert!(filter_within(
            &f("pattern:net.a.port"),
            &f("pattern:net.*.port")
        ));
        assert!(filter_within(&f("pattern:net.*.port"), &f("pattern:net.>")));
        assert!(!filter_within(&f("pattern:net.>"), &f("pattern:net.*")));
        assert!(!filter_within(&f("pattern:net"), &f("pattern:net.>")));
        assert!(!filter_within(&f("prefix:net.a"), &f("pattern:net.>")));
        assert!(filter_within(&f("exact:x"), &f("exact:x")));
        assert!(!filter_within(&f("prefix:x"), &f("exact:x")));
    }

    /// Soundness by brute force: whenever containment is claimed, every
    /// topic the filter matches is matched by the allowed filter.
    #[test]
    fn containment_is_sound() {
        let pieces = ["a", "b", "*", ">", ""];
        let mut texts = vec![String::new()];
        for _ in 0..3 {
            let longer: Vec<String> = texts
                .iter()
                .flat_map(|t| {
                    pieces.iter().map(move |p| {
                        if t.is_empty() {
                            p.to_string()
                        } else {
                            format!("{t}.{p}")
                        }
                    })
                })
                .collect();
            texts.extend(longer);
        }
        texts.sort();
        texts.dedup();
        let filters: Vec<Filter> = texts
            .iter()
            .flat_map(|t| FilterKind::ALL.map(|k| Filter::new(k, t.as_bytes(), 64)))
            .filter_map(Result::ok)
            .collect();
        let topics: Vec<&[u8]> = texts
            .iter()
            .map(|t| t.as_bytes())
            .filter(|t| !t.is_empty())
            .collect();
        let mut claimed = 0;
        for filter in &filters {
            for allowed in &filters {
                if filter_within(filter, allowed) {
                    claimed += 1;
                    for topic in &topics {
                        assert!(
                            !filter.matches(topic) || allowed.matches(topic),
                            "{filter} within {allowed} but {} differs",
                            String::from_utf8_lossy(topic)
                        );
                    }
                }
            }
        }
        assert!(
            claimed > filters.len(),
            "the check must admit more than identity"
        );
    }

    #[test]
    fn key_lists() {
        let key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7";
        let text = format!("# comment\n\n{key} prefix:net. pattern:a.*  # trailing\n");
        let list = KeyList::parse(&text, 64).unwrap();
        assert!(list.contains(key));
        assert_eq!(list.allowed(key).unwrap().len(), 2);
        let err = KeyList::parse(&format!("{key}\n"), 64).unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.problem.contains("prefix:"), "{err}");
        assert!(KeyList::parse("short prefix:", 64).is_err());
    }

    #[test]
    fn keys_containing_hash_are_not_comments() {
        // '#' is Z85's last digit; a group cannot start with it (84 × 85⁴
        // is past 32 bits), but can hold it anywhere else.
        let key = "0000#".repeat(8);
        assert!(is_z85_key(&key));
        assert!(!is_z85_key(&"#".repeat(40)), "overflows 32 bits");
        let list = KeyList::parse(&format!("{key} prefix: # comment\n"), 64).unwrap();
        assert_eq!(list.allowed(&key).unwrap().len(), 1);
        assert!(KeyList::parse("#0000 prefix:\n", 64).unwrap().is_empty());
    }
}
