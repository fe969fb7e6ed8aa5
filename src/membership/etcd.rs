//! [`EtcdMembership`]: this broker's key in etcd, kept alive, and the other
//! brokers' keys, watched.
//!
//! One thread runs a current-thread tokio runtime. It loops over sessions:
//! a session connects, grants a lease, starts its keep-alive stream, puts
//! this broker's key under the lease, reads the prefix, then watches the
//! prefix from the revision it read, so no change falls between the read
//! and the watch. Each watched change (bursts coalesced) triggers a fresh
//! read of the prefix rather than patching a list from events: the list
//! reported is always what etcd holds, and a broker whose key was deleted
//! by hand puts it back.
//!
//! A session ends at the first failure: an RPC that errs or runs past its
//! timeout, a stream that errs or ends, a keep-alive or watch progress
//! request left unanswered past the RPC timeout, or a keep-alive answer
//! saying the lease is gone (it expired: the process was stopped, or etcd
//! heard no keep-alive for a TTL). The loop then reports
//! [`MembershipEvent::EtcdLost`] once per outage and starts a new session
//! after a backoff of 100 ms doubling to 2 s; the session that succeeds
//! reports [`MembershipEvent::EtcdBack`] and the member list. The previous
//! lease, if etcd still has it, is revoked once the key has moved to the new
//! one.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, WatchOptions};
use tokio::sync::oneshot;
use tokio::time::{Instant, MissedTickBehavior};

use super::{Member, MembershipError, MembershipEvent};

/// The lease TTL unless configured: a dead broker leaves the member lists
/// within about this long.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

const MIN_LEASE_TTL: Duration = Duration::from_secs(1);
const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a watched change waits for others before the prefix is read
/// again: brokers starting or stopping together cost one read and one
/// event, not one each.
const COALESCE: Duration = Duration::from_millis(50);
const MAX_RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the registry is and how this broker's key lives there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdSettings {
    /// etcd client URLs, `http://HOST:PORT` or `HOST:PORT`; the client
    /// balances over them. At least one. TLS (`https://`) is not supported.
    pub endpoints: Vec<String>,
    /// Brokers see only members registered under the same name. Non-empty,
    /// no `/`.
    pub cluster_name: String,
    /// How long etcd keeps this broker's key after the last keep-alive
    /// (rounded up to whole seconds; etcd may raise it to its own minimum).
    /// Keep-alives go every third of it, and every RPC times out after half
    /// of it (2 s at most).
    pub lease_ttl: Duration,
}

impl EtcdSettings {
    /// Settings with the default lease TTL ([`DEFAULT_LEASE_TTL`]).
    pub fn new(endpoints: Vec<String>, cluster_name: impl Into<String>) -> EtcdSettings {
        EtcdSettings {
            endpoints,
            cluster_name: cluster_name.into(),
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }

    fn validate(&self) -> Result<(), MembershipError> {
        if self.endpoints.is_empty() {
            return Err(MembershipError::NoEndpoints);
        }
        for endpoint in &self.endpoints {
            let reason = if endpoint.is_empty() {
                "it is empty"
            } else if endpoint.chars().any(char::is_whitespace) {
                "it contains whitespace"
            } else if endpoint.starts_with("https://") {
                "TLS is not supported"
            } else {
                continue;
            };
            return Err(MembershipError::Endpoint {
                endpoint: endpoint.clone(),
                reason: reason.into(),
            });
        }
        if self.cluster_name.is_empty() || self.cluster_name.contains('/') {
            return Err(MembershipError::ClusterName(self.cluster_name.clone()));
        }
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&self.lease_ttl) {
            return Err(MembershipError::LeaseTtl(self.lease_ttl));
        }
        Ok(())
    }
}

