//! Broker configuration: endpoints, limits, queue policy, timeouts and
//! security, with the embedded defaults `zbroker run` starts on.
//!
//! Each setting is defined once, as a field of [`Config`] (or of
//! [`Limits`], [`QueueConfig`] or [`CurveConfig`], which it holds): the
//! field's name is its key in a TOML file (serde), the field is also a
//! `zbroker run` flag (clap), its doc comment is the flag's help, and
//! [`ConfigArgs`] gives every flag an environment variable and shows its
//! default, taken from [`Config::default()`]. The effective configuration
//! is layered, **flag > environment variable > file > default**, and
//! `zbroker run --check-config` prints it as TOML ([`Config::to_toml`]).
//!
//! In a TOML file (`zbroker run --config`) every field is optional and
//! falls back to its default. Durations are written like `"10s"` or
//! `"250ms"`.
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
//! // What `--check-config` prints reads back as the same configuration.
//! let printed = config.to_toml().unwrap();
//! assert_eq!(zbroker::config::Config::from_toml(&printed).unwrap(), config);
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::Resettable;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use serde::{Deserialize, Serialize};

pub use zbroker_core::config::{
    BrokerConfig, ClusterConfig, Limits, MAX_LENGTH_SETTING, MAX_MESSAGE_SIZE_SETTING,
    MAX_PATTERN_SEGMENTS_SETTING, OverflowPolicy, QueueConfig,
};

/// Default publisher (PULL) endpoint.
pub const DEFAULT_PUB_BIND: &str = "tcp://127.0.0.1:5570";
/// Default subscriber (ROUTER) endpoint.
pub const DEFAULT_SUB_BIND: &str = "tcp://127.0.0.1:5571";

