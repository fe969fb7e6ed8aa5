//! Broker configuration: endpoints, limits, queue policy, timeouts and
//! security, with the embedded defaults `zbroker run` starts on.
//!
//! The same structure is read from a TOML file (`zbroker run --config`);
//! every field is optional there and falls back to its default. Durations
//! are written like `"10s"` or `"250ms"`.
//!
//! ```
//! let config = zbroker::config::Config::from_toml(r#"
//!     sub_bind = "tcp://127.0.0.1:6001"
//!     sub_timeout = "30s"
//!     [queue]
//!     policy = "drop-old"
//! "#).unwrap();
//! assert_eq!(config.sub_timeout.as_secs(), 30);
//! assert_eq!(config.limits.max_topic_len, 1024); // a default
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use zbroker_core::config::{
    BrokerConfig, Limits, MAX_LENGTH_SETTING, MAX_MESSAGE_SIZE_SETTING,
    MAX_PATTERN_SEGMENTS_SETTING, OverflowPolicy, QueueConfig,
};

/// Default publisher (PULL) endpoint.
pub const DEFAULT_PUB_BIND: &str = "tcp://127.0.0.1:5570";
/// Default subscriber (ROUTER) endpoint.
pub const DEFAULT_SUB_BIND: &str = "tcp://127.0.0.1:5571";

/// Everything the broker needs to start. `Config::default()` is the embedded
/// default configuration.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Endpoint the PULL socket binds for publishers.
    pub pub_bind: String,
    /// Endpoint the ROUTER socket binds for subscribers.
    pub sub_bind: String,
    /// Hard limits on what clients may ask for.
    pub limits: Limits,
    /// Per-subscriber pending queues for when libzmq's pipe is full.
    pub queue: QueueConfig,
    /// A subscriber not heard from for this long is forgotten.
    #[serde(with = "humantime_serde")]
    pub sub_timeout: Duration,
    /// ZMTP heartbeat interval on both sockets; a peer silent for
    /// `max(sub_timeout, 3 × this)` is disconnected, so dead TCP peers free
    /// their libzmq resources. Not shorter by default: libzmq 4.3 cancels
    /// a heartbeat timer by a linear search over all of its I/O thread's
    /// timers, so heartbeats cost about connections² / interval. At 10,000
    /// subscribers a 1 s interval saturated a core (BENCHMARKS.md, scale).
    #[serde(with = "humantime_serde")]
    pub zmtp_heartbeat: Duration,
    /// libzmq's queue from each publisher, in messages (`ZMQ_RCVHWM` on the
    /// PULL). Short on purpose: beyond it a publisher's PUSH waits, instead
    /// of the broker reading ahead of what its subscribers take (which, with
    /// a dropping overflow policy, only turns into drops).
    pub pub_hwm: i32,
    /// libzmq's queue to each subscriber, in messages (`ZMQ_SNDHWM` on the
    /// ROUTER); beyond it deliveries wait in the broker's own
    /// [`QueueConfig`] queue. libzmq 4.3 lets a full pipe be refilled only
    /// once its I/O thread has read half of it, and the other half must
    /// last until the broker's thread gets a core back: at 1,000 the I/O
    /// thread ran dry on a busy 2-core machine (BENCHMARKS.md). The
    /// comparison harness gives libzmq's proxy the same depths
    /// (`ZBROKER_LIBZMQ` in benches/compare/src/servers.rs): keep them in step.
    pub sub_hwm: i32,
    /// Bytes libzmq's pipe to each publisher may hold, on top of
    /// [`pub_hwm`](Self::pub_hwm)'s message count: without it, a pipe of
    /// 1,000 large messages could hold 1,000 × `max_message_size`. Counts
    /// each message part's size; a message, once begun, is always taken
    /// whole, so the bound may be passed by one message.
    pub pub_hwm_bytes: i64,
    /// Bytes libzmq's pipe to each subscriber may hold, on top of
    /// [`sub_hwm`](Self::sub_hwm)'s message count; beyond it deliveries
    /// wait in the broker's own byte-bounded queue ([`QueueConfig`]), where
    /// they count in `zbroker_queued_bytes`. Shared payloads count once per
    /// subscriber, as in the broker's queues. What the pipes hold now is
    /// `zbroker_libzmq_queued_bytes`.
    pub sub_hwm_bytes: i64,
    /// Bytes libzmq moves per system call where the messages flow: the
    /// PULL's `ZMQ_IN_BATCH_SIZE` (reads from each publisher) and the
    /// ROUTER's `ZMQ_OUT_BATCH_SIZE` (writes to each subscriber). libzmq's
    /// own default is 8 KiB; at 64 KiB, 1→1 with 1 KiB messages ran about
    /// 20 % faster on 30 % less broker CPU per message, and raising only one
    /// side did not help (BENCHMARKS.md). What it costs: each subscriber
    /// connection has an encoder buffer this large (its pages are touched
    /// only as far as batches fill it), and a received message of more than
    /// 33 bytes shares the buffer it was read into, so a message queued
    /// for a slow subscriber can keep that whole buffer alive: with libzmq's
    /// per-message bookkeeping about 2.2 times this many bytes. The harness
    /// gives libzmq's proxy this too (`ZBROKER_LIBZMQ`).
    pub io_batch: i32,
    /// libzmq I/O threads (`ZMQ_IO_THREADS`), which encode, decode and do
    /// the socket system calls; connections are spread over them. One is
    /// enough for a core or two; add one per few more cores the broker may
    /// use at high fan-out.
    pub io_threads: i32,
    /// On shutdown, how long to keep flushing queued messages to connected
    /// subscribers before exiting.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Prometheus metrics endpoint (`host:port`); off when `None`.
    pub metrics_bind: Option<String>,
    /// CURVE encryption, authentication and topic ACLs; off when `None`.
    pub curve: Option<CurveConfig>,
    /// Allow binding a non-loopback address without CURVE.
    pub insecure: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pub_bind: DEFAULT_PUB_BIND.to_string(),
            sub_bind: DEFAULT_SUB_BIND.to_string(),
            limits: Limits::default(),
            queue: QueueConfig::default(),
            sub_timeout: zbroker_core::config::DEFAULT_SUB_TIMEOUT,
            zmtp_heartbeat: Duration::from_secs(30),
            pub_hwm: 1000,
            sub_hwm: 3000,
            pub_hwm_bytes: 8 << 20,
            sub_hwm_bytes: 8 << 20,
            io_batch: 65536,
            io_threads: 1,
            linger: Duration::from_secs(2),
            metrics_bind: None,
            curve: None,
            insecure: false,
        }
    }
}

