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
    let keys = auth::read_secret_key(&curve.secret_key_file).map_err(ServerError::Auth)?;
    let Some(acl) = load_acl(config)? else {
        return Ok(None);
    };
    Ok(Some(Security {
        keys,
        acl: Arc::new(acl),
    }))
}

/// Loads the key lists `config` names into a new ACL; what a reload
/// installs, or why it cannot.
pub fn load_acl(config: &Config) -> Result<Option<Acl>, ServerError> {
    let Some(curve) = &config.curve else {
        return Ok(None);
    };
    let max = config.limits.max_filter_len;
    let peers = match &curve.cluster_peer_keys {
        Some(path) => auth::load_peer_keys(path).map_err(ServerError::Auth)?,
        None => Default::default(),
    };
    Ok(Some(Acl {
        publishers: auth::load_key_list(&curve.publisher_keys, max).map_err(ServerError::Auth)?,
        subscribers: auth::load_key_list(&curve.subscriber_keys, max).map_err(ServerError::Auth)?,
        peers,
    }))
}

impl super::Server {
    /// Re-reads the key lists (SIGHUP, `systemctl reload`) and enforces
    /// them from now on: new handshakes are checked against them, and
    /// what they no longer allow is cut from connected subscribers (see
    /// [`Broker::replace_acl`](crate::broker::Broker::replace_acl)). A list
    /// that does not load changes nothing; the log says why.
    pub(crate) fn reload_keys(&mut self) {
        let acl = match load_acl(&self.config) {
            Ok(Some(acl)) => Arc::new(acl),
            Ok(None) => {
                tracing::warn!("nothing to reload: CURVE is off, so there are no key lists");
                return;
            }
            Err(e) => {
                self.key_reload_failures += 1;
                tracing::error!("key lists not reloaded, the running ones stay: {e}");
                return;
            }
        };
        if let Some(zap) = self.zap.as_mut() {
            zap.set_acl(Arc::clone(&acl));
        }
        if let Some(security) = self.security.as_mut() {
            security.acl = Arc::clone(&acl);
        }
        let (publishers, subscribers) = (acl.publishers.len(), acl.subscribers.len());
        let revoked = self.core.replace_acl(
            acl,
            std::time::Instant::now(),
            &mut super::RouterTransport::full(
                &mut self.router,
                self.xpub.as_mut(),
                self.cluster.as_mut(),
            ),
        );
        self.key_reloads += 1;
        tracing::info!(
            publishers,
            subscribers,
            revoked_filters = revoked.filters,
            revoked_subscribers = revoked.subscribers,
            "key lists reloaded"
        );
    }
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
