//! Stopping: the [`Stopper`] handle, SIGINT and SIGTERM, and the linger
//! during which the broker keeps flushing to subscribers before it closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Waker};
use signal_hook_mio::v1_0::Signals;

use super::Server;
use super::error::{ServerError, zmq_call};
use super::event_loop::{SIGNALS, has_input};
use super::transport::RouterTransport;
use crate::metrics::Snapshot;

/// Stops a running [`Server`] from any thread.
#[derive(Clone, Debug)]
pub struct Stopper {
    requested: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl Stopper {
    /// A stopper that wakes the loop's poller through `waker`.
    pub(crate) fn new(waker: Waker) -> Stopper {
        Stopper {
            requested: Arc::new(AtomicBool::new(false)),
            waker: Arc::new(waker),
        }
    }

    /// Asks the server to stop: it stops reading publishers, flushes queued
    /// messages for up to the configured linger and returns from `run`.
    pub fn stop(&self) {
        self.requested.store(true, Ordering::Release);
        // A failed wake only delays the stop until the next timer.
        let _ = self.waker.wake();
    }

    /// The waker of the loop's poller, for other threads that report to
    /// the loop (etcd membership).
    pub(crate) fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Asks for a stop from the loop's own thread, which needs no waking.
    fn request(&self) {
        self.requested.store(true, Ordering::Release);
    }

    /// Whether a stop has been asked for.
    pub(crate) fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }
}

/// SIGINT and SIGTERM (stop) and SIGHUP (reload the key lists),
/// delivered to `poll` as readiness of [`SIGNALS`] instead of interrupting
/// whatever the loop is doing.
pub(crate) fn catch_signals(poll: &Poll) -> Result<Signals, ServerError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| ServerError::Io("install signal handlers", e))?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)
        .map_err(|e| ServerError::Io("register signal handlers", e))?;
    Ok(signals)
}

impl Server {
    /// Signals arrived: SIGHUP reloads the key lists; SIGINT and SIGTERM
    /// stop like [`Stopper::stop`]. Each is logged.
    pub(crate) fn on_signals(&mut self) {
        let pending: Vec<i32> = match self.signals.as_mut() {
            Some(signals) => signals.pending().collect(),
            None => return,
        };
        for signal in pending {
            if signal == signal_hook::consts::SIGHUP {
                tracing::info!(signal, "reloading the key lists on signal");
                // systemd's reload waits for READY=1, sent whatever the
                // outcome (a refused reload leaves the old lists serving).
                self.notify_reloading();
                self.reload_keys();
                self.notify_ready();
            } else {
                tracing::info!(signal, "stopping on signal");
                self.stopper.request();
            }
        }
    }

    /// Stops reading publishers and keeps serving subscribers for up to the
    /// linger, then logs the final counters.
    ///
    /// Emptying the broker's queues is not enough: what libzmq has sent may
    /// still sit in kernel buffers on the way to a subscriber that reads
    /// slowly, and libzmq 4.3 discards it on the receiving side if the
    /// connection closes while that subscriber's input is stalled (an ipc
    /// hang-up is treated as an I/O error; on tcp, closing with unread input
    /// sends RST). So the broker keeps the connections open, answering
    /// commands and flushing, until the linger ends or no subscriber
    /// connection is left.
    pub(crate) fn shut_down(mut self) -> Result<Snapshot, ServerError> {
        let deadline = Instant::now() + self.linger;
        // Peers forget this broker at once rather than after the lease.
        if let Some(membership) = self.membership.as_mut() {
            membership.stop();
        }
        // Closing PULL refuses new messages; publishers' PUSH sockets keep
        // theirs queued for the next broker.
        drop(std::mem::replace(
            &mut self.pull,
            zmq_call(
                "create a placeholder socket",
                self.context.socket(zmq::PULL),
            )?,
        ));
        let mut events = Events::with_capacity(8);
        loop {
            let now = Instant::now();
            self.read_subscribers(now)?;
            self.core.flush(&mut RouterTransport::full(
                &mut self.router,
                self.xpub.as_mut(),
                self.cluster.as_mut(),
            ));
            self.watch_connections();
            if now >= deadline || self.subscriber_watch.open == 0 {
                break;
            }
            // Reading ZMQ_EVENTS makes libzmq process its command queue,
            // which re-opens pipes that subscribers have drained.
            let wait = if has_input(&self.router)? {
                Duration::ZERO
            } else {
                Duration::from_millis(5).min(deadline - now)
            };
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ServerError::Io("wait for events", e)),
            }
        }
        let snapshot = self.snapshot();
        self.stats.publish(snapshot.clone());
        tracing::info!(
            published = snapshot.counters.published,
            routed = snapshot.counters.routed,
            delivered = snapshot.counters.delivered,
            dropped_queue_full = snapshot.counters.dropped_queue_full,
            dropped_at_exit = snapshot.queued_messages,
            malformed =
                snapshot.counters.malformed_publishes + snapshot.counters.malformed_commands,
            subscribers = snapshot.subscribers,
            "broker stopped"
        );
        Ok(snapshot)
    }
}