/// Everything the broker needs to start. `Config::default()` is the embedded
/// default configuration.
///
/// Each field is a key of the config file and a flag of `zbroker run` (see
/// [`ConfigArgs`]); the doc comments below are the flags' help, the first
/// paragraph for `-h` and all of it for `--help`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Endpoints publishers' PUSH sockets connect to (the broker's PULL
    /// binds each): the flag repeated, a comma-separated list, or a TOML
    /// string or list.
    ///
    /// Several let local publishers use ipc and remote ones tcp, on one
    /// broker (Dragonflow's neutron-server workers PUSH to an ipc path).
    #[arg(long, value_name = "ENDPOINT", action = clap::ArgAction::Append, value_delimiter = ',')]
    #[serde(with = "endpoints")]
    pub pub_bind: Vec<String>,
    /// Endpoints subscribers' DEALER sockets connect to (the broker's
    /// ROUTER binds each); as many as `pub_bind`.
    #[arg(long, value_name = "ENDPOINT", action = clap::ArgAction::Append, value_delimiter = ',')]
    #[serde(with = "endpoints")]
    pub sub_bind: Vec<String>,
    /// Endpoints unchanged ZeroMQ SUB sockets connect to (an XPUB socket
    /// binds each); off when empty.
    ///
    /// A SUB subscribes by prefix and receives `[topic, payload]`, exactly
    /// what a PUB socket would send it, with no sequence numbers: libzmq
    /// drops what a slow SUB cannot take (docs/PROTOCOL.md, "The XPUB
    /// front"). Its subscriptions are prefix filters in the routing index,
    /// under the same limits; not with CURVE ACLs, which it cannot enforce.
    #[arg(long, value_name = "ENDPOINT", action = clap::ArgAction::Append, value_delimiter = ',')]
    #[serde(with = "endpoints", skip_serializing_if = "Vec::is_empty")]
    pub xpub_bind: Vec<String>,
    /// Forget a subscriber not heard from for this long (at least 100ms).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub sub_timeout: Duration,
    /// ZMTP heartbeat interval on both sockets; a peer silent for
    /// max(sub_timeout, 3 × this) is disconnected.
    ///
    /// So dead TCP peers free their libzmq resources. Not shorter by
    /// default: libzmq 4.3 cancels a heartbeat timer by a linear search over
    /// all of its I/O thread's timers, so heartbeats cost about
    /// connections² / interval. At 10,000 subscribers a 1 s interval
    /// saturated a core (BENCHMARKS.md, scale).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub zmtp_heartbeat: Duration,
    /// libzmq's queue from each publisher, in messages (`ZMQ_RCVHWM` on the
    /// PULL).
    ///
    /// Short on purpose: beyond it a publisher's PUSH waits, instead of the
    /// broker reading ahead of what its subscribers take (which, with a
    /// dropping overflow policy, only turns into drops).
    #[arg(long, value_name = "N")]
    pub pub_hwm: i32,
    /// libzmq's queue to each subscriber, in messages (`ZMQ_SNDHWM` on the
    /// ROUTER).
    ///
    /// Beyond it deliveries wait in the broker's own queue (`[queue]`).
    /// libzmq 4.3 lets a full pipe be refilled only once its I/O thread has
    /// read half of it, and the other half must last until the broker's
    /// thread gets a core back: at 1,000 the I/O thread ran dry on a busy
    /// 2-core machine (BENCHMARKS.md). The comparison harness gives
    /// libzmq's proxy the same depths (`ZBROKER_LIBZMQ` in
    /// benches/compare/src/servers.rs): keep them in step.
    #[arg(long, value_name = "N")]
    pub sub_hwm: i32,
    /// Bytes libzmq's pipe from each publisher may hold, on top of
    /// `pub_hwm`'s message count.
    ///
    /// Without it, a pipe of 1,000 large messages could hold 1,000 ×
    /// `max_message_size`. Counts each message part's size; a message, once
    /// begun, is always taken whole, so the bound may be passed by one
    /// message.
    #[arg(long, value_name = "BYTES")]
    pub pub_hwm_bytes: i64,
    /// Bytes libzmq's pipe to each subscriber may hold, on top of
    /// `sub_hwm`'s message count.
    ///
    /// Beyond it deliveries wait in the broker's own byte-bounded queue
    /// (`[queue]`), where they count in `zbroker_queued_bytes`. Shared
    /// payloads count once per subscriber, as in the broker's queues. What
    /// the pipes hold now is `zbroker_libzmq_queued_bytes`.
    #[arg(long, value_name = "BYTES")]
    pub sub_hwm_bytes: i64,
    /// Bytes libzmq reads from a publisher or writes to a subscriber per
    /// system call, 1024 to 1048576.
    ///
    /// The PULL's `ZMQ_IN_BATCH_SIZE` and the ROUTER's
    /// `ZMQ_OUT_BATCH_SIZE`. libzmq's own default is 8 KiB; at 64 KiB, 1→1
    /// with 1 KiB messages ran about 20 % faster on 30 % less broker CPU per
    /// message, and raising only one side did not help (BENCHMARKS.md).
    /// What it costs: each subscriber connection has an encoder buffer this
    /// large (its pages are touched only as far as batches fill it), and a
    /// received message of more than 33 bytes shares the buffer it was read
    /// into, so a message queued for a slow subscriber can keep that whole
    /// buffer alive: with libzmq's per-message bookkeeping about 2.2 times
    /// this many bytes. The harness gives libzmq's proxy this too
    /// (`ZBROKER_LIBZMQ`).
    #[arg(long, value_name = "BYTES")]
    pub io_batch: i32,
    /// libzmq I/O threads (`ZMQ_IO_THREADS`), which encode, decode and make
    /// the socket calls, 1 to 64.
    ///
    /// Connections are spread over them. One is enough for a core or two;
    /// add one per few more cores the broker may use at high fan-out.
    #[arg(long, value_name = "N")]
    pub io_threads: i32,
    /// On SIGTERM or Ctrl-C, how long to keep flushing queued messages to
    /// connected subscribers before exiting.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Prometheus metrics endpoint (`host:port`, e.g. 127.0.0.1:9570); off
    /// when unset.
    #[arg(long, value_name = "HOST:PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_bind: Option<String>,
    /// Allow binding a non-loopback address without CURVE.
    ///
    /// Its environment variable takes true or false (also 1/0, yes/no,
    /// on/off).
    #[arg(long, value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
    /// Hard limits on what clients may ask for.
    #[command(flatten, next_help_heading = "Limits, [limits] in a config file")]
    pub limits: Limits,
    /// Per-subscriber pending queues for when libzmq's pipe is full.
    #[command(flatten, next_help_heading = "Queues, [queue] in a config file")]
    pub queue: QueueConfig,
    /// A cluster of brokers (docs/CLUSTERING.md); off unless `bind` is set.
    #[command(flatten, next_help_heading = "Cluster, [cluster] in a config file")]
    pub cluster: ClusterConfig,
    /// CURVE encryption, authentication and topic ACLs; off when `None`.
    #[command(flatten, next_help_heading = "CURVE, [curve] in a config file")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curve: Option<CurveConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            pub_bind: vec![DEFAULT_PUB_BIND.to_string()],
            sub_bind: vec![DEFAULT_SUB_BIND.to_string()],
            xpub_bind: Vec::new(),
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
            cluster: ClusterConfig::default(),
        }
    }
}

