//! The broker's sockets: PULL for publishers, ROUTER for subscribers, and
//! the optional XPUB front for plain SUB sockets, created with the options
//! that bound what a peer can make the broker hold, and bound to their
//! endpoints.

use std::ffi::c_int;

use super::error::{ServerError, zmq_call};
use super::security::Security;
use crate::auth;
use crate::config::Config;
use crate::ffi::{set_i64_option, set_int_option};

/// libzmq's queue of commands from each subscriber (`ZMQ_RCVHWM` on the
/// ROUTER). The loop reads commands every turn, so this fills only while
/// the broker is starved; it bounds what one subscriber can have buffered
/// then, and is not worth a setting.
const COMMAND_HWM: i32 = 1000;

/// libzmq's DRAFT batch-size options (zmq.h); the `zmq` crate has no setter
/// for them, and only a libzmq built with the DRAFT API knows them
/// (vendor/zmq-sys builds one).
const ZMQ_IN_BATCH_SIZE: c_int = 101;
const ZMQ_OUT_BATCH_SIZE: c_int = 102;

/// The options zbroker's own libzmq build adds (zmq.h in vendor/zeromq-src;
/// vendor/zmq-sys/README.md says why each exists).
const ZMQ_ZBROKER_MAXMSGPARTS: c_int = 1001;
const ZMQ_ZBROKER_SNDHWM_BYTES: c_int = 1002;
const ZMQ_ZBROKER_RCVHWM_BYTES: c_int = 1003;
const ZMQ_ZBROKER_MAX_CONNECTIONS: c_int = 1004;
/// Read-only: the bytes queued in all of a socket's outgoing pipes.
pub(crate) const ZMQ_ZBROKER_OUT_BYTES: c_int = 1005;
/// Read-only: messages an XPUB dropped for a full SUB, per message and SUB.
pub(crate) const ZMQ_ZBROKER_DROPPED: c_int = 1006;

/// Most parts a message from any peer may have. Protocol v1's longest
/// message has three; the broker reads the extra parts of a longer one and
/// refuses it as malformed, but past this libzmq drops the peer instead of
/// holding an endless message (README, "Security").
const MAX_MESSAGE_PARTS: c_int = 16;

/// libzmq's byte bound on each subscriber's queue of commands (with
/// [`COMMAND_HWM`] messages): commands are a few hundred bytes.
const COMMAND_HWM_BYTES: i64 = 1 << 20;

/// Raises the soft open-file limit to the hard limit: every subscriber
/// connection is a descriptor, and the default 1024 caps the broker far below
/// the fan-outs it is built for.
pub(crate) fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit raised"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// The publishers' PULL socket with every option set, not yet bound.
pub(crate) fn publishers(
    context: &zmq::Context,
    config: &Config,
    security: Option<&Security>,
) -> Result<zmq::Socket, ServerError> {
    let mut pull = zmq_call("create the PULL socket", context.socket(zmq::PULL))?;
    set_common_options(&mut pull, config, security, auth::PUBLISHER_DOMAIN)?;
    zmq_call("set ZMQ_RCVHWM", pull.set_rcvhwm(config.pub_hwm))?;
    zmq_call(
        "set ZMQ_ZBROKER_RCVHWM_BYTES",
        set_i64_option(&mut pull, ZMQ_ZBROKER_RCVHWM_BYTES, config.pub_hwm_bytes),
    )?;
    zmq_call(
        "set ZMQ_IN_BATCH_SIZE (needs libzmq's DRAFT API)",
        set_int_option(&mut pull, ZMQ_IN_BATCH_SIZE, config.io_batch),
    )?;
    Ok(pull)
}

/// The subscribers' ROUTER socket with every option set, not yet bound.
pub(crate) fn subscribers(
    context: &zmq::Context,
    config: &Config,
    security: Option<&Security>,
) -> Result<zmq::Socket, ServerError> {
    let mut router = zmq_call("create the ROUTER socket", context.socket(zmq::ROUTER))?;
    set_common_options(&mut router, config, security, auth::SUBSCRIBER_DOMAIN)?;
    // Without MANDATORY, ROUTER silently drops what it cannot send; with
    // it, a full pipe is EAGAIN (queue and retry) and a vanished peer is
    // EHOSTUNREACH (free it at once).
    zmq_call(
        "set ZMQ_ROUTER_MANDATORY",
        router.set_router_mandatory(true),
    )?;
    zmq_call("set ZMQ_SNDHWM", router.set_sndhwm(config.sub_hwm))?;
    zmq_call("set ZMQ_RCVHWM", router.set_rcvhwm(COMMAND_HWM))?;
    zmq_call(
        "set ZMQ_ZBROKER_SNDHWM_BYTES",
        set_i64_option(&mut router, ZMQ_ZBROKER_SNDHWM_BYTES, config.sub_hwm_bytes),
    )?;
    zmq_call(
        "set ZMQ_ZBROKER_RCVHWM_BYTES",
        set_i64_option(&mut router, ZMQ_ZBROKER_RCVHWM_BYTES, COMMAND_HWM_BYTES),
    )?;
    zmq_call(
        "set ZMQ_OUT_BATCH_SIZE (needs libzmq's DRAFT API)",
        set_int_option(&mut router, ZMQ_OUT_BATCH_SIZE, config.io_batch),
    )?;
    Ok(router)
}

/// `ZMQ_XPUB_VERBOSER`: pass every subscribe and unsubscribe notice up,
/// duplicates and those of closing connections included, so that the
/// core's count per prefix is exact.
const ZMQ_XPUB_VERBOSER: c_int = 78;

