//! The broker's I/O: a [`Server`] binds a PULL socket for publishers and a
//! ROUTER socket for subscribers, and runs one thread's event loop that
//! moves frames between them and the sans-IO [`Broker`] core.
//!
//! One module per concept, each small enough to read whole:
//! - `socket`: the two sockets, their options and their binding;
//! - `security`: [`check`], and CURVE keys and key lists;
//! - `monitor`: libzmq's socket monitor, counting connections and refusals;
//! - `event_loop`: the `mio::Poll` loop and why it trusts no single edge;
//! - `transport`: [`RouterTransport`], the core's way out;
//! - `stats`: [`StatsHandle`], the counters other threads read;
//! - `shutdown`: [`Stopper`], signals, and the linger flush;
//! - `notify`: sd_notify(3) readiness and stopping, for systemd;
//! - `error`: [`ServerError`].

mod cluster;
mod error;
mod event_loop;
mod monitor;
mod notify;
mod security;
mod shutdown;
mod socket;
mod stats;
mod transport;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Poll;

use crate::auth::ZapHandler;
use crate::broker::Broker;
use crate::config::Config;
use crate::frame::Frame;
use crate::metrics::{Exporter, Snapshot};
use cluster::{ClusterSockets, Membership};
use error::zmq_call;
use monitor::Watch;

pub use error::ServerError;
pub use security::{Security, check};
pub use shutdown::Stopper;
pub use stats::StatsHandle;
pub use transport::RouterTransport;

/// The running broker: two bound sockets, a poller and the core.
pub struct Server {
    // Field order is drop order: sockets must close before the context.
    pull: zmq::Socket,
    router: zmq::Socket,
    /// The XPUB front for plain SUB sockets, with `--xpub-bind`.
    xpub: Option<zmq::Socket>,
    /// The cluster endpoint and peer links, with `--cluster-bind`.
    cluster: Option<ClusterSockets>,
    context: zmq::Context,
    poll: Poll,
    core: Broker<Frame>,
    pub_endpoints: Vec<String>,
    sub_endpoints: Vec<String>,
    xpub_endpoints: Vec<String>,
    /// How long to keep flushing queues on shutdown.
    linger: Duration,
    stopper: Stopper,
    stats: StatsHandle,
    zap: Option<ZapHandler>,
    publisher_watch: Watch,
    subscriber_watch: Watch,
    xpub_watch: Option<Watch>,
    _exporter: Option<Exporter>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    /// Receive buffers reused for every message: topic and payload.
    publish_frames: [Frame; 2],
    /// Routing id, then up to three command frames.
    command_frames: [Frame; 4],
    /// Swallows the extra parts of a malformed message.
    overflow_frame: Frame,
    /// A peer's routing id and its link message (cluster ROUTER).
    peer_frames: [Frame; 2],
    /// A link message: header, then a FORWARD's topic and payload.
    link_frames: [Frame; 3],
    /// The configuration, for the sockets of links added later.
    config: Config,
    /// CURVE: the broker's keys and the ACL in force, when CURVE is on.
    security: Option<Security>,
    /// Key-list reloads done, and refused (the lists did not load).
    key_reloads: u64,
    key_reload_failures: u64,
    /// etcd membership, with `--cluster-etcd`: the thread keeping this
    /// broker registered and what it reports.
    membership: Option<Membership>,
    /// The sender's CURVE key, copied out of the frame it came with so the
    /// frames can be lent mutably; reused, so it does not allocate.
    user_id: String,
    /// CURVE is on: only then do messages carry a User-Id worth reading
    /// (the lookup is a measurable share of a publish's cost).
    authenticated: bool,
    /// libzmq's `ZMQ_ZBROKER_OUT_BYTES` on the ROUTER as of the last tick.
    libzmq_queued_bytes: u64,
    /// libzmq's `ZMQ_ZBROKER_DROPPED` on the XPUB as of the last tick.
    xpub_sub_drops: u64,
    /// Report to systemd (`notify`): set by [`Server::notify_systemd`].
    systemd: bool,
}

