//! Telling the service manager what the broker is doing, through
//! sd_notify(3): `READY=1` once every socket is bound, `RELOADING=1` while a
//! reload runs, `STOPPING=1` when it starts to shut down, each with a
//! `STATUS=` line that `systemctl status` shows.
//!
//! systemd's `Type=notify` holds back the units ordered after the broker
//! until `READY=1`, so they find its endpoints listening: `READY=1` is sent
//! by [`Server::run`], after [`Server::bind`] has bound every endpoint (a
//! bind that fails returns an error and nothing is sent). The kernel queues
//! connections to a bound socket until the loop reads them, so "bound" is
//! "accepting".
//!
//! Only a server asked to ([`Server::notify_systemd`], which `zbroker run`
//! does) sends anything, and then only when `NOTIFY_SOCKET` is set: the
//! library embedded in another program, or an in-process test broker, must
//! not speak to a service manager for a process it does not own.

use sd_notify::NotifyState;

use super::Server;

impl Server {
    /// Makes this server report to the service manager named by
    /// `NOTIFY_SOCKET` (nothing happens without it): `READY=1` when
    /// [`Server::run`] starts serving, `STOPPING=1` when it starts to shut
    /// down. A notification that cannot be sent is logged, never fatal.
    pub fn notify_systemd(&mut self) {
        self.systemd = true;
    }

    /// `READY=1`, with the endpoints as `STATUS=`. Sent when serving
    /// starts, and to be sent again after a reload, whether it succeeded or
    /// was refused, to end the `RELOADING=1` state.
    pub(crate) fn notify_ready(&self) {
        if self.systemd {
            let status = self.serving_status();
            send(
                &[NotifyState::Ready, NotifyState::Status(&status)],
                "READY=1",
            );
        }
    }

    /// `RELOADING=1`: call it before re-reading the configuration, and
    /// [`Server::notify_ready`] after. It carries `MONOTONIC_USEC=`, which
    /// `Type=notify-reload` requires and `Type=notify` ignores.
    pub(crate) fn notify_reloading(&self) {
        if !self.systemd {
            return;
        }
        let status = NotifyState::Status("reloading the key lists");
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now, status], "RELOADING=1"),
            Err(e) => {
                tracing::debug!(error = %e, "no monotonic clock for MONOTONIC_USEC");
                send(&[NotifyState::Reloading, status], "RELOADING=1");
            }
        }
    }

    /// `STOPPING=1`: the broker has stopped reading publishers and flushes
    /// to subscribers for up to the linger before it exits.
    pub(crate) fn notify_stopping(&self) {
        if self.systemd {
            let status = format!(
                "stopping: flushing to subscribers for up to {}",
                humantime::format_duration(self.linger)
            );
            send(
                &[NotifyState::Stopping, NotifyState::Status(&status)],
                "STOPPING=1",
            );
        }
    }

    /// `serving; publishers at E1, E2; subscribers at E3; ...`: every
    /// endpoint as bound (ports resolved), by what connects to it.
    fn serving_status(&self) -> String {
        let mut parts = vec![
            "serving".to_string(),
            format!("publishers at {}", self.pub_endpoints.join(", ")),
            format!("subscribers at {}", self.sub_endpoints.join(", ")),
        ];
        if !self.xpub_endpoints.is_empty() {
            parts.push(format!("SUB sockets at {}", self.xpub_endpoints.join(", ")));
        }
        if let Some(cluster) = &self.cluster {
            parts.push(format!("peers at {}", cluster.endpoint));
        }
        if let Some(exporter) = &self._exporter {
            parts.push(format!("metrics at http://{}/metrics", exporter.address()));
        }
        parts.join("; ")
    }
}

/// Sends `states` if `NOTIFY_SOCKET` is set. A failure is only logged: the
/// broker serves either way, and a service manager that never hears
/// `READY=1` acts on its own timeout.
fn send(states: &[NotifyState], what: &str) {
    match sd_notify::notify(states) {
        Ok(()) => {
            if std::env::var_os("NOTIFY_SOCKET").is_some() {
                tracing::debug!(what, "told the service manager");
            }
        }
        Err(e) => tracing::warn!(error = %e, what, "could not notify the service manager"),
    }
}