/// CURVE settings: the broker's own key and who may connect to which side.
///
/// The `[curve]` table of the config file; on the command line the three
/// are given together.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, Args)]
#[serde(deny_unknown_fields)]
pub struct CurveConfig {
    /// The broker's CURVE secret key file (from `zbroker keygen`); enables
    /// CURVE.
    #[arg(
        long = "curve-secret-key",
        value_name = "FILE",
        requires_all = ["publisher_keys", "subscriber_keys"]
    )]
    pub secret_key_file: PathBuf,
    /// Publishers' public keys, one per line, each followed by the filters
    /// it may publish to.
    #[arg(long, value_name = "FILE", requires = "secret_key_file")]
    pub publisher_keys: PathBuf,
    /// Subscribers' public keys, one per line, each followed by the filters
    /// it may subscribe to.
    #[arg(long, value_name = "FILE", requires = "secret_key_file")]
    pub subscriber_keys: PathBuf,
    /// In a cluster: the peer brokers' public keys, one per line, each
    /// followed by its cluster endpoint (for static peers); only these may
    /// link to this broker.
    #[arg(
        long = "cluster-peer-keys",
        value_name = "FILE",
        requires = "secret_key_file"
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_peer_keys: Option<PathBuf>,
}

/// `zbroker run`'s configuration: `--config FILE` and a flag per setting,
/// layered as **flag > environment variable > file > default**.
///
/// Every field of [`Config`], [`Limits`], [`QueueConfig`] and
/// [`CurveConfig`] is a flag: `max_topic_len` is `--max-topic-len`; in
/// `[queue]`, `policy` is `--overflow` and the others are
/// `--queue-max-messages` and so on, except `--disconnect-after`; in
/// `[curve]`, `secret_key_file` is `--curve-secret-key`. Each flag also
/// reads the environment variable named `ZBROKER_` and the flag in
/// capitals (`ZBROKER_MAX_TOPIC_LEN`, `ZBROKER_PUB_BIND`), and its help
/// shows its default (from [`Config::default()`]), its variable and its
/// key in the file.
///
/// clap decides between a flag, its variable and the default;
/// [`ConfigArgs::resolve`] then puts the file between the variables and
/// the defaults: a setting given neither as a flag nor in the environment
/// takes the file's value, else the default.
#[derive(Clone, Debug)]
pub struct ConfigArgs {
    /// `--config`: the TOML file, if any.
    pub file: Option<PathBuf>,
    /// Every setting as clap parsed it: from a flag, the environment or the
    /// default.
    parsed: Config,
    /// The argument ids (field names) of the settings that came from a flag
    /// or the environment.
    given: Vec<String>,
}

/// The id of `--config`.
const FILE_ARG: &str = "config";

impl ConfigArgs {
    /// The effective configuration: the defaults, overridden by the file,
    /// overridden by environment variables and flags; then validated.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let base = match &self.file {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        let config = overlay(&base, &self.parsed, &self.given)?;
        config.validate()?;
        Ok(config)
    }
}

