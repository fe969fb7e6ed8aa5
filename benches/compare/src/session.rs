//! A session: one system under test, one workload, connected publishers and
//! subscribers that stay up across all the runs of that pair.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::servers::Server;
use crate::shared::Shared;
use crate::workload::Workload;

/// One publisher connection. `topic` indexes the workload's warm-up topics
/// of this publisher; its measured topics are the first `pub_topics` of them.
pub trait PubSink: Send {
    fn send(&mut self, topic: usize, payload: &[u8]);
    /// Pushes out anything the client batches (Redis pipelines); called
    /// before every pacing sleep, so it must not wait for replies.
    fn flush(&mut self) {}
    /// End of a run's publishing: flush and settle (read pending replies).
    fn finish(&mut self) {
        self.flush();
    }
}

/// Subscriber threads or tasks; stopped on drop.
pub enum Subs {
    Threads(Arc<Shared>, Vec<JoinHandle<()>>),
    Tasks(
        Arc<Shared>,
        Option<tokio::runtime::Runtime>,
        Vec<tokio::task::JoinHandle<()>>,
    ),
}

impl Drop for Subs {
    fn drop(&mut self) {
        match self {
            Subs::Threads(shared, threads) => {
                shared.stop.store(true, Relaxed);
                for t in threads.drain(..) {
                    let _ = t.join();
                }
            }
            Subs::Tasks(shared, rt, tasks) => {
                shared.stop.store(true, Relaxed);
                for t in tasks.drain(..) {
                    t.abort();
                }
                if let Some(rt) = rt.take() {
                    rt.shutdown_timeout(Duration::from_secs(2));
                }
            }
        }
    }
}

pub struct Session {
    pub wl: Workload,
    #[allow(dead_code)]
    pub system: String,
    pub shared: Arc<Shared>,
    // Drop order: publishers, then subscribers, then the server.
    pub pubs: Vec<Box<dyn PubSink>>,
    pub subs: Option<Subs>,
    /// Subscriber connection setup time, seconds.
    pub setup_s: f64,
    pub server: Server,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.pubs.clear();
        drop(self.subs.take());
        self.server.stop();
    }
}

/// Waits until `shared.subscribed` reaches `n`.
pub fn wait_subscribed(shared: &Shared, n: usize, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    while shared.subscribed.load(Relaxed) < n {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {n} subscribers subscribed after {timeout:?}",
                shared.subscribed.load(Relaxed)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// A multi-thread runtime for the async clients: two workers, as many as
/// there are cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