/// CURVE settings: the broker's own key and who may connect to which side.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurveConfig {
    /// File holding the broker's Z85 secret key (`zbroker keygen` writes it).
    pub secret_key_file: PathBuf,
    /// File listing the publishers' public keys and what they may publish.
    pub publisher_keys: PathBuf,
    /// File listing the subscribers' public keys and what they may
    /// subscribe to.
    pub subscriber_keys: PathBuf,
}

/// Why a configuration was refused.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read(PathBuf, std::io::Error),
    /// The TOML is invalid or has unknown fields.
    Parse(String),
    /// A value is out of range or inconsistent.
    Invalid(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Read(path, e) => write!(f, "cannot read {}: {e}", path.display()),
            ConfigError::Parse(e) => write!(f, "invalid configuration: {e}"),
            ConfigError::Invalid(e) => write!(f, "invalid configuration: {e}"),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The part of the configuration the core decides with.
    pub fn broker(&self) -> BrokerConfig {
        BrokerConfig {
            limits: self.limits.clone(),
            queue: self.queue.clone(),
            sub_timeout: self.sub_timeout,
        }
    }

    /// Parses a TOML configuration; absent fields keep their defaults.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    /// Reads and parses a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        Config::from_toml(&text)
    }

    /// Checks values that parse but cannot work, with a message that says
    /// what to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |what: String| Err(ConfigError::Invalid(what));
        let limits = &self.limits;
        for (name, value) in [
            ("max_topic_len", limits.max_topic_len),
            ("max_filter_len", limits.max_filter_len),
        ] {
            if !(1..=MAX_LENGTH_SETTING).contains(&value) {
                return invalid(format!(
                    "limits.{name} {value} is out of range; use 1 to {MAX_LENGTH_SETTING}"
                ));
            }
        }
        if !(1..=MAX_PATTERN_SEGMENTS_SETTING).contains(&limits.max_pattern_segments) {
            return invalid(format!(
                "limits.max_pattern_segments {} is out of range; use 1 to \
                 {MAX_PATTERN_SEGMENTS_SETTING}",
                limits.max_pattern_segments
            ));
        }
        if !(1..=MAX_MESSAGE_SIZE_SETTING).contains(&limits.max_message_size) {
            return invalid(format!(
                "limits.max_message_size {} is out of range; use 1 to {MAX_MESSAGE_SIZE_SETTING} \
                 bytes",
                limits.max_message_size
            ));
        }
        for (name, value) in [
            ("max_index_bytes", limits.max_index_bytes),
            ("max_filters_per_key", limits.max_filters_per_key),
            ("max_connections", limits.max_connections),
        ] {
            if value == 0 {
                return invalid(format!("limits.{name} must be at least 1"));
            }
        }
        if limits.max_connections > i32::MAX as usize {
            return invalid(format!(
                "limits.max_connections {} is out of range; use at most {}",
                limits.max_connections,
                i32::MAX
            ));
        }
        if self.limits.max_filters_per_subscriber == 0 || self.limits.max_subscribers == 0 {
            return invalid(
                "limits.max_subscribers and max_filters_per_subscriber must be at least 1".into(),
            );
        }
        if self.limits.max_commands_per_sec == 0 {
            return invalid("limits.max_commands_per_sec must be at least 1".into());
        }
        if self.sub_timeout < Duration::from_millis(100) {
            return invalid(format!(
                "sub_timeout {:?} is too short; use at least 100ms",
                self.sub_timeout
            ));
        }
        if !(1..=64).contains(&self.io_threads) {
            return invalid(format!(
                "io_threads {} is out of range; use 1 to 64",
                self.io_threads
            ));
        }
        for (name, hwm) in [("pub_hwm", self.pub_hwm), ("sub_hwm", self.sub_hwm)] {
            if hwm < 1 {
                // libzmq reads 0 as "no limit": memory bounded by nothing.
                return invalid(format!("{name} {hwm} must be at least 1"));
            }
        }
        for (name, bytes) in [
            ("pub_hwm_bytes", self.pub_hwm_bytes),
            ("sub_hwm_bytes", self.sub_hwm_bytes),
        ] {
            if bytes < 1 {
                return invalid(format!("{name} {bytes} must be at least 1"));
            }
        }
        if !(1024..=1 << 20).contains(&self.io_batch) {
            return invalid(format!(
                "io_batch {} is out of range; use 1024 to 1048576 bytes (libzmq's own \
                 default is 8192)",
                self.io_batch
            ));
        }
        if self.queue.max_messages == 0 || self.queue.max_bytes == 0 {
            return invalid("queue.max_messages and queue.max_bytes must be at least 1".into());
        }
        if self.curve.is_none() && !self.insecure {
            for (flag, endpoint) in [("pub-bind", &self.pub_bind), ("sub-bind", &self.sub_bind)] {
                if !is_local(endpoint) {
                    return invalid(format!(
                        "--{flag} {endpoint} is reachable from other machines, and without CURVE \
                         anyone there could publish or subscribe; configure [curve] keys, or pass \
                         --insecure if the network is trusted"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether an endpoint is reachable only from this machine: ipc, inproc, or
/// tcp on a loopback address.
pub fn is_local(endpoint: &str) -> bool {
    if endpoint.starts_with("ipc://") || endpoint.starts_with("inproc://") {
        return true;
    }
    let Some(address) = endpoint.strip_prefix("tcp://") else {
        return false;
    };
    let host = match address.rsplit_once(':') {
        Some((host, _port)) => host,
        None => address,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        for local in [
            "tcp://127.0.0.1:5570",
            "tcp://127.1.2.3:1",
            "tcp://localhost:1",
            "tcp://[::1]:1",
            "ipc:///tmp/x",
            "inproc://x",
        ] {
            assert!(is_local(local), "{local}");
        }
        for remote in [
            "tcp://*:5570",
            "tcp://0.0.0.0:1",
            "tcp://10.0.0.1:1",
            "tcp://eth0:1",
            "tcp://[::]:1",
            "pgm://x",
        ] {
            assert!(!is_local(remote), "{remote}");
        }
    }

    #[test]
    fn every_length_setting_has_an_upper_bound() {
        let refused = |edit: fn(&mut Config)| {
            let mut config = Config::default();
            edit(&mut config);
            match config.validate() {
                Err(ConfigError::Invalid(text)) => text,
                other => panic!("accepted: {other:?}"),
            }
        };
        assert!(refused(|c| c.limits.max_filter_len = 262_144).contains("max_filter_len"));
        assert!(refused(|c| c.limits.max_topic_len = 65_537).contains("65536"));
        assert!(refused(|c| c.limits.max_pattern_segments = 1025).contains("1024"));
        assert!(refused(|c| c.limits.max_pattern_segments = 0).contains("max_pattern_segments"));
        assert!(refused(|c| c.limits.max_message_size = -1).contains("max_message_size"));
        assert!(refused(|c| c.limits.max_message_size = 2 << 30).contains("max_message_size"));
        assert!(refused(|c| c.sub_hwm_bytes = 0).contains("sub_hwm_bytes"));
        assert!(refused(|c| c.limits.max_connections = 0).contains("max_connections"));
        let mut at_bounds = Config::default();
        at_bounds.limits.max_filter_len = MAX_LENGTH_SETTING;
        at_bounds.limits.max_topic_len = MAX_LENGTH_SETTING;
        at_bounds.limits.max_pattern_segments = MAX_PATTERN_SEGMENTS_SETTING;
        at_bounds.limits.max_message_size = MAX_MESSAGE_SIZE_SETTING;
        assert!(at_bounds.validate().is_ok());
    }

    #[test]
    fn refuses_public_bind_without_curve_unless_insecure() {
        let mut config = Config {
            pub_bind: "tcp://0.0.0.0:5570".into(),
            ..Config::default()
        };
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("--insecure") && err.contains("CURVE"), "{err}");
        config.insecure = true;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn toml_rejects_unknown_fields_and_parses_policies() {
        assert!(Config::from_toml("sub_timeot = \"1s\"").is_err());
        let config =
            Config::from_toml("[queue]\npolicy = \"disconnect\"\ndisconnect_after = \"1s\"")
                .unwrap();
        assert_eq!(config.queue.policy, OverflowPolicy::Disconnect);
        assert!(Config::from_toml("[queue]\npolicy = \"drop-some\"").is_err());
    }

    #[test]
    fn io_threads_must_be_1_to_64() {
        for (threads, ok) in [(0, false), (1, true), (64, true), (65, false)] {
            let config = Config::from_toml(&format!("io_threads = {threads}")).unwrap();
            assert_eq!(config.validate().is_ok(), ok, "io_threads = {threads}");
        }
    }

    #[test]
    fn io_batch_must_be_1_kib_to_1_mib() {
        for (bytes, ok) in [
            (0, false),
            (1023, false),
            (1024, true),
            (1 << 20, true),
            ((1 << 20) + 1, false),
        ] {
            let config = Config::from_toml(&format!("io_batch = {bytes}")).unwrap();
            assert_eq!(config.validate().is_ok(), ok, "io_batch = {bytes}");
        }
    }

    #[test]
    fn high_water_marks_must_be_positive() {
        // 0 is libzmq's "unlimited": refused, so libzmq's buffers stay bounded.
        for (field, value, ok) in [
            ("pub_hwm", 0, false),
            ("pub_hwm", 1, true),
            ("sub_hwm", -1, false),
            ("sub_hwm", 0, false),
            ("sub_hwm", 1, true),
        ] {
            let config = Config::from_toml(&format!("{field} = {value}")).unwrap();
            assert_eq!(config.validate().is_ok(), ok, "{field} = {value}");
        }
    }
}