/// Where a setting lives in the TOML form of a [`Config`]: its table
/// (`Some("limits")`, or `None` at the top level) and its key.
type KeyPath = (Option<String>, String);

/// `base` with the settings named in `ids` taken from `top`.
fn overlay(base: &Config, top: &Config, ids: &[String]) -> Result<Config, ConfigError> {
    let paths = key_paths();
    let mut table = to_table(base)?;
    let top = to_table(top)?;
    for id in ids {
        let Some((section, key)) = paths.get(id) else {
            unreachable!("setting {id} has no TOML key (see key_paths)");
        };
        let value = lookup(&top, section.as_deref(), key).cloned();
        let into = match section {
            Some(section) => table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("a section of Config is a table"),
            None => &mut table,
        };
        match value {
            Some(value) => into.insert(key.clone(), value),
            None => into.remove(key),
        };
    }
    table
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))
}

/// The value at `[section] key` of `table`, if any.
fn lookup<'t>(table: &'t toml::Table, section: Option<&str>, key: &str) -> Option<&'t toml::Value> {
    match section {
        Some(section) => table.get(section)?.as_table()?.get(key),
        None => table.get(key),
    }
}

fn to_table(config: &Config) -> Result<toml::Table, ConfigError> {
    toml::Table::try_from(config).map_err(out_of_toml_range)
}

/// Serialising a configuration fails only for an integer above TOML's range.
fn out_of_toml_range(e: toml::ser::Error) -> ConfigError {
    ConfigError::Invalid(format!(
        "a setting is larger than {}, the largest TOML integer ({e})",
        i64::MAX
    ))
}

/// Where each setting lives in the TOML form of a [`Config`], by argument
/// id (its field's name): `max_topic_len` at `(Some("limits"),
/// "max_topic_len")`, `pub_bind` at `(None, "pub_bind")`. Read from a
/// configuration with every optional part present, so that nothing here
/// repeats the structs; field names are unique across the tables (a unit
/// test checks).
fn key_paths() -> HashMap<String, KeyPath> {
    let complete = Config {
        metrics_bind: Some(String::new()),
        xpub_bind: vec![String::new()],
        cluster: ClusterConfig {
            bind: Some(String::new()),
            advertise: Some(String::new()),
            id: Some(String::new()),
            peers: vec![String::new()],
            etcd: vec![String::new()],
            ..ClusterConfig::default()
        },
        curve: Some(CurveConfig {
            secret_key_file: PathBuf::new(),
            publisher_keys: PathBuf::new(),
            subscriber_keys: PathBuf::new(),
            cluster_peer_keys: Some(PathBuf::new()),
        }),
        ..Config::default()
    };
    let mut paths = HashMap::new();
    for (key, value) in to_table(&complete).expect("the defaults fit in TOML") {
        match value {
            toml::Value::Table(inner) => {
                for field in inner.keys() {
                    paths.insert(field.clone(), (Some(key.clone()), field.clone()));
                }
            }
            _ => {
                paths.insert(key.clone(), (None, key));
            }
        }
    }
    paths
}

/// The argument ids of the settings: every flag [`Config`] derives.
fn setting_ids() -> Vec<String> {
    Config::augment_args(clap::Command::new("settings"))
        .get_arguments()
        .map(|arg| arg.get_id().to_string())
        .collect()
}

