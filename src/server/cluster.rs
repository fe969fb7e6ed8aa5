//! The cluster's sockets: a ROUTER on `--cluster-bind` serving peers'
//! links, and one DEALER per peer carrying this broker's own link. They
//! only move frames; the core (`zbroker_core::cluster`) decides what goes
//! on them.
//!
//! Both directions of a pair of brokers use the link the receiving side
//! opened: broker A's DEALER to B carries A's HELLO, interest and PINGs to
//! B, and brings back B's PONGs and the messages published at B that A's
//! interest matches. So A's interest and the messages it asked for share a
//! connection and break together.

use std::os::fd::RawFd;

use mio::unix::SourceFd;
use mio::{Interest, Poll, Token};
use zbroker_core::cluster::{Identity, LinkId};

use super::error::{ServerError, zmq_call};
use crate::config::Config;
use crate::ffi::set_int_option;

/// Tokens of the outgoing links' `ZMQ_FD`s start here (one per link id).
pub(crate) const LINK_TOKENS: usize = 1 << 20;

/// libzmq's queue of link messages towards one peer, in messages: interest
/// changes and PINGs on a link, FORWARDs on the cluster ROUTER (behind
/// which the core's own per-peer queue waits, `--cluster-queue-max-*`).
/// As deep as a subscriber's pipe (`--sub-hwm`): at 100,000 the mesh ran
/// 1→1 across brokers at about half the rate, on three times the memory
/// (BENCHMARKS.md, "Cluster"), since deeper pipes only hold more.
const LINK_HWM: i32 = 3_000;

/// How soon a link reconnects after its peer went away: peers restart in
/// about a second, and a link that is down carries nothing.
const RECONNECT_IVL_MS: i32 = 100;

/// `ZMQ_IMMEDIATE`: a link not connected refuses sends (`EAGAIN`) instead
/// of queueing them for a peer that may never come; the core then owes the
/// peer a HELLO and a snapshot, sent once it is connected.
const ZMQ_IMMEDIATE: std::ffi::c_int = 39;

/// One outgoing link's socket.
pub(crate) struct LinkSocket {
    pub(crate) id: LinkId,
    pub(crate) endpoint: String,
    pub(crate) socket: zmq::Socket,
    fd: RawFd,
}

/// The cluster ROUTER and the outgoing links.
pub struct ClusterSockets {
    pub(crate) router: zmq::Socket,
    pub(crate) links: Vec<LinkSocket>,
    /// The cluster endpoint as bound.
    pub(crate) endpoint: String,
}

impl ClusterSockets {
    /// Binds the cluster ROUTER to `bind` and registers it with `poll`
    /// under `token`.
    pub(crate) fn bind(
        context: &zmq::Context,
        config: &Config,
        bind: &str,
        poll: &Poll,
        token: Token,
        security: Option<&super::Security>,
    ) -> Result<ClusterSockets, ServerError> {
        let router = zmq_call(
            "create the cluster ROUTER socket",
            context.socket(zmq::ROUTER),
        )?;
        if let Some(security) = security {
            // Only listed peer keys get through (the ZAP handler's
            // `cluster` domain).
            security.secure(&router, crate::auth::CLUSTER_DOMAIN)?;
        }
        zmq_call(
            "set ZMQ_ROUTER_MANDATORY",
            router.set_router_mandatory(true),
        )?;
        zmq_call("set ZMQ_SNDHWM", router.set_sndhwm(LINK_HWM))?;
        zmq_call("set ZMQ_RCVHWM", router.set_rcvhwm(LINK_HWM))?;
        zmq_call(
            "set ZMQ_MAXMSGSIZE",
            router.set_maxmsgsize(link_message_limit(config)),
        )?;
        zmq_call("set ZMQ_LINGER", router.set_linger(0))?;
        set_heartbeats(&router, config)?;
        let endpoint = super::socket::bind(&router, "cluster", bind)?;
        register(poll, zmq_call("read ZMQ_FD", router.get_fd())?, token)?;
        Ok(ClusterSockets {
            router,
            links: Vec::new(),
            endpoint,
        })
    }