/// This broker's membership, kept by a thread of its own until
/// [`EtcdMembership::stop`] (or drop, which does the same).
pub struct EtcdMembership {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl EtcdMembership {
    /// Validates the settings and `me`, then starts the membership thread,
    /// which registers `me` and reports to `events`, calling `waker.wake()`
    /// after each event.
    ///
    /// Does not wait for etcd: when etcd is down, this returns `Ok` all the
    /// same and the thread reports [`MembershipEvent::EtcdLost`] within
    /// about one RPC timeout, then keeps retrying. `Err` means the settings
    /// cannot work (its message says what to change) or the thread could
    /// not be created.
    ///
    /// A closed `events` receiver does not stop the thread: the broker stays
    /// registered, so peers still find it, until `stop`.
    pub fn start(
        settings: EtcdSettings,
        me: Member,
        events: Sender<MembershipEvent>,
        waker: Arc<mio::Waker>,
    ) -> Result<EtcdMembership, MembershipError> {
        settings.validate()?;
        me.validate().map_err(MembershipError::Member)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(MembershipError::Thread)?;
        // Connecting only parses the URL: the channel connects lazily, on
        // the first request. So this checks each endpoint without waiting
        // for etcd, and names the one at fault.
        for endpoint in &settings.endpoints {
            if let Err(e) = runtime.block_on(Client::connect([endpoint], None)) {
                return Err(MembershipError::Endpoint {
                    endpoint: endpoint.clone(),
                    reason: e.to_string(),
                });
            }
        }
        let worker = Worker::new(settings, me, Reporter::new(events, waker));
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("etcd-membership".into())
            .spawn(move || runtime.block_on(worker.run(stopped)))
            .map_err(MembershipError::Thread)?;
        Ok(EtcdMembership {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread and revokes the lease, so that peers forget this
    /// broker at once rather than after the TTL. Best effort and bounded:
    /// returns within about one RPC timeout (half the TTL, 2 s at most)
    /// even when etcd is unreachable; the key then expires with its lease.
    pub fn stop(self) {
        // Drop does the work, so that a dropped membership also deregisters.
        drop(self);
    }
}

impl Drop for EtcdMembership {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the etcd membership thread panicked");
        }
    }
}

/// Why a session ended.
type Lost = String;

/// Sends events, once each and only when they say something new, and logs
/// what they mean.
struct Reporter {
    events: Sender<MembershipEvent>,
    waker: Arc<mio::Waker>,
    link: Link,
    /// The other members as last reported.
    known: Vec<Member>,
    /// Whether the next list is reported even if unchanged: after a
    /// (re)connection the event loop is owed one.
    owed: bool,
    receiver_gone: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    Starting,
    Up,
    Lost,
}

impl Reporter {
    fn new(events: Sender<MembershipEvent>, waker: Arc<mio::Waker>) -> Reporter {
        Reporter {
            events,
            waker,
            link: Link::Starting,
            known: Vec::new(),
            owed: true,
            receiver_gone: false,
        }
    }

    fn send(&mut self, event: MembershipEvent) {
        if self.events.send(event).is_err() {
            if !self.receiver_gone {
                tracing::debug!("nobody receives membership events any more");
                self.receiver_gone = true;
            }
            return;
        }
        if let Err(e) = self.waker.wake() {
            tracing::warn!(error = %e, "cannot wake the event loop for a membership event");
        }
    }

    fn lost(&mut self, why: Lost) {
        if self.link == Link::Lost {
            tracing::debug!(reason = %why, "etcd still unreachable");
            return;
        }
        tracing::warn!(
            reason = %why,
            members = self.known.len(),
            "etcd lost: keeping the last known members and retrying"
        );
        self.link = Link::Lost;
        self.send(MembershipEvent::EtcdLost(why));
    }

    fn up(&mut self, key: &str) {
        if self.link == Link::Lost {
            tracing::info!(%key, "etcd is back; registered again");
            self.send(MembershipEvent::EtcdBack);
        } else {
            tracing::info!(%key, "registered in etcd");
        }
        self.link = Link::Up;
        self.owed = true;
    }

