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

pub use zbroker_core::acl::{Acl, KeyList, PeerKeys, filter_within, is_z85_key};

/// The ZAP domain set on the broker's PULL socket.
pub const PUBLISHER_DOMAIN: &str = "publishers";
/// The ZAP domain set on the broker's ROUTER socket.
pub const SUBSCRIBER_DOMAIN: &str = "subscribers";
/// ZAP domain of the cluster endpoint: peer brokers' links.
pub const CLUSTER_DOMAIN: &str = "cluster";
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

/// Reads and parses a key-list file ([`KeyList::parse`]).
pub fn load_key_list(path: &Path, max_filter_len: usize) -> Result<KeyList, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|e| AuthError::Io(path.to_path_buf(), e))?;
    KeyList::parse(&text, max_filter_len).map_err(|e| AuthError::Line {
        path: path.to_path_buf(),
        line: e.line,
        problem: e.problem,
    })
}

/// Reads and parses a peer-key file ([`PeerKeys::parse`]).
pub fn load_peer_keys(path: &Path) -> Result<PeerKeys, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|e| AuthError::Io(path.to_path_buf(), e))?;
    PeerKeys::parse(&text).map_err(|e| AuthError::Line {
        path: path.to_path_buf(),
        line: e.line,
        problem: e.problem,
    })
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

/// Derives the Z85 public key of a Z85 secret key.
pub fn public_key_of(secret: &str) -> Result<String, AuthError> {
    let secret = std::ffi::CString::new(secret)
        .map_err(|_| AuthError::Zmq("read a secret key", zmq::Error::EINVAL))?;
    crate::ffi::curve_public(&secret).map_err(|e| AuthError::Zmq("derive the public key", e))
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
    log: zbroker_core::counters::LogLimiter,
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

    /// Checks handshakes against `acl` from now on (a key-list reload);
    /// connections already admitted stay.
    pub fn set_acl(&mut self, acl: std::sync::Arc<Acl>) {
        self.acl = acl;
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
            d if d == CLUSTER_DOMAIN.as_bytes() => {
                return if self.acl.peers.contains(&key) {
                    (b"200", "OK", key)
                } else {
                    (b"400", "peer key not listed", String::new())
                };
            }
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

    #[test]
    fn secret_keys_that_are_not_40_characters_are_refused() {
        // Valid Z85 all the same: libzmq alone would decode the 45 into 36
        // bytes of a 32-byte buffer.
        for len in [35, 45] {
            let secret = "0".repeat(len);
            assert!(
                matches!(
                    public_key_of(&secret),
                    Err(AuthError::Zmq(_, zmq::Error::EINVAL))
                ),
                "{len} characters"
            );
        }
    }
}
