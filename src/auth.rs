//! CURVE authentication and topic access control: key files, the ZAP
//! handler that admits only listed keys, and per-key topic ACLs.
//!
//! Without a ZAP handler a libzmq CURVE server accepts **any** client key;
//! [`ZapHandler`] answers libzmq's ZAP requests (RFC 27) on
//! `inproc://zeromq.zap.01` and admits a key only if it is listed for the
//! socket's domain (`publishers` or `subscribers`). The admitted key becomes
//! the connection's `User-Id`, which every message carries to the core, where
//! [`Acl`] decides what that key may publish or subscribe to.
//!
//! Key list files have one key per line: the Z85 public key, then the filters
//! it may use, written like the CLI's (`prefix:net.`, `pattern:ports.>`,
//! `exact:x`); `prefix:` allows every topic. `#` starts a comment.
//!
//! ```text
//! # compute-node agents
//! rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7  prefix:net.  pattern:ports.*.status
//! ```

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use hashbrown::HashMap;

use crate::filter::{Filter, FilterKind, ONE_SEGMENT, SEPARATOR, TAIL};

/// The ZAP domain set on the broker's PULL socket.
pub const PUBLISHER_DOMAIN: &str = "publishers";
/// The ZAP domain set on the broker's ROUTER socket.
pub const SUBSCRIBER_DOMAIN: &str = "subscribers";
/// Where libzmq sends ZAP requests.
pub const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";

/// Why keys or ACLs could not be loaded.
#[derive(Debug)]
pub enum AuthError {
    /// A file could not be read or written.
    Io(PathBuf, std::io::Error),
    /// A line of a key file is wrong.
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong, and how to fix it.
        problem: String,
    },
    /// libzmq refused a CURVE operation.
    Zmq(&'static str, zmq::Error),
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Io(path, e) => write!(f, "{}: {e}", path.display()),
            AuthError::Line {
                path,
                line,
                problem,
            } => write!(f, "{}:{line}: {problem}", path.display()),
            AuthError::Zmq(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for AuthError {}

/// A Z85-encoded CURVE key: 40 characters for 32 bytes.
fn is_z85_key(text: &str) -> bool {
    text.len() == 40 && zmq::z85_decode(text).is_ok_and(|bytes| bytes.len() == 32)
}

/// Public keys and the filters each may use.
#[derive(Clone, Debug, Default)]
pub struct KeyList {
    keys: HashMap<String, Vec<Filter>>,
}

impl KeyList {
    /// Parses key-list text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path, max_filter_len: usize) -> Result<KeyList, AuthError> {
        let mut keys = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let problem = |problem: String| AuthError::Line {
                path: path.to_path_buf(),
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

    /// Reads and parses a key-list file.
    pub fn load(path: &Path, max_filter_len: usize) -> Result<KeyList, AuthError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| AuthError::Io(path.to_path_buf(), e))?;
        KeyList::parse(&text, path, max_filter_len)
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

/// Who may publish and subscribe to what.
#[derive(Clone, Debug, Default)]
pub struct Acl {
    /// Keys admitted on the publisher endpoint.
    pub publishers: KeyList,
    /// Keys admitted on the subscriber endpoint.
    pub subscribers: KeyList,
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

/// The broker's CURVE key pair, Z85-encoded.
#[derive(Clone)]
pub struct ServerKeys {
    /// The public key clients configure as the server key.
    pub public: String,
    /// The secret key.
    pub secret: String,
}

impl fmt::Debug for ServerKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerKeys")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

// zmq-sys 0.12 does not bind zmq_curve_public (libzmq >= 4.2.1); it is in
// the libzmq this crate links.
unsafe extern "C" {
    fn zmq_curve_public(
        z85_public_key: *mut std::os::raw::c_char,
        z85_secret_key: *const std::os::raw::c_char,
    ) -> std::os::raw::c_int;
}

/// Derives the Z85 public key of a Z85 secret key.
pub fn public_key_of(secret: &str) -> Result<String, AuthError> {
    let secret_c = std::ffi::CString::new(secret)
        .map_err(|_| AuthError::Zmq("read a secret key", zmq::Error::EINVAL))?;
    let mut public = [0u8; 41];
    // SAFETY: zmq_curve_public writes 40 Z85 characters and a NUL into a
    // 41-byte buffer and reads a NUL-terminated 40-character secret.
    let rc = unsafe { zmq_curve_public(public.as_mut_ptr() as *mut _, secret_c.as_ptr()) };
    if rc != 0 {
        // SAFETY: reads the calling thread's errno.
        let e = zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() });
        return Err(AuthError::Zmq("derive the public key", e));
    }
    Ok(String::from_utf8_lossy(&public[..40]).into_owned())
}

/// The first line of a key file that is a Z85 key (other lines are
/// comments); `what` names the kind of key in the error.
fn read_key_line(path: &Path, what: &str) -> Result<String, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|e| AuthError::Io(path.to_path_buf(), e))?;
    text.lines()
        .map(str::trim)
        .find(|line| is_z85_key(line))
        .map(str::to_string)
        .ok_or_else(|| AuthError::Line {
            path: path.to_path_buf(),
            line: 1,
            problem: format!("no Z85 {what} key in the file; create one with `zbroker keygen`"),
        })
}