/// The XPUB front's socket with every option set, not yet bound: plain SUB
/// sockets connect to it. Never with CURVE (`Config::validate` refuses).
pub(crate) fn xpub_front(
    context: &zmq::Context,
    config: &Config,
) -> Result<zmq::Socket, ServerError> {
    let mut xpub = zmq_call("create the XPUB socket", context.socket(zmq::XPUB))?;
    set_common_options(&mut xpub, config, None, auth::SUBSCRIBER_DOMAIN)?;
    // A SUB sends only subscription notices: one byte and a prefix.
    let notice_size = i64::try_from(config.limits.max_filter_len + 1).unwrap_or(i64::MAX);
    zmq_call("set ZMQ_MAXMSGSIZE", xpub.set_maxmsgsize(notice_size))?;
    zmq_call(
        "set ZMQ_XPUB_VERBOSER",
        set_int_option(&mut xpub, ZMQ_XPUB_VERBOSER, 1),
    )?;
    zmq_call("set ZMQ_SNDHWM", xpub.set_sndhwm(config.sub_hwm))?;
    zmq_call("set ZMQ_RCVHWM", xpub.set_rcvhwm(COMMAND_HWM))?;
    zmq_call(
        "set ZMQ_ZBROKER_SNDHWM_BYTES",
        set_i64_option(&mut xpub, ZMQ_ZBROKER_SNDHWM_BYTES, config.sub_hwm_bytes),
    )?;
    zmq_call(
        "set ZMQ_OUT_BATCH_SIZE (needs libzmq's DRAFT API)",
        set_int_option(&mut xpub, ZMQ_OUT_BATCH_SIZE, config.io_batch),
    )?;
    Ok(xpub)
}

/// What every socket shares: CURVE, heartbeats, and the limits on what a
/// peer can send.
fn set_common_options(
    socket: &mut zmq::Socket,
    config: &Config,
    security: Option<&Security>,
    domain: &str,
) -> Result<(), ServerError> {
    if let Some(security) = security {
        security.secure(socket, domain)?;
    }
    let heartbeat = config.zmtp_heartbeat.as_millis().min(i32::MAX as u128) as i32;
    zmq_call("set ZMQ_HEARTBEAT_IVL", socket.set_heartbeat_ivl(heartbeat))?;
    // A peer whose input is stalled by backpressure cannot answer ZMTP
    // pings, so a short timeout would disconnect every slow consumer (and
    // turn drop-new into disconnect). Dead peers are dropped after the same
    // time the protocol forgets a silent subscriber.
    let timeout = config
        .sub_timeout
        .max(config.zmtp_heartbeat * 3)
        .as_millis()
        .min(i32::MAX as u128) as i32;
    zmq_call(
        "set ZMQ_HEARTBEAT_TIMEOUT",
        socket.set_heartbeat_timeout(timeout),
    )?;
    zmq_call(
        "set ZMQ_MAXMSGSIZE",
        socket.set_maxmsgsize(config.limits.max_message_size),
    )?;
    zmq_call("set ZMQ_LINGER", socket.set_linger(0))?;
    zmq_call(
        "set ZMQ_ZBROKER_MAXMSGPARTS (needs zbroker's libzmq)",
        set_int_option(socket, ZMQ_ZBROKER_MAXMSGPARTS, MAX_MESSAGE_PARTS),
    )?;
    let max_connections = c_int::try_from(config.limits.max_connections).unwrap_or(c_int::MAX);
    zmq_call(
        "set ZMQ_ZBROKER_MAX_CONNECTIONS",
        set_int_option(socket, ZMQ_ZBROKER_MAX_CONNECTIONS, max_connections),
    )?;
    Ok(())
}

/// Binds `socket` to each of `endpoints`; returns them as bound.
pub(crate) fn bind_all(
    socket: &zmq::Socket,
    role: &'static str,
    endpoints: &[String],
) -> Result<Vec<String>, ServerError> {
    endpoints.iter().map(|e| bind(socket, role, e)).collect()
}

/// Binds `socket` and returns the endpoint as bound: for `tcp://host:*` or
/// port 0, with the port the system picked.
pub(crate) fn bind(
    socket: &zmq::Socket,
    role: &'static str,
    endpoint: &str,
) -> Result<String, ServerError> {
    socket.bind(endpoint).map_err(|source| ServerError::Bind {
        role,
        endpoint: endpoint.to_string(),
        source,
    })?;
    let bound = zmq_call("read ZMQ_LAST_ENDPOINT", socket.get_last_endpoint())?;
    Ok(bound.unwrap_or_else(|_| endpoint.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::get_int_option;
    use crate::server::Server;

    fn int_option(socket: &mut zmq::Socket, option: c_int) -> c_int {
        get_int_option(socket, option).unwrap_or_else(|e| panic!("zmq_getsockopt({option}): {e}"))
    }

    #[test]
    fn io_batch_is_set_where_messages_flow_and_only_there() {
        let config = Config {
            pub_bind: vec!["tcp://127.0.0.1:*".into()],
            sub_bind: vec!["tcp://127.0.0.1:*".into()],
            io_batch: 24_576,
            ..Config::default()
        };
        let mut server = Server::bind(config).expect("bind the broker");
        assert_eq!(int_option(&mut server.pull, ZMQ_IN_BATCH_SIZE), 24_576);
        assert_eq!(int_option(&mut server.router, ZMQ_OUT_BATCH_SIZE), 24_576);
        // Subscriber commands are small and few: libzmq's default stays.
        assert_eq!(int_option(&mut server.router, ZMQ_IN_BATCH_SIZE), 8192);
    }
}
