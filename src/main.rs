//! The `zbroker` command: argument parsing over the library.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use zbroker::client::{
    CurveKeys, Event, Publisher, PublisherOptions, Subscriber, SubscriberOptions,
};
use zbroker::config::{self, Config, ConfigError, OverflowPolicy};
use zbroker::filter::Filter;
use zbroker::protocol::DEFAULT_MAX_TOPIC_LEN;
use zbroker::server::Server;

/// A ZeroMQ pub/sub broker with server-side topic filtering.
#[derive(Parser)]
#[command(name = "zbroker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Run(Box<RunArgs>),
    /// Publish one message (like mosquitto_pub).
    Pub {
        #[command(flatten)]
        curve: ClientCurveArgs,
        /// The broker's publisher endpoint, e.g. tcp://127.0.0.1:5570.
        endpoint: String,
        /// The topic.
        topic: String,
        /// The payload; read from standard input when absent.
        message: Option<String>,
    },
    /// Print matching messages as `TOPIC PAYLOAD` lines (like mosquitto_sub).
    Sub {
        #[command(flatten)]
        curve: ClientCurveArgs,
        /// The broker's subscriber endpoint, e.g. tcp://127.0.0.1:5571.
        endpoint: String,
        /// Filters written exact:TOPIC, prefix:TOPIC or pattern:A.*.>.
        #[arg(required = true)]
        filters: Vec<String>,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Write a new CURVE key pair: the secret key to PATH (mode 0600), the
    /// public key to PATH.pub.
    Keygen {
        /// Where to write the secret key; never overwritten.
        path: PathBuf,
    },
    /// Print a running broker's counters (needs `run --metrics-bind`).
    Stats {
        /// The metrics endpoint, e.g. 127.0.0.1:9570 or http://host:port/metrics.
        endpoint: String,
    },
}

/// CURVE credentials of `pub` and `sub`.
#[derive(Args)]
struct ClientCurveArgs {
    /// The broker's public key file (enables CURVE).
    #[arg(long, requires = "key")]
    server_key: Option<PathBuf>,
    /// This client's secret key file (from `zbroker keygen`).
    #[arg(long, requires = "server_key")]
    key: Option<PathBuf>,
}

impl ClientCurveArgs {
    fn load(&self) -> Result<Option<CurveKeys>, zbroker::auth::AuthError> {
        match (&self.server_key, &self.key) {
            (Some(server), Some(own)) => CurveKeys::from_files(server, own).map(Some),
            _ => Ok(None),
        }
    }
}