/// Reads a secret key file written by [`keygen`].
pub fn read_secret_key(path: &Path) -> Result<ServerKeys, AuthError> {
    let secret = read_key_line(path, "secret")?;
    Ok(ServerKeys {
        public: public_key_of(&secret)?,
        secret,
    })
}

/// Writes a new key pair: the secret key to `path` (mode 0600) and the
/// public key to `path` + `.pub`. Returns the public key.
pub fn keygen(path: &Path) -> Result<String, AuthError> {
    use std::os::unix::fs::OpenOptionsExt;
    let pair = zmq::CurveKeyPair::new().map_err(|e| AuthError::Zmq("generate a key pair", e))?;
    let encode = |bytes: &[u8]| {
        zmq::z85_encode(bytes).map_err(|_| AuthError::Zmq("encode a key", zmq::Error::EINVAL))
    };
    let public = encode(&pair.public_key)?;
    let secret = encode(&pair.secret_key)?;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| AuthError::Io(p, e)
    };
    let public_path = PathBuf::from(format!("{}.pub", path.display()));
    // Neither file may be replaced: a key list may name the old public key.
    if public_path.exists() {
        return Err(AuthError::Io(
            public_path,
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ));
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    writeln!(
        file,
        "# zbroker CURVE secret key; keep private. Public key: {public}"
    )
    .and_then(|()| writeln!(file, "{secret}"))
    .map_err(io(path))?;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&public_path)
        .and_then(|mut f| writeln!(f, "{public}"));
    if let Err(e) = written {
        // Half a key pair is worse than none.
        let _ = std::fs::remove_file(path);
        return Err(AuthError::Io(public_path, e));
    }
    Ok(public)
}

/// Reads a public key file (`.pub`, as written by [`keygen`]).
pub fn read_public_key(path: &Path) -> Result<String, AuthError> {
    read_key_line(path, "public")
}

/// Answers libzmq's ZAP requests: admits a CURVE client only if its key is
/// listed for the socket's domain. Driven by the broker's event loop.
pub struct ZapHandler {
    socket: zmq::Socket,
    acl: std::sync::Arc<Acl>,
    /// Handshakes admitted.
    pub admitted: u64,
    /// Handshakes refused (unknown key, wrong mechanism or domain).
    pub denied: u64,
    log: crate::metrics::LogLimiter,
}