/// A TOML value as a command-line argument: strings unquoted.
fn as_argument(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        // Endpoint lists: the flags split on commas.
        toml::Value::Array(items) => items.iter().map(as_argument).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

impl Args for ConfigArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        // A flattened struct's doc comment would replace the command's own.
        let about = cmd.get_about().cloned();
        let long_about = cmd.get_long_about().cloned();
        let cmd = cmd.arg(
            clap::Arg::new(FILE_ARG)
                .long("config")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help(
                    "TOML configuration file: any setting below, under the key its help \
                     names; flags and environment variables override it",
                ),
        );
        let mut cmd = Config::augment_args(cmd);
        let defaults = to_table(&Config::default()).expect("the defaults fit in TOML");
        let paths = key_paths();
        for id in setting_ids() {
            let (section, key) = paths[&id].clone();
            let default = lookup(&defaults, section.as_deref(), &key)
                .filter(|v| !v.is_bool())
                .map(as_argument);
            // A dotted key is valid TOML too: `limits.max_topic_len = 64`.
            let file_key = match &section {
                Some(section) => format!("{section}.{key}"),
                None => key.clone(),
            };
            cmd = cmd.mut_arg(id, |arg| {
                let env = format!(
                    "ZBROKER_{}",
                    arg.get_long()
                        .expect("every setting is a --flag")
                        .to_ascii_uppercase()
                        .replace('-', "_")
                );
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                let long_help = arg.get_long_help().map(ToString::to_string);
                let long_help = long_help.unwrap_or_else(|| help.clone());
                let arg = arg
                    .required(false)
                    .env(env)
                    .help(format!("{help} [config: {file_key}]"))
                    .long_help(format!("{long_help}\n\n[config: {file_key}]"));
                match default {
                    Some(default) => arg.default_value(default),
                    None => arg,
                }
            });
        }
        let restore = |text: Option<clap::builder::StyledStr>| match text {
            Some(text) => Resettable::Value(text),
            None => Resettable::Reset,
        };
        cmd.next_help_heading(Resettable::Reset)
            .about(restore(about))
            .long_about(restore(long_about))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for ConfigArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Self::from_arg_matches_mut(&mut matches.clone())
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, clap::Error> {
        let given = setting_ids()
            .into_iter()
            .filter(|id| {
                matches!(
                    matches.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
            })
            .collect();
        Ok(ConfigArgs {
            file: matches.remove_one(FILE_ARG),
            parsed: Config::from_arg_matches_mut(matches)?,
            given,
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.update_from_arg_matches_mut(&mut matches.clone())
    }

    fn update_from_arg_matches_mut(&mut self, matches: &mut ArgMatches) -> Result<(), clap::Error> {
        let new = Self::from_arg_matches_mut(matches)?;
        self.parsed = overlay(&self.parsed, &new.parsed, &new.given)
            .map_err(|e| clap::Error::raw(clap::error::ErrorKind::ValueValidation, e))?;
        self.given.extend(new.given);
        self.given.sort();
        self.given.dedup();
        if new.file.is_some() {
            self.file = new.file;
        }
        Ok(())
    }
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
            cluster: self.cluster.clone(),
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

    /// The configuration as TOML that [`Config::from_toml`] reads back as
    /// the same configuration, every setting written out (what
    /// `zbroker run --check-config` prints). Fails only for a value too
    /// large for TOML's 64-bit signed integers.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(out_of_toml_range)
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
        for (flag, endpoints) in [("pub-bind", &self.pub_bind), ("sub-bind", &self.sub_bind)] {
            if endpoints.is_empty() {
                return invalid(format!("--{flag} needs at least one endpoint"));
            }
        }
        if self.curve.is_some() && !self.xpub_bind.is_empty() {
            return invalid(
                "--xpub-bind cannot be used with CURVE: an XPUB socket does not say which key \
                 sent a subscription, so topic ACLs could not be enforced; serve SUB sockets \
                 from a broker without [curve], on a trusted network"
                    .into(),
            );
        }
        self.validate_cluster()?;
        if self.curve.is_none() && !self.insecure {
            let cluster_bind: Vec<String> = self.cluster.bind.iter().cloned().collect();
            let all = [
                ("pub-bind", &self.pub_bind),
                ("sub-bind", &self.sub_bind),
                ("xpub-bind", &self.xpub_bind),
                ("cluster-bind", &cluster_bind),
            ];
            for (flag, endpoint) in all.iter().flat_map(|(f, e)| e.iter().map(move |e| (f, e))) {
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

impl Config {
    /// The `[cluster]` table's own rules.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let invalid = |text: String| Err(ConfigError::Invalid(text));
        let cluster = &self.cluster;
        if cluster.bind.is_none() {
            if !cluster.peers.is_empty() || !cluster.etcd.is_empty() {
                return invalid(
                    "--cluster-peers and --cluster-etcd need --cluster-bind, the endpoint peers \
                     connect to"
                        .into(),
                );
            }
            return Ok(());
        }
        if !cluster.peers.is_empty() && !cluster.etcd.is_empty() {
            return invalid(
                "--cluster-peers and --cluster-etcd exclude each other: membership is either \
                 static or from etcd"
                    .into(),
            );
        }
        if self
            .curve
            .as_ref()
            .is_some_and(|curve| curve.cluster_peer_keys.is_none())
        {
            return invalid(
                "with CURVE, peer links use CURVE too: list the peer brokers' public keys \
                 (and endpoints) in a file and pass it as --cluster-peer-keys"
                    .into(),
            );
        }
        if cluster.name.is_empty() || cluster.name.contains('/') {
            return invalid(format!(
                "cluster.name {:?} must be non-empty and without '/' (it is part of etcd keys)",
                cluster.name
            ));
        }
        if let Some(id) = &cluster.id
            && (id.is_empty() || id.len() > 128 || id.contains('/'))
        {
            return invalid(format!(
                "cluster.id {id:?} must be 1 to 128 bytes without '/'"
            ));
        }
        if cluster.ping_interval < Duration::from_millis(10)
            || cluster.peer_timeout < cluster.ping_interval * 2
        {
            return invalid(format!(
                "cluster.ping_interval {:?} must be at least 10ms and cluster.peer_timeout {:?} \
                 at least twice as long",
                cluster.ping_interval, cluster.peer_timeout
            ));
        }
        if cluster.lease_ttl < Duration::from_secs(1) {
            return invalid(format!(
                "cluster.lease_ttl {:?} is too short; etcd leases count in seconds, use at least 1s",
                cluster.lease_ttl
            ));
        }
        if cluster.queue_max_messages == 0
            || cluster.queue_max_bytes == 0
            || cluster.max_peer_filters == 0
        {
            return invalid(
                "cluster.queue_max_messages, queue_max_bytes and max_peer_filters must be at \
                 least 1"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Endpoint lists in TOML: one endpoint may be written as a string, several
/// as a list; written back the same way, so a one-endpoint configuration
/// reads as it always did.
mod endpoints {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::One(endpoint) => vec![endpoint],
            OneOrMany::Many(endpoints) => endpoints,
        })
    }

    pub(super) fn serialize<S: Serializer>(endpoints: &[String], s: S) -> Result<S::Ok, S::Error> {
        match endpoints {
            [one] => s.serialize_str(one),
            many => s.collect_seq(many),
        }
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

    /// `zbroker run`'s configuration flags alone.
    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        config: ConfigArgs,
    }

    /// `args` parsed as `zbroker run` would, but blind to the environment
    /// (the tests in tests/cli.rs cover it), so that `ZBROKER_*` variables
    /// where the tests run cannot change the outcome.
    fn try_parse(args: &[&str]) -> Result<ConfigArgs, clap::Error> {
        use clap::{CommandFactory, FromArgMatches};
        let command = Run::command().mut_args(|arg| arg.env(Resettable::Reset));
        let args = std::iter::once("run").chain(args.iter().copied());
        let matches = command.try_get_matches_from(args)?;
        Ok(Run::from_arg_matches(&matches)?.config)
    }

    fn parse(args: &[&str]) -> ConfigArgs {
        try_parse(args).unwrap()
    }

    #[test]
    fn the_command_is_well_formed() {
        use clap::CommandFactory;
        Run::command().debug_assert();
    }

    #[test]
    fn every_setting_has_one_toml_key() {
        let paths = key_paths();
        let ids = setting_ids();
        for id in &ids {
            assert!(paths.contains_key(id), "flag {id} has no TOML key");
        }
        // Every key is a flag, and no key name is used twice (the paths are
        // keyed by field name).
        assert_eq!(paths.len(), ids.len(), "{paths:?} vs {ids:?}");
        assert_eq!(
            paths["max_topic_len"],
            (Some("limits".into()), "max_topic_len".into())
        );
        assert_eq!(paths["policy"], (Some("queue".into()), "policy".into()));
        assert_eq!(paths["pub_bind"], (None, "pub_bind".into()));
    }

    #[test]
    fn flags_override_the_file_which_overrides_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("zbroker.toml");
        std::fs::write(
            &file,
            "sub_timeout = \"30s\"\ninsecure = true\n[limits]\nmax_topic_len = 100\n\
             max_filter_len = 101\n[queue]\npolicy = \"drop-old\"\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();
        let config = parse(&[
            "--config",
            file,
            "--max-topic-len",
            "200",
            "--overflow",
            "disconnect",
        ])
        .resolve()
        .unwrap();
        assert_eq!(config.sub_timeout, Duration::from_secs(30), "file");
        assert!(config.insecure, "the file's, as --insecure was not given");
        assert_eq!(config.limits.max_topic_len, 200, "flag");
        assert_eq!(config.limits.max_filter_len, 101, "file");
        assert_eq!(config.queue.policy, OverflowPolicy::Disconnect, "flag");
        assert_eq!(config.limits.max_subscribers, 100_000, "default");
        assert_eq!(config.pub_bind, [DEFAULT_PUB_BIND], "default");

        let config = parse(&["--config", file]).resolve().unwrap();
        assert_eq!(config.limits.max_topic_len, 100);
        assert_eq!(config.queue.policy, OverflowPolicy::DropOld);

        let config = parse(&["--sub-timeout", "3s", "--insecure"])
            .resolve()
            .unwrap();
        let expected = Config {
            sub_timeout: Duration::from_secs(3),
            insecure: true,
            ..Config::default()
        };
        assert_eq!(config, expected);
        assert_eq!(parse(&[]).resolve().unwrap(), Config::default());
    }

    #[test]
    fn curve_and_metrics_flags_fill_in_what_the_file_lacks() {
        let config = parse(&[
            "--metrics-bind",
            "127.0.0.1:9570",
            "--curve-secret-key",
            "broker.key",
            "--publisher-keys",
            "pub.keys",
            "--subscriber-keys",
            "sub.keys",
        ]);
        let config = overlay(&Config::default(), &config.parsed, &config.given).unwrap();
        assert_eq!(config.metrics_bind.as_deref(), Some("127.0.0.1:9570"));
        let curve = config.curve.unwrap();
        assert_eq!(curve.secret_key_file, Path::new("broker.key"));
        assert_eq!(curve.subscriber_keys, Path::new("sub.keys"));

        let half = try_parse(&["--publisher-keys", "pub.keys"]);
        assert!(half.is_err(), "the CURVE flags go together");
    }

    #[test]
    fn bad_values_are_refused_by_the_flag_parser() {
        for args in [
            ["--sub-timeout", "10 parsecs"],
            ["--max-topic-len", "-1"],
            ["--overflow", "drop-some"],
        ] {
            assert!(try_parse(&args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn to_toml_reads_back_as_the_same_configuration() {
        let config = Config {
            sub_timeout: Duration::from_millis(1500),
            metrics_bind: Some("127.0.0.1:9570".into()),
            insecure: true,
            curve: Some(CurveConfig {
                secret_key_file: "broker.key".into(),
                publisher_keys: "pub.keys".into(),
                subscriber_keys: "sub.keys".into(),
                cluster_peer_keys: None,
            }),
            limits: Limits {
                max_topic_len: 77,
                ..Limits::default()
            },
            queue: QueueConfig {
                policy: OverflowPolicy::Backpressure,
                disconnect_after: Duration::from_micros(2_500_001),
                ..QueueConfig::default()
            },
            ..Config::default()
        };
        let text = config.to_toml().unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), config, "{text}");
        assert!(text.contains("policy = \"backpressure\""), "{text}");
        let default = Config::default().to_toml().unwrap();
        assert_eq!(Config::from_toml(&default).unwrap(), Config::default());
        assert!(
            !default.contains("curve") && !default.contains("metrics_bind"),
            "{default}"
        );
    }

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
            pub_bind: vec!["tcp://0.0.0.0:5570".into()],
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