/// Flags of `zbroker run`. Each overrides the config file; unset ones keep
/// the file's value, else the environment's, else the embedded default.
#[derive(Args)]
struct RunArgs {
    /// TOML configuration file (every flag below can be set there).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Validate the configuration (and key files) and exit.
    #[arg(long)]
    check_config: bool,
    /// Endpoint publishers' PUSH sockets connect to [default: tcp://127.0.0.1:5570].
    #[arg(long, env = "ZBROKER_PUB_BIND")]
    pub_bind: Option<String>,
    /// Endpoint subscribers' DEALER sockets connect to [default: tcp://127.0.0.1:5571].
    #[arg(long, env = "ZBROKER_SUB_BIND")]
    sub_bind: Option<String>,
    /// Prometheus metrics endpoint, e.g. 127.0.0.1:9570 [default: off].
    #[arg(long, env = "ZBROKER_METRICS_BIND")]
    metrics_bind: Option<String>,
    /// Allow binding a non-loopback address without CURVE.
    #[arg(long)]
    insecure: bool,
    /// The broker's CURVE secret key file (from `zbroker keygen`); enables CURVE.
    #[arg(long, requires_all = ["publisher_keys", "subscriber_keys"])]
    curve_secret_key: Option<PathBuf>,
    /// Publishers' public keys, one per line, each followed by the filters it may publish to.
    #[arg(long, requires = "curve_secret_key")]
    publisher_keys: Option<PathBuf>,
    /// Subscribers' public keys, one per line, each followed by the filters it may subscribe to.
    #[arg(long, requires = "curve_secret_key")]
    subscriber_keys: Option<PathBuf>,
    /// ZMTP heartbeat interval; dead TCP peers are dropped after max(sub-timeout, 3x this) [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    zmtp_heartbeat: Option<Duration>,
    /// Forget a subscriber not heard from for this long [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    sub_timeout: Option<Duration>,
    /// Longest topic, in bytes [default: 1024].
    #[arg(long)]
    max_topic_len: Option<usize>,
    /// Longest filter, in bytes [default: 1024].
    #[arg(long)]
    max_filter_len: Option<usize>,
    /// Most subscribers at once [default: 100000].
    #[arg(long)]
    max_subscribers: Option<usize>,
    /// Most filters per subscriber [default: 10000].
    #[arg(long)]
    max_filters_per_subscriber: Option<usize>,
    /// Most filters in total [default: 1000000].
    #[arg(long)]
    max_filters_total: Option<usize>,
    /// Largest message part in bytes (ZMQ_MAXMSGSIZE); larger ones drop the peer [default: 16 MiB].
    #[arg(long)]
    max_message_size: Option<i64>,
    /// Commands per second one subscriber may send, sustained [default: 5000].
    #[arg(long)]
    max_commands_per_sec: Option<u32>,
    /// Most segments in a pattern filter, 1 to 1024; bounds the CPU a publish costs [default: 16].
    #[arg(long)]
    max_pattern_segments: Option<usize>,
    /// Most heap bytes of the routing index; past it SUB is refused [default: 1 GiB].
    #[arg(long)]
    max_index_bytes: Option<usize>,
    /// Under CURVE: most filters held by the subscribers of one key [default: 100000].
    #[arg(long)]
    max_filters_per_key: Option<usize>,
    /// Most live connections per endpoint; more are closed at once [default: 100000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most messages queued in the broker for one slow subscriber [default: 10000].
    #[arg(long)]
    queue_max_messages: Option<usize>,
    /// Most bytes queued in the broker for one slow subscriber [default: 16 MiB].
    #[arg(long)]
    queue_max_bytes: Option<usize>,
    /// Most bytes queued in the broker across all subscribers [default: 512 MiB].
    #[arg(long)]
    queue_max_total_bytes: Option<usize>,
    /// When a subscriber's queue is full: drop-new, drop-old, disconnect, or
    /// backpressure (pause publishers while a queue is half full) [default: drop-new].
    #[arg(long, value_parser = parse_policy)]
    overflow: Option<OverflowPolicy>,
    /// With --overflow disconnect: how long a queue may stay full; with
    /// backpressure: how long a subscriber may take nothing [default: 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    disconnect_after: Option<Duration>,
    /// libzmq's queue from each publisher in messages, the PULL's RCVHWM [default: 1000].
    #[arg(long)]
    pub_hwm: Option<i32>,
    /// libzmq's queue to each subscriber in messages, the ROUTER's SNDHWM [default: 3000].
    #[arg(long)]
    sub_hwm: Option<i32>,
    /// libzmq's queue from each publisher in bytes, on top of --pub-hwm [default: 8 MiB].
    #[arg(long)]
    pub_hwm_bytes: Option<i64>,
    /// libzmq's queue to each subscriber in bytes, on top of --sub-hwm [default: 8 MiB].
    #[arg(long)]
    sub_hwm_bytes: Option<i64>,
    /// Bytes libzmq reads from a publisher or writes to a subscriber per
    /// system call, 1024 to 1048576 [default: 65536].
    #[arg(long)]
    io_batch: Option<i32>,
    /// libzmq I/O threads (encoding, decoding, socket calls), 1 to 64 [default: 1].
    #[arg(long)]
    io_threads: Option<i32>,
    /// On SIGTERM/Ctrl-C, how long to keep flushing queued messages [default: 2s].
    #[arg(long, value_parser = humantime::parse_duration)]
    linger: Option<Duration>,
}

fn parse_policy(word: &str) -> Result<OverflowPolicy, String> {
    OverflowPolicy::parse(word)
        .ok_or_else(|| format!("{word:?}: use drop-new, drop-old, disconnect or backpressure"))
}

/// Replaces `field` with the flag's value when the flag (or its
/// environment variable) was given.
fn set<T: Clone>(field: &mut T, flag: &Option<T>) {
    if let Some(value) = flag {
        *field = value.clone();
    }
}