    fn members(&mut self, members: Vec<Member>) {
        if !self.owed && members == self.known {
            return;
        }
        for m in &members {
            match self.known.iter().find(|k| k.id == m.id) {
                None => tracing::info!(
                    member = %m.id, endpoint = %m.endpoint, "a broker joined the cluster"
                ),
                Some(k) if k != m => tracing::info!(
                    member = %m.id, endpoint = %m.endpoint, "a broker changed its registration"
                ),
                Some(_) => {}
            }
        }
        for k in &self.known {
            if !members.iter().any(|m| m.id == k.id) {
                tracing::info!(member = %k.id, "a broker left the cluster");
            }
        }
        self.owed = false;
        self.known = members.clone();
        self.send(MembershipEvent::Members(members));
    }
}

/// The membership thread's state across sessions.
struct Worker {
    endpoints: Vec<String>,
    prefix: String,
    key: String,
    value: String,
    ttl_seconds: i64,
    rpc_timeout: Duration,
    reporter: Reporter,
    /// The client and lease of the latest session, for revoking the lease.
    lease: Option<(Client, i64)>,
}

impl Worker {
    fn new(settings: EtcdSettings, me: Member, reporter: Reporter) -> Worker {
        let prefix = format!("/zbroker/{}/members/", settings.cluster_name);
        let ttl_seconds = settings.lease_ttl.as_secs_f64().ceil() as i64;
        Worker {
            endpoints: settings.endpoints,
            key: format!("{prefix}{}", me.id),
            prefix,
            value: me.value(),
            ttl_seconds,
            rpc_timeout: (settings.lease_ttl / 2).min(MAX_RPC_TIMEOUT),
            reporter,
            lease: None,
        }
    }

