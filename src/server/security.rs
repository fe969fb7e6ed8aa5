//! CURVE: loading the broker's key and the key lists ([`check`]), and
//! turning a socket into a CURVE server that asks the ZAP handler.

use std::sync::Arc;

use super::error::{ServerError, zmq_call};
use crate::auth::{self, Acl, ServerKeys};
use crate::config::Config;

/// What CURVE needs at run time, loaded from the configured files.
#[derive(Debug)]
pub struct Security {
    /// The broker's key pair.
    pub keys: ServerKeys,
    /// Who may connect and use which topics.
    pub acl: Arc<Acl>,
}

/// Validates `config` and loads the files it refers to, binding nothing:
/// what `zbroker run --check-config` runs. `None` when CURVE is off.
pub fn check(config: &Config) -> Result<Option<Security>, ServerError> {
    config.validate().map_err(ServerError::Config)?;
    let Some(curve) = &config.curve else {
        return Ok(None);
    };
    if !zmq::has("curve").unwrap_or(false) {
        return Err(ServerError::Zmq(
            "CURVE is configured but this libzmq was built without it",
            zmq::Error::ENOTSUP,
        ));
    }
    let max = config.limits.max_filter_len;
    let keys = auth::read_secret_key(&curve.secret_key_file).map_err(ServerError::Auth)?;
    let acl = Acl {
        publishers: auth::load_key_list(&curve.publisher_keys, max).map_err(ServerError::Auth)?,
        subscribers: auth::load_key_list(&curve.subscriber_keys, max).map_err(ServerError::Auth)?,
    };
    Ok(Some(Security {
        keys,
        acl: Arc::new(acl),
    }))
}

impl Security {
    /// Makes `socket` a CURVE server with the broker's key, whose clients
    /// the ZAP handler checks against the key list of `domain`
    /// ([`auth::PUBLISHER_DOMAIN`] or [`auth::SUBSCRIBER_DOMAIN`]).
    pub(crate) fn secure(&self, socket: &zmq::Socket, domain: &str) -> Result<(), ServerError> {
        let secret = zmq::z85_decode(&self.keys.secret)
            .map_err(|_| ServerError::Zmq("decode the secret key", zmq::Error::EINVAL))?;
        zmq_call("set ZMQ_CURVE_SERVER", socket.set_curve_server(true))?;
        zmq_call(
            "set ZMQ_CURVE_SECRETKEY",
            socket.set_curve_secretkey(&secret),
        )?;
        zmq_call("set ZMQ_ZAP_DOMAIN", socket.set_zap_domain(domain))?;
        Ok(())
    }
}
