//! The `zbroker` command: argument parsing over the library.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use zbroker::client::{Event, Publisher, Subscriber};
use zbroker::config::{self, Config, OverflowPolicy};
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
        /// The broker's publisher endpoint, e.g. tcp://127.0.0.1:5570.
        endpoint: String,
        /// The topic.
        topic: String,
        /// The payload; read from standard input when absent.
        message: Option<String>,
    },
    /// Print matching messages as `TOPIC PAYLOAD` lines (like mosquitto_sub).
    Sub {
        /// The broker's subscriber endpoint, e.g. tcp://127.0.0.1:5571.
        endpoint: String,
        /// Filters written exact:TOPIC, prefix:TOPIC or pattern:A.*.>.
        #[arg(required = true)]
        filters: Vec<String>,
        /// Exit after this many messages.
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Endpoint publishers' PUSH sockets connect to.
    #[arg(long, env = "ZBROKER_PUB_BIND", default_value = config::DEFAULT_PUB_BIND)]
    pub_bind: String,
    /// Endpoint subscribers' DEALER sockets connect to.
    #[arg(long, env = "ZBROKER_SUB_BIND", default_value = config::DEFAULT_SUB_BIND)]
    sub_bind: String,
    /// Forget a subscriber not heard from for this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    sub_timeout: Duration,
    /// Longest topic, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_TOPIC_LEN)]
    max_topic_len: usize,
    /// Longest filter, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_TOPIC_LEN)]
    max_filter_len: usize,
    /// Most subscribers at once.
    #[arg(long, default_value_t = config::Limits::default().max_subscribers)]
    max_subscribers: usize,
    /// Most filters per subscriber.
    #[arg(long, default_value_t = config::Limits::default().max_filters_per_subscriber)]
    max_filters_per_subscriber: usize,
    /// Most filters in total.
    #[arg(long, default_value_t = config::Limits::default().max_filters_total)]
    max_filters_total: usize,
    /// Largest message part in bytes (ZMQ_MAXMSGSIZE); larger ones drop the peer.
    #[arg(long, default_value_t = config::Limits::default().max_message_size)]
    max_message_size: i64,
    /// Most messages queued in the broker for one slow subscriber.
    #[arg(long, default_value_t = config::QueueConfig::default().max_messages)]
    queue_max_messages: usize,
    /// Most bytes queued in the broker for one slow subscriber.
    #[arg(long, default_value_t = config::QueueConfig::default().max_bytes)]
    queue_max_bytes: usize,
    /// Most bytes queued in the broker across all subscribers.
    #[arg(long, default_value_t = config::QueueConfig::default().max_total_bytes)]
    queue_max_total_bytes: usize,
    /// What to do when a subscriber's queue is full: drop-new, drop-old or disconnect.
    #[arg(long, default_value = "drop-new", value_parser = parse_policy)]
    overflow: OverflowPolicy,
    /// With --overflow disconnect: how long a queue may stay full.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    disconnect_after: Duration,
    /// libzmq's per-peer queue in messages (SNDHWM/RCVHWM).
    #[arg(long, default_value_t = 1000)]
    hwm: i32,
    /// On SIGTERM/Ctrl-C, how long to keep flushing queued messages.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    linger: Duration,
}

fn parse_policy(word: &str) -> Result<OverflowPolicy, String> {
    OverflowPolicy::parse(word)
        .ok_or_else(|| format!("{word:?}: use drop-new, drop-old or disconnect"))
}

impl RunArgs {
    fn into_config(self) -> Config {
        Config {
            pub_bind: self.pub_bind,
            sub_bind: self.sub_bind,
            limits: config::Limits {
                max_topic_len: self.max_topic_len,
                max_filter_len: self.max_filter_len,
                max_subscribers: self.max_subscribers,
                max_filters_per_subscriber: self.max_filters_per_subscriber,
                max_filters_total: self.max_filters_total,
                max_message_size: self.max_message_size,
            },
            queue: config::QueueConfig {
                max_messages: self.queue_max_messages,
                max_bytes: self.queue_max_bytes,
                max_total_bytes: self.queue_max_total_bytes,
                policy: self.overflow,
                disconnect_after: self.disconnect_after,
            },
            sub_timeout: self.sub_timeout,
            hwm: self.hwm,
            linger: self.linger,
            ..Config::default()
        }
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
            let mut server = Server::bind(args.into_config())?;
            server.stop_on_signals()?;
            server.run()?;
        }
        Command::Pub {
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
            let mut publisher = Publisher::connect(&endpoint)?;
            publisher.publish(topic.as_bytes(), &payload)?;
        }
        Command::Sub {
            endpoint,
            filters,
            count,
        } => {
            let filters = filters
                .iter()
                .map(|f| Filter::parse_cli(f, DEFAULT_MAX_TOPIC_LEN))
                .collect::<Result<Vec<_>, _>>()?;
            let mut subscriber = Subscriber::connect(&endpoint)?;
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
    }
    Ok(())
}
