//! The `zbroker` command: argument parsing over the library.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use zbroker::client::{
    CurveKeys, Event, Publisher, PublisherOptions, Subscriber, SubscriberOptions,
};
use zbroker::config::ConfigArgs;
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
    #[arg(long, global = true, default_value = "info", display_order = 1000)]
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
    /// Write the man pages or the shell completions into DIR, from these
    /// very definitions (the Debian package's build does: see
    /// scripts/package-deb). Hidden: it is for packagers.
    #[command(hide = true)]
    Generate {
        /// `man`: one roff page per subcommand (zbroker.1, zbroker-run.1,
        /// ...); `completions`: bash (zbroker.bash), zsh (_zbroker) and
        /// fish (zbroker.fish).
        what: Generated,
        /// The directory to write into; created if missing.
        dir: PathBuf,
    },
}

/// What `zbroker generate` writes.
#[derive(Clone, Copy, ValueEnum)]
enum Generated {
    Man,
    Completions,
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

/// Flags of `zbroker run`: `--config FILE`, a flag per setting (each also
/// read from a `ZBROKER_*` environment variable; see
/// [`ConfigArgs`]), and `--check-config`. Precedence: a flag beats
/// its environment variable, which beats the file, which beats the
/// embedded default.
#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Validate the configuration (and key files), print it as TOML and exit.
    #[arg(long)]
    check_config: bool,
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
            let config = args.config.resolve()?;
            if args.check_config {
                zbroker::server::check(&config)?;
                println!("# The effective configuration (flags > environment > file > defaults).");
                print!("{}", config.to_toml()?);
                println!("configuration OK");
                return Ok(());
            }
            let mut server = Server::bind(config)?;
            server.stop_on_signals()?;
            // READY=1 to systemd's NOTIFY_SOCKET, if set (src/server/notify.rs).
            server.notify_systemd();
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
        Command::Generate { what, dir } => generate(what, &dir)?,
    }
    Ok(())
}

/// `zbroker generate WHAT DIR`: writes the files and prints their paths.
fn generate(what: Generated, dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    match what {
        Generated::Man => {
            // One page per subcommand; hidden ones (this one) get none.
            clap_mangen::generate_to(Cli::command(), dir)?;
            for entry in std::fs::read_dir(dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "1") {
                    written.push(path);
                }
            }
        }
        Generated::Completions => {
            for shell in [
                clap_complete::Shell::Bash,
                clap_complete::Shell::Zsh,
                clap_complete::Shell::Fish,
            ] {
                written.push(clap_complete::generate_to(
                    shell,
                    &mut without_hidden(Cli::command()),
                    "zbroker",
                    dir,
                )?);
            }
        }
    }
    written.sort();
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

/// `command` less its hidden subcommands, which clap_complete would
/// otherwise offer (clap_mangen leaves them out by itself).
fn without_hidden(command: clap::Command) -> clap::Command {
    let visible: Vec<clap::Command> = command
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut kept = clap::Command::new(command.get_name().to_string())
        .args(command.get_arguments().cloned())
        .subcommands(visible);
    if let Some(version) = command.get_version() {
        kept = kept.version(version.to_string());
    }
    if let Some(about) = command.get_about() {
        kept = kept.about(about.clone());
    }
    kept
}
