//! [`ServerError`]: why the broker could not start or had to stop.

use std::fmt;

/// Why the broker could not start or had to stop.
#[derive(Debug)]
pub enum ServerError {
    /// Binding an endpoint failed.
    Bind {
        /// Which socket (`publisher` or `subscriber`).
        role: &'static str,
        /// The endpoint as configured.
        endpoint: String,
        /// libzmq's reason.
        source: zmq::Error,
    },
    /// A libzmq call failed.
    Zmq(&'static str, zmq::Error),
    /// The poller failed.
    Io(&'static str, std::io::Error),
    /// The configuration cannot work.
    Config(crate::config::ConfigError),
    /// CURVE keys or key lists could not be loaded.
    Auth(crate::auth::AuthError),
    /// A peer link's endpoint was refused by libzmq (not a valid endpoint).
    Connect {
        /// The peer endpoint, as configured or registered.
        endpoint: String,
        /// libzmq's reason.
        source: zmq::Error,
    },
    /// etcd membership could not start (its message says what to change).
    Membership(String),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::Bind {
                role,
                endpoint,
                source,
            } => {
                write!(f, "cannot bind the {role} endpoint {endpoint}: {source}")?;
                let flag = match *role {
                    "publisher" => "pub-bind",
                    "subscriber" => "sub-bind",
                    "XPUB front" => "xpub-bind",
                    _ => "cluster-bind",
                };
                if *source == zmq::Error::EADDRINUSE {
                    write!(
                        f,
                        " (is another broker running? choose another address with --{flag})"
                    )?;
                }
                Ok(())
            }
            ServerError::Zmq(what, e) => write!(f, "{what}: {e}"),
            ServerError::Io(what, e) => write!(f, "{what}: {e}"),
            ServerError::Config(e) => e.fmt(f),
            ServerError::Auth(e) => e.fmt(f),
            ServerError::Connect { endpoint, source } => write!(
                f,
                "cannot open a peer link to {endpoint}: {source} (peers are endpoints such as \
                 tcp://10.0.0.2:5580; check --cluster-peers or the etcd members)"
            ),
            ServerError::Membership(why) => write!(f, "cluster membership: {why}"),
        }
    }
}

impl std::error::Error for ServerError {}

/// Names a failed libzmq call: `what` says what the broker was doing.
pub(crate) fn zmq_call<T>(what: &'static str, result: zmq::Result<T>) -> Result<T, ServerError> {
    result.map_err(|e| ServerError::Zmq(what, e))
}