    async fn run(mut self, mut stopped: oneshot::Receiver<()>) {
        let mut backoff = BACKOFF_FIRST;
        loop {
            // Either a stop or a dropped handle ends the thread.
            let lost = tokio::select! {
                _ = &mut stopped => break,
                lost = self.session() => match lost {
                    Err(lost) => lost,
                },
            };
            if self.reporter.link == Link::Up {
                backoff = BACKOFF_FIRST;
            }
            self.reporter.lost(lost);
            tokio::select! {
                _ = &mut stopped => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        self.revoke().await;
    }

    /// Revokes the current lease, bounded by the RPC timeout.
    async fn revoke(&mut self) {
        let Some((mut client, lease)) = self.lease.take() else {
            return;
        };
        match rpc(
            self.rpc_timeout,
            "revoke the lease",
            client.lease_revoke(lease),
        )
        .await
        {
            Ok(_) => tracing::info!(key = %self.key, "left the cluster: lease revoked"),
            Err(e) => tracing::warn!(
                key = %self.key,
                error = %e,
                "could not revoke the lease: peers forget this broker when it expires"
            ),
        }
    }

    /// One connection's life: returns only when etcd is lost.
    async fn session(&mut self) -> Result<Infallible, Lost> {
        let timeout = self.rpc_timeout;
        let options = ConnectOptions::new().with_connect_timeout(timeout);
        let mut client = rpc(
            timeout,
            "connect",
            Client::connect(&self.endpoints, Some(options)),
        )
        .await?;

        let granted = rpc(
            timeout,
            "grant a lease",
            client.lease_grant(self.ttl_seconds, None),
        )
        .await?;
        let lease = granted.id();
        let previous = self.lease.replace((client.clone(), lease));
        let (mut keeper, mut answers) = rpc(
            timeout,
            "keep the lease alive",
            client.lease_keep_alive(lease),
        )
        .await?;
        self.register(&mut client, lease).await?;
        if let Some((_, old)) = previous {
            // The key has moved to the new lease; an old lease that etcd
            // still keeps would only linger until its TTL.
            if let Err(e) = rpc(timeout, "revoke the old lease", client.lease_revoke(old)).await {
                tracing::debug!(error = %e, "the previous lease is already gone");
            }
        }
        let (members, _, revision) = self.read(&mut client).await?;
        let watch_options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut watch = rpc(
            timeout,
            "watch the members",
            client.watch(self.prefix.as_str(), Some(watch_options)),
        )
        .await?;
        self.reporter.up(&self.key);
        self.reporter.members(members);

        let ttl = granted.ttl().clamp(1, self.ttl_seconds);
        let period = Duration::from_secs(ttl as u64) / 3;
        let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Deadlines for the answers to the keep-alive and the watch progress
        // request last sent, and for reading the prefix after a change.
        let mut lease_due: Option<Instant> = None;
        let mut watch_due: Option<Instant> = None;
        let mut read_at: Option<Instant> = None;
        loop {
            // Answers first: after a long stop, every timer has fired and
            // an answer that is there must win over its deadline.
            tokio::select! {
                biased;
                answer = answers.message() => match answer {
                    Ok(Some(answer)) if answer.ttl() > 0 => lease_due = None,
                    Ok(Some(_)) => {
                        return Err(format!("the lease expired (no keep-alive reached etcd \
                                            within {ttl} s)"));
                    }
                    Ok(None) => return Err("etcd closed the keep-alive stream".into()),
                    Err(e) => return Err(format!("keep-alive stream: {e}")),
                },
                message = watch.message() => match message {
                    Ok(Some(message)) => {
                        watch_due = None;
                        if message.canceled() {
                            return Err(format!(
                                "etcd cancelled the watch: {}",
                                message.cancel_reason()
                            ));
                        }
                        if !message.events().is_empty() && read_at.is_none() {
                            read_at = Some(Instant::now() + COALESCE);
                        }
                    }
                    Ok(None) => return Err("etcd closed the watch stream".into()),
                    Err(e) => return Err(format!("watch stream: {e}")),
                },
                _ = sleep_until(read_at), if read_at.is_some() => {
                    read_at = None;
                    let (members, mine, _) = self.read(&mut client).await?;
                    match mine {
                        Mine::Present => {}
                        Mine::Absent => {
                            tracing::warn!(key = %self.key, "this broker's key vanished; putting it back");
                            self.register(&mut client, lease).await?;
                        }
                        // Two brokers with one id: fighting over the key would
                        // make both churn forever; say so and leave it.
                        Mine::Other(value) => tracing::warn!(
                            key = %self.key,
                            theirs = %value,
                            "another broker registered this broker's id: give each broker its own id"
                        ),
                    }
                    self.reporter.members(members);
                }
                _ = sleep_until(lease_due), if lease_due.is_some() => {
                    return Err(format!("etcd did not answer a keep-alive within {timeout:?}"));
                }
                _ = sleep_until(watch_due), if watch_due.is_some() => {
                    return Err(format!("etcd did not answer a watch progress request within {timeout:?}"));
                }
                _ = ticks.tick() => {
                    rpc(timeout, "send a keep-alive", keeper.keep_alive()).await?;
                    // The watch is on a stream of its own, possibly another
                    // connection: a progress request proves it still flows.
                    rpc(timeout, "request watch progress", watch.request_progress()).await?;
                    let due = Instant::now() + timeout;
                    lease_due.get_or_insert(due);
                    watch_due.get_or_insert(due);
                }
            }
        }
    }

    /// Puts this broker's key under `lease`.
    async fn register(&self, client: &mut Client, lease: i64) -> Result<(), Lost> {
        let options = PutOptions::new().with_lease(lease);
        rpc(
            self.rpc_timeout,
            "register",
            client.put(self.key.as_str(), self.value.as_str(), Some(options)),
        )
        .await?;
        Ok(())
    }

    /// Reads the prefix: the other members, sorted by id, what holds this
    /// broker's key, and the revision read.
    async fn read(&self, client: &mut Client) -> Result<(Vec<Member>, Mine, i64), Lost> {
        let response = rpc(
            self.rpc_timeout,
            "read the members",
            client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let revision = response
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| "etcd sent a read without a header".to_string())?;
        let mut members = Vec::new();
        let mut mine = Mine::Absent;
        for kv in response.kvs() {
            if kv.key() == self.key.as_bytes() {
                mine = if kv.value() == self.value.as_bytes() {
                    Mine::Present
                } else {
                    Mine::Other(String::from_utf8_lossy(kv.value()).into_owned())
                };
                continue;
            }
            let key = String::from_utf8_lossy(kv.key());
            let id = kv
                .key()
                .strip_prefix(self.prefix.as_bytes())
                .ok_or("not under the prefix".to_string())
                .and_then(|id| {
                    std::str::from_utf8(id).map_err(|e| format!("the id is not UTF-8: {e}"))
                });
            match id.and_then(|id| Member::parse(id, kv.value())) {
                Ok(member) => members.push(member),
                Err(reason) => tracing::warn!(
                    %key,
                    value = %String::from_utf8_lossy(kv.value()),
                    %reason,
                    "skipping an unreadable member registration"
                ),
            }
        }
        members.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((members, mine, revision))
    }
}

/// What holds this broker's key.
enum Mine {
    Present,
    Absent,
    /// Another value: another broker with the same id.
    Other(String),
}

/// `call`, failed with a reason naming `what` if it errs or takes longer
/// than `limit`.
async fn rpc<T>(
    limit: Duration,
    what: &str,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, Lost> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {limit:?}")),
    }
}

/// Sleeps until `at`; never resolves for `None` (its branch is disabled
/// then anyway).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