    /// Opens the socket of link `id` to `endpoint` and registers it with
    /// `poll`. libzmq connects (and reconnects) in the background.
    pub(crate) fn connect(
        &mut self,
        context: &zmq::Context,
        config: &Config,
        poll: &Poll,
        id: LinkId,
        endpoint: &str,
        curve: Option<(&crate::auth::ServerKeys, &str)>,
    ) -> Result<(), ServerError> {
        let mut socket = zmq_call(
            "create a peer link's DEALER socket",
            context.socket(zmq::DEALER),
        )?;
        if let Some((own, peer)) = curve {
            // The link proves this broker's own key, and checks the peer's.
            let decode = |what: &'static str, key: &str| {
                zmq::z85_decode(key).map_err(|_| ServerError::Zmq(what, zmq::Error::EINVAL))
            };
            zmq_call(
                "set ZMQ_CURVE_SERVERKEY",
                socket.set_curve_serverkey(&decode("decode a peer's public key", peer)?),
            )?;
            zmq_call(
                "set ZMQ_CURVE_PUBLICKEY",
                socket.set_curve_publickey(&decode("decode the public key", &own.public)?),
            )?;
            zmq_call(
                "set ZMQ_CURVE_SECRETKEY",
                socket.set_curve_secretkey(&decode("decode the secret key", &own.secret)?),
            )?;
        }
        zmq_call("set ZMQ_SNDHWM", socket.set_sndhwm(LINK_HWM))?;
        zmq_call("set ZMQ_RCVHWM", socket.set_rcvhwm(LINK_HWM))?;
        zmq_call(
            "set ZMQ_MAXMSGSIZE",
            socket.set_maxmsgsize(config.limits.max_message_size),
        )?;
        zmq_call("set ZMQ_LINGER", socket.set_linger(0))?;
        zmq_call(
            "set ZMQ_RECONNECT_IVL",
            socket.set_reconnect_ivl(RECONNECT_IVL_MS),
        )?;
        zmq_call(
            "set ZMQ_IMMEDIATE",
            set_int_option(&mut socket, ZMQ_IMMEDIATE, 1),
        )?;
        set_heartbeats(&socket, config)?;
        socket
            .connect(endpoint)
            .map_err(|source| ServerError::Bind {
                role: "peer link",
                endpoint: endpoint.to_string(),
                source,
            })?;
        let fd = zmq_call("read ZMQ_FD", socket.get_fd())?;
        register(poll, fd, link_token(id))?;
        self.links.push(LinkSocket {
            id,
            endpoint: endpoint.to_string(),
            socket,
            fd,
        });
        Ok(())
    }

    /// Closes link `id`'s socket.
    pub(crate) fn disconnect(&mut self, poll: &Poll, id: LinkId) {
        if let Some(at) = self.links.iter().position(|l| l.id == id) {
            let link = self.links.remove(at);
            // Before the socket (and so its descriptor) closes.
            let _ = poll.registry().deregister(&mut SourceFd(&link.fd));
        }
    }

    /// The link socket with id `id`.
    pub(crate) fn link(&mut self, id: LinkId) -> Option<&mut zmq::Socket> {
        self.links
            .iter_mut()
            .find(|l| l.id == id)
            .map(|l| &mut l.socket)
    }

    /// Whether any cluster socket holds a message to read (which also
    /// re-arms their `ZMQ_FD` edges; see `event_loop`).
    pub(crate) fn has_input(&self) -> Result<bool, ServerError> {
        if super::event_loop::has_input(&self.router)? {
            return Ok(true);
        }
        for link in &self.links {
            if super::event_loop::has_input(&link.socket)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Binds the cluster endpoint and makes `core` a member; links follow
/// membership ([`Server::set_members`](super::Server::set_members)).
pub(crate) fn start(
    context: &zmq::Context,
    config: &Config,
    bind: &str,
    poll: &Poll,
    core: &mut crate::broker::Broker<crate::frame::Frame>,
    security: Option<&super::Security>,
) -> Result<ClusterSockets, ServerError> {
    let sockets = ClusterSockets::bind(context, config, bind, poll, CLUSTER, security)?;
    let identity = Identity {
        broker_id: config.cluster.id.clone().unwrap_or_else(random_broker_id),
        epoch: new_epoch(),
    };
    tracing::info!(
        endpoint = sockets.endpoint,
        broker_id = identity.broker_id,
        epoch = identity.epoch,
        "peers connect to"
    );
    core.enable_cluster(identity, std::time::Instant::now());
    Ok(sockets)
}

/// The cluster ROUTER's poll token.
pub(crate) const CLUSTER: Token = Token(LINK_TOKENS - 1);

/// The poll token of link `id`.
fn link_token(id: LinkId) -> Token {
    Token(LINK_TOKENS + (id as usize % LINK_TOKENS))
}

/// The largest frame a peer may send on the cluster ROUTER: link messages
/// are small except snapshot chunks, which stay far below this.
fn link_message_limit(config: &Config) -> i64 {
    let chunk = zbroker_core::cluster::wire::SNAPSHOT_CHUNK_FILTERS as i64
        * (config.limits.max_filter_len as i64 + 8);
    chunk.max(1 << 20)
}

/// ZMTP heartbeats, so a dead TCP peer is noticed by libzmq too.
fn set_heartbeats(socket: &zmq::Socket, config: &Config) -> Result<(), ServerError> {
    let ping = config.cluster.ping_interval.as_millis().clamp(100, 60_000) as i32;
    let timeout = config.cluster.peer_timeout.as_millis().clamp(300, 600_000) as i32;
    zmq_call("set ZMQ_HEARTBEAT_IVL", socket.set_heartbeat_ivl(ping))?;
    zmq_call(
        "set ZMQ_HEARTBEAT_TIMEOUT",
        socket.set_heartbeat_timeout(timeout),
    )?;
    Ok(())
}

fn register(poll: &Poll, fd: RawFd, token: Token) -> Result<(), ServerError> {
    poll.registry()
        .register(&mut SourceFd(&fd), token, Interest::READABLE)
        .map_err(|e| ServerError::Io("register a cluster socket with the poller", e))
}

/// A broker id for a broker started without `--cluster-id`: random enough
/// that two brokers never share one.
pub(crate) fn random_broker_id() -> String {
    format!("{:016x}", random_u64())
}

/// An epoch for this start: a broker restarted with the same id gets a
/// different one.
pub(crate) fn new_epoch() -> u64 {
    random_u64()
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process; mixing in the time
    // and pid makes two draws in one process differ too.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

impl super::Server {
    /// Brings the outgoing links in line with `members`, the other
    /// members' cluster endpoints (and public keys, when registered) as
    /// membership reports them: opens a link to each new one and closes the
    /// link of each member gone (its interest here expires with its
    /// silence). Under CURVE a link checks its peer's key: the member's
    /// own, else the one `--cluster-peer-keys` lists for its endpoint; a
    /// member with neither gets no link, and an error in the log.
    pub(crate) fn set_members(
        &mut self,
        members: &[(String, Option<String>)],
    ) -> Result<(), ServerError> {
        let endpoints: Vec<String> = members.iter().map(|(e, _)| e.clone()).collect();
        let Some(cluster) = self.cluster.as_mut() else {
            return Ok(());
        };
        let gone: Vec<LinkId> = cluster
            .links
            .iter()
            .filter(|l| !endpoints.contains(&l.endpoint))
            .map(|l| l.id)
            .collect();
        for id in gone {
            cluster.disconnect(&self.poll, id);
            self.core.remove_link(id);
        }
        let now = std::time::Instant::now();
        let bound = cluster.endpoint.clone();
        let me = [
            Some(&bound),
            self.config.cluster.bind.as_ref(),
            self.config.cluster.advertise.as_ref(),
        ];
        for endpoint in &endpoints {
            // A shared peer list names this broker too.
            if me.contains(&Some(endpoint)) || cluster.links.iter().any(|l| l.endpoint == *endpoint)
            {
                continue;
            }
            let registered = members
                .iter()
                .find(|(e, _)| e == endpoint)
                .and_then(|(_, key)| key.clone());
            let curve = match &self.security {
                None => None,
                Some(security) => {
                    let listed = security.acl.peers.key_for(endpoint).map(str::to_string);
                    match registered.or(listed) {
                        Some(key) => Some((security.keys.clone(), key)),
                        None => {
                            tracing::error!(
                                endpoint,
                                "no public key for this peer: list it in --cluster-peer-keys \
                                 (KEY ENDPOINT); no link to it"
                            );
                            continue;
                        }
                    }
                }
            };
            if let Some(id) = self.core.add_link(endpoint, now) {
                let curve = curve.as_ref().map(|(own, peer)| (own, peer.as_str()));
                cluster.connect(&self.context, &self.config, &self.poll, id, endpoint, curve)?;
            }
        }
        Ok(())
    }
}

/// This broker's etcd membership and what its thread reports.
pub(crate) struct Membership {
    // Dropped first: revokes the lease, so peers forget this broker at once.
    registration: Option<crate::membership::EtcdMembership>,
    events: std::sync::mpsc::Receiver<crate::membership::MembershipEvent>,
    /// etcd answers (as of the last event).
    pub(crate) registry_up: bool,
    /// Times etcd became unreachable.
    pub(crate) registry_losses: u64,
    /// Members known (this broker not counted).
    pub(crate) members: u64,
}

impl Membership {
    /// Registers this broker under `/zbroker/<name>/members/<id>` with its
    /// advertised cluster endpoint and starts watching the others.
    pub(crate) fn start(
        config: &Config,
        sockets: &ClusterSockets,
        core: &crate::broker::Broker<crate::frame::Frame>,
        stopper: &super::Stopper,
        security: Option<&super::Security>,
    ) -> Result<Membership, ServerError> {
        let cluster = &config.cluster;
        let id = core
            .identity()
            .map(|me| me.broker_id.clone())
            .unwrap_or_else(random_broker_id);
        let me = crate::membership::Member {
            id,
            endpoint: cluster
                .advertise
                .clone()
                .unwrap_or_else(|| sockets.endpoint.clone()),
            public_key: security.map(|s| s.keys.public.clone()),
        };
        let mut settings =
            crate::membership::EtcdSettings::new(cluster.etcd.clone(), cluster.name.clone());
        settings.lease_ttl = cluster.lease_ttl;
        let (sender, events) = std::sync::mpsc::channel();
        let registration =
            crate::membership::EtcdMembership::start(settings, me, sender, stopper.waker())
                .map_err(|e| ServerError::Membership(e.to_string()))?;
        tracing::info!(
            etcd = ?cluster.etcd,
            cluster = cluster.name,
            "cluster membership from etcd"
        );
        Ok(Membership {
            registration: Some(registration),
            events,
            registry_up: false,
            registry_losses: 0,
            members: 0,
        })
    }

    /// Deregisters (revokes the lease), bounded in time.
    pub(crate) fn stop(&mut self) {
        if let Some(registration) = self.registration.take() {
            registration.stop();
        }
    }
}

impl super::Server {
    /// Applies what the membership thread reported since the last call:
    /// links follow the member list; while etcd is away the last list
    /// stays.
    pub(crate) fn poll_membership(&mut self) -> Result<(), ServerError> {
        use crate::membership::MembershipEvent;
        loop {
            let Some(membership) = self.membership.as_mut() else {
                return Ok(());
            };
            let event = match membership.events.try_recv() {
                Ok(event) => event,
                Err(_) => return Ok(()),
            };
            match event {
                MembershipEvent::Members(members) => {
                    membership.registry_up = true;
                    membership.members = members.len() as u64;
                    tracing::info!(
                        members = ?members.iter().map(|m| (&m.id, &m.endpoint)).collect::<Vec<_>>(),
                        "cluster members"
                    );
                    let members: Vec<(String, Option<String>)> = members
                        .into_iter()
                        .map(|m| (m.endpoint, m.public_key))
                        .collect();
                    self.set_members(&members)?;
                    self.core.members_known();
                }
                MembershipEvent::EtcdLost(why) => {
                    membership.registry_up = false;
                    membership.registry_losses += 1;
                    tracing::warn!(
                        members = membership.members,
                        "etcd unreachable ({why}): keeping the last known members"
                    );
                }
                MembershipEvent::EtcdBack => {
                    membership.registry_up = true;
                    tracing::info!("etcd reachable again: this broker is registered again");
                }
            }
        }
    }
}