impl ZapHandler {
    /// Binds the handler in `context`; must happen before the broker's
    /// sockets bind, or libzmq admits everyone.
    pub fn bind(context: &zmq::Context, acl: std::sync::Arc<Acl>) -> Result<ZapHandler, AuthError> {
        let socket = context
            .socket(zmq::REP)
            .map_err(|e| AuthError::Zmq("create the ZAP socket", e))?;
        socket
            .set_linger(0)
            .and_then(|()| socket.bind(ZAP_ENDPOINT))
            .map_err(|e| AuthError::Zmq("bind the ZAP handler", e))?;
        Ok(ZapHandler {
            socket,
            acl,
            admitted: 0,
            denied: 0,
            log: Default::default(),
        })
    }

    /// The socket, for registering its `ZMQ_FD` with the poller.
    pub fn socket(&self) -> &zmq::Socket {
        &self.socket
    }

    /// Answers every waiting request without blocking.
    pub fn answer_pending(&mut self) -> zmq::Result<()> {
        loop {
            let request = match self.socket.recv_multipart(zmq::DONTWAIT) {
                Ok(request) => request,
                Err(zmq::Error::EAGAIN) => return Ok(()),
                Err(e) => return Err(e),
            };
            let (status, text, user) = self.decide(&request);
            if status == b"200" {
                self.admitted += 1;
            } else {
                self.denied += 1;
                self.log.warn(
                    std::time::Instant::now(),
                    format_args!("refused a CURVE client: {text}"),
                );
            }
            let request_id: &[u8] = request.get(1).map_or(&[], Vec::as_slice);
            self.socket.send_multipart(
                [
                    &b"1.0"[..],
                    request_id,
                    status,
                    text.as_bytes(),
                    user.as_bytes(),
                    b"",
                ],
                0,
            )?;
        }
    }

    /// RFC 27 request: version, request id, domain, address, routing id,
    /// mechanism, then the mechanism's credentials (CURVE: the 32-byte key).
    fn decide(&self, request: &[Vec<u8>]) -> (&'static [u8], &'static str, String) {
        let [
            version,
            _id,
            domain,
            _address,
            _routing_id,
            mechanism,
            key,
            ..,
        ] = request
        else {
            return (b"400", "malformed ZAP request", String::new());
        };
        if version != b"1.0" || mechanism != b"CURVE" || key.len() != 32 {
            return (b"400", "CURVE required", String::new());
        }
        let Ok(key) = zmq::z85_encode(key) else {
            return (b"400", "bad key", String::new());
        };
        let list = match domain.as_slice() {
            d if d == PUBLISHER_DOMAIN.as_bytes() => &self.acl.publishers,
            d if d == SUBSCRIBER_DOMAIN.as_bytes() => &self.acl.subscribers,
            _ => return (b"400", "unknown domain", String::new()),
        };
        if list.contains(&key) {
            (b"200", "OK", key)
        } else {
            (b"400", "key not listed", String::new())
        }
    }
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
        let key = zmq::z85_encode(&[7u8; 32]).unwrap();
        let text = format!("# comment\n\n{key} prefix:net. pattern:a.*  # trailing\n");
        let list = KeyList::parse(&text, Path::new("keys"), 64).unwrap();
        assert!(list.contains(&key));
        assert_eq!(list.allowed(&key).unwrap().len(), 2);
        let err = KeyList::parse(&format!("{key}\n"), Path::new("keys"), 64).unwrap_err();
        assert!(err.to_string().contains("keys:1") && err.to_string().contains("prefix:"));
        assert!(KeyList::parse("short prefix:", Path::new("k"), 64).is_err());
    }

    #[test]
    fn keys_containing_hash_are_not_comments() {
        let key = "#".repeat(40);
        assert!(is_z85_key(&key));
        let list =
            KeyList::parse(&format!("{key} prefix: # comment\n"), Path::new("k"), 64).unwrap();
        assert_eq!(list.allowed(&key).unwrap().len(), 1);
    }

    #[test]
    fn keygen_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.key");
        let public = keygen(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let keys = read_secret_key(&path).unwrap();
        assert_eq!(keys.public, public);
        let pub_path = dir.path().join("broker.key.pub");
        assert_eq!(read_public_key(&pub_path).unwrap(), public);
        assert!(keygen(&path).is_err(), "never overwrites a key");
    }
}