impl RunArgs {
    fn into_config(self) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        set(&mut c.pub_bind, &self.pub_bind);
        set(&mut c.sub_bind, &self.sub_bind);
        if self.metrics_bind.is_some() {
            c.metrics_bind = self.metrics_bind.clone();
        }
        c.insecure |= self.insecure;
        if let (Some(secret), Some(publishers), Some(subscribers)) = (
            &self.curve_secret_key,
            &self.publisher_keys,
            &self.subscriber_keys,
        ) {
            c.curve = Some(config::CurveConfig {
                secret_key_file: secret.clone(),
                publisher_keys: publishers.clone(),
                subscriber_keys: subscribers.clone(),
            });
        }
        set(&mut c.sub_timeout, &self.sub_timeout);
        set(&mut c.zmtp_heartbeat, &self.zmtp_heartbeat);
        set(&mut c.limits.max_topic_len, &self.max_topic_len);
        set(&mut c.limits.max_filter_len, &self.max_filter_len);
        set(&mut c.limits.max_subscribers, &self.max_subscribers);
        set(
            &mut c.limits.max_filters_per_subscriber,
            &self.max_filters_per_subscriber,
        );
        set(&mut c.limits.max_filters_total, &self.max_filters_total);
        set(&mut c.limits.max_message_size, &self.max_message_size);
        set(
            &mut c.limits.max_commands_per_sec,
            &self.max_commands_per_sec,
        );
        set(
            &mut c.limits.max_pattern_segments,
            &self.max_pattern_segments,
        );
        set(&mut c.limits.max_index_bytes, &self.max_index_bytes);
        set(&mut c.limits.max_filters_per_key, &self.max_filters_per_key);
        set(&mut c.limits.max_connections, &self.max_connections);
        set(&mut c.queue.max_messages, &self.queue_max_messages);
        set(&mut c.queue.max_bytes, &self.queue_max_bytes);
        set(&mut c.queue.max_total_bytes, &self.queue_max_total_bytes);
        set(&mut c.queue.policy, &self.overflow);
        set(&mut c.queue.disconnect_after, &self.disconnect_after);
        set(&mut c.pub_hwm, &self.pub_hwm);
        set(&mut c.sub_hwm, &self.sub_hwm);
        set(&mut c.pub_hwm_bytes, &self.pub_hwm_bytes);
        set(&mut c.sub_hwm_bytes, &self.sub_hwm_bytes);
        set(&mut c.io_batch, &self.io_batch);
        set(&mut c.io_threads, &self.io_threads);
        set(&mut c.linger, &self.linger);
        c.validate()?;
        Ok(c)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zbroker: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Run(args) => {
            let check_only = args.check_config;
            let config = args.into_config()?;
            if check_only {
                zbroker::server::check(&config)?;
                println!("{config:#?}");
                println!("configuration OK");
                return Ok(());
            }
            let mut server = Server::bind(config)?;
            server.stop_on_signals()?;
            server.run()?;
        }
        Command::Pub {
            curve,
            endpoint,
            topic,
            message,
        } => {
            let payload = match message {
                Some(m) => m.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf)?;
                    buf
                }
            };
            let options = PublisherOptions {
                curve: curve.load()?,
                ..PublisherOptions::default()
            };
            let mut publisher = Publisher::connect_with(&endpoint, &options)?;
            publisher.publish(topic.as_bytes(), &payload)?;
        }
        Command::Sub {
            curve,
            endpoint,
            filters,
            count,
        } => {
            let filters = filters
                .iter()
                .map(|f| Filter::parse_cli(f, DEFAULT_MAX_TOPIC_LEN))
                .collect::<Result<Vec<_>, _>>()?;
            let options = SubscriberOptions {
                curve: curve.load()?,
                ..SubscriberOptions::default()
            };
            let mut subscriber = Subscriber::connect_with(&endpoint, options)?;
            for filter in &filters {
                subscriber.subscribe(filter)?;
            }
            tracing::info!(filters = filters.len(), %endpoint, "subscribed");
            let mut stdout = std::io::stdout().lock();
            let mut seen = 0;
            while count.is_none_or(|n| seen < n) {
                match subscriber.recv()? {
                    Event::Message(m) => {
                        if m.gap {
                            eprintln!("zbroker: messages were dropped before seq {}", m.seq);
                        }
                        stdout.write_all(&m.topic)?;
                        stdout.write_all(b" ")?;
                        stdout.write_all(&m.payload)?;
                        stdout.write_all(b"\n")?;
                        stdout.flush()?;
                        seen += 1;
                    }
                    Event::Resync(why) => {
                        eprintln!("zbroker: resubscribed ({why}); messages may have been missed")
                    }
                }
            }
        }
        Command::Keygen { path } => {
            let public = zbroker::auth::keygen(&path)?;
            println!("{public}");
            eprintln!(
                "zbroker: wrote the secret key to {} (mode 0600) and the public key to {}.pub",
                path.display(),
                path.display()
            );
        }
        Command::Stats { endpoint } => {
            print!("{}", zbroker::metrics::fetch(&endpoint)?);
        }
    }
    Ok(())
}