impl Server {
    /// Creates both sockets, sets their options and binds them. The broker
    /// does nothing until [`Server::run`].
    pub fn bind(config: Config) -> Result<Server, ServerError> {
        let security = check(&config)?;
        socket::raise_open_file_limit();
        let context = zmq::Context::new();
        zmq_call(
            "set ZMQ_IO_THREADS",
            context.set_io_threads(config.io_threads),
        )?;
        // Before any socket binds: without a ZAP handler, CURVE admits anyone.
        let zap = match &security {
            Some(s) => {
                Some(ZapHandler::bind(&context, Arc::clone(&s.acl)).map_err(ServerError::Auth)?)
            }
            None => None,
        };
        let pull = socket::publishers(&context, &config, security.as_ref())?;
        let pub_endpoints = socket::bind_all(&pull, "publisher", &config.pub_bind)?;
        let router = socket::subscribers(&context, &config, security.as_ref())?;
        let publisher_watch = Watch::attach(&context, &pull, "publishers")?;
        let subscriber_watch = Watch::attach(&context, &router, "subscribers")?;
        let sub_endpoints = socket::bind_all(&router, "subscriber", &config.sub_bind)?;
        let (xpub, xpub_watch, xpub_endpoints) = if config.xpub_bind.is_empty() {
            (None, None, Vec::new())
        } else {
            let xpub = socket::xpub_front(&context, &config)?;
            let watch = Watch::attach(&context, &xpub, "SUB sockets")?;
            let endpoints = socket::bind_all(&xpub, "XPUB front", &config.xpub_bind)?;
            (Some(xpub), Some(watch), endpoints)
        };

        let (poll, waker) = event_loop::poller(
            &pull,
            &router,
            xpub.as_ref(),
            &publisher_watch,
            &subscriber_watch,
            xpub_watch.as_ref(),
            zap.as_ref(),
        )?;
        let stats = StatsHandle::default();
        let exporter = match &config.metrics_bind {
            Some(address) => {
                let source = stats.clone();
                let exporter = Exporter::start(address, move || source.snapshot())
                    .map_err(|e| ServerError::Io("bind the metrics endpoint", e))?;
                tracing::info!(endpoint = %format!("http://{}/metrics", exporter.address()), "serving metrics");
                Some(exporter)
            }
            None => None,
        };
        let zap_on = zap.is_some();
        let linger = config.linger;
        let mut core = Broker::new(config.broker(), Instant::now());
        match &security {
            Some(s) => {
                tracing::info!(
                    public_key = %s.keys.public,
                    publishers = s.acl.publishers.len(),
                    subscribers = s.acl.subscribers.len(),
                    "CURVE on: only listed keys are admitted"
                );
                core.set_acl(Arc::clone(&s.acl));
            }
            None => tracing::info!("CURVE off: plaintext, loopback-only unless --insecure"),
        }

        if xpub.is_some() {
            core.open_xpub_front();
        }
        let cluster = match &config.cluster.bind {
            Some(bind) => Some(cluster::start(
                &context,
                &config,
                bind,
                &poll,
                &mut core,
                security.as_ref(),
            )?),
            None => None,
        };
        for endpoint in &pub_endpoints {
            tracing::info!(%endpoint, "publishers connect a PUSH socket to");
        }
        for endpoint in &sub_endpoints {
            tracing::info!(%endpoint, "subscribers connect a DEALER socket to");
        }
        for endpoint in &xpub_endpoints {
            tracing::info!(%endpoint, "plain SUB sockets connect to");
        }
        let static_peers: Vec<(String, Option<String>)> = config
            .cluster
            .peers
            .iter()
            .map(|endpoint| (endpoint.clone(), None))
            .collect();
        let stopper = Stopper::new(waker);
        let membership = match (&cluster, config.cluster.etcd.is_empty()) {
            (Some(sockets), false) => Some(Membership::start(
                &config,
                sockets,
                &core,
                &stopper,
                security.as_ref(),
            )?),
            _ => None,
        };
        let mut server = Server {
            linger,
            pull,
            router,
            xpub,
            cluster,
            context,
            poll,
            core,
            pub_endpoints,
            sub_endpoints,
            xpub_endpoints,
            stopper,
            membership,
            key_reloads: 0,
            key_reload_failures: 0,
            security,
            stats,
            zap,
            publisher_watch,
            subscriber_watch,
            xpub_watch,
            _exporter: exporter,
            signals: None,
            publish_frames: Default::default(),
            command_frames: Default::default(),
            overflow_frame: Frame::new(),
            peer_frames: Default::default(),
            link_frames: Default::default(),
            config,
            user_id: String::new(),
            authenticated: zap_on,
            libzmq_queued_bytes: 0,
            xpub_sub_drops: 0,
            systemd: false,
        };
        server.set_members(&static_peers)?;
        if server.membership.is_none() {
            server.core.members_known();
        }
        Ok(server)
    }

    /// The first endpoint publishers connect to, as bound (port resolved).
    pub fn pub_endpoint(&self) -> &str {
        &self.pub_endpoints[0]
    }

    /// The first endpoint subscribers connect to, as bound (port resolved).
    pub fn sub_endpoint(&self) -> &str {
        &self.sub_endpoints[0]
    }

    /// Every endpoint publishers can connect to, as bound, in the order
    /// configured.
    pub fn pub_endpoints(&self) -> &[String] {
        &self.pub_endpoints
    }

    /// Every endpoint subscribers can connect to, as bound.
    pub fn sub_endpoints(&self) -> &[String] {
        &self.sub_endpoints
    }

    /// The cluster endpoint as bound, when clustered.
    pub fn cluster_endpoint(&self) -> Option<&str> {
        self.cluster.as_ref().map(|c| c.endpoint.as_str())
    }

    /// The XPUB front's endpoints, as bound; empty when it is off.
    pub fn xpub_endpoints(&self) -> &[String] {
        &self.xpub_endpoints
    }

    /// The server's ZeroMQ context: `inproc://` endpoints are only reachable
    /// from sockets of the same context (in-process benches and tests).
    pub fn context(&self) -> zmq::Context {
        self.context.clone()
    }

    /// A handle that stops [`Server::run`] from another thread.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// A handle on the broker's counters, readable from any thread.
    pub fn stats(&self) -> StatsHandle {
        self.stats.clone()
    }

    /// Makes SIGINT and SIGTERM stop the server like [`Stopper::stop`].
    pub fn stop_on_signals(&mut self) -> Result<(), ServerError> {
        self.signals = Some(shutdown::catch_signals(&self.poll)?);
        Ok(())
    }

    /// Runs the loop until stopped, then flushes queues for up to the
    /// configured linger. Returns the final counters.
    pub fn run(mut self) -> Result<Snapshot, ServerError> {
        // Every endpoint is bound (by `bind`): tell systemd, if asked to.
        self.notify_ready();
        self.serve()?;
        self.notify_stopping();
        self.shut_down()
    }
}
