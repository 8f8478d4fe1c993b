//! The `shardcast` binary: load the configuration, start the shards, reload on SIGHUP or a
//! change of the file, stop on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use shardcast::config::{Config, LogFormat};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Thread-per-core WebSocket server for real-time decision streaming.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML). Every field can also be set with SHARDCAST_… variables.
    #[arg(long, global = true, default_value = "config/shardcast.toml")]
    config: PathBuf,
    /// Address to listen on (overrides the file and SHARDCAST_LISTEN).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Number of shards, 0 for one per CPU (overrides the file and SHARDCAST_SHARDS).
    #[arg(long)]
    shards: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Check the configuration (file, SHARDCAST_… variables and flags) and print it as it
    /// would take effect, secrets masked; exit 0 when the server could start with it, 1
    /// when not (the reason on stderr).
    CheckConfig,
}

/// The configuration the arguments and the environment make, checked.
fn config(args: &Args) -> Result<Config, shardcast::config::ConfigError> {
    let mut config = Config::load(Some(&args.config), std::env::vars())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(shards) = args.shards {
        config.shards = shards;
    }
    config.validate()?;
    Ok(config)
}

/// Sets what is logged (`[log] level`) on a reload.
type SetLevel = Box<dyn Fn(&str) + Send + Sync>;

/// Log to stderr as `[log]` says (`RUST_LOG`, when set, chooses what, and reloads leave it).
fn init_logs(log: &shardcast::config::Log) -> SetLevel {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let from_env = EnvFilter::try_from_default_env().ok();
    let fixed = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(&log.level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let logs = tracing_subscriber::registry().with(filter);
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match log.format {
        // Colour codes only for a terminal: in a log file or journal they are noise.
        LogFormat::Text => logs
            .with(lines.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .init(),
        LogFormat::Json => logs.with(lines.json().with_current_span(true)).init(),
    }
    Box::new(move |level: &str| {
        if fixed {
            return;
        }
        match EnvFilter::try_new(level) {
            Ok(filter) => {
                if let Err(e) = handle.reload(filter) {
                    tracing::warn!("log level not changed: {e}");
                }
            }
            Err(e) => tracing::warn!("log level {level:?} not understood: {e}"),
        }
    })
}

/// Read the configuration again and put what can change live in force; an invalid file
/// changes nothing.
fn reload(args: &Args, reloader: &shardcast::server::Reloader, set_level: &SetLevel, why: &str) {
    let path = args.config.display();
    let new = match config(args) {
        Ok(new) => new,
        Err(e) => {
            reloader.refused();
            tracing::error!(config = %path, "reload ({why}) refused, the configuration in force stays: {e}");
            return;
        }
    };
    let reloaded = reloader.reload(new);
    if !reloaded.restart.is_empty() {
        tracing::warn!(
            config = %path,
            settings = reloaded.restart.join(", "),
            "changed settings that take effect only after a restart"
        );
    }
    if reloaded.changed {
        set_level(&reloaded.config.log.level);
        tracing::info!(config = %path, "configuration reloaded ({why})");
    } else {
        tracing::info!(config = %path, "configuration reloaded ({why}): nothing to change");
    }
}

/// `shardcast check-config`.
fn check_config(args: &Args) -> ExitCode {
    match config(args).and_then(|c| c.masked()) {
        Ok(text) => {
            print!("{text}");
            eprintln!("{}: the configuration is valid", args.config.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", args.config.display());
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    // No transparent huge pages, for every mapping of the process (the allocator's and
    // glommio's ask for them with MADV_HUGEPAGE): the first touch of each 2 MiB page zeroes
    // it inside whichever request touched it, 2.5-8 ms on these VMs, which was most of
    // paced ingest's p99. Before anything is allocated, so that no mapping gets one.
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and changes only this process's flags.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    let args = Args::parse();
    if let Some(Command::CheckConfig) = args.command {
        return check_config(&args);
    }
    let config = match config(&args) {
        Ok(config) => config,
        Err(e) => {
            // Before logging is set up: how is part of the configuration.
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let set_level = init_logs(&config.log);
    let watch_ms = config.watch_config_ms;
    let server = match shardcast::server::start(config) {
        Ok(server) => server,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    };
    // Scripts and tests read the real address (the configured port may be 0) from stdout.
    println!("shardcast listening on ws://{}/ws", server.local_addr());
    if let Some(tls) = server.tls_addr() {
        println!("shardcast listening on wss://{tls}/ws");
    }
    let stopper = server.stopper();
    let (args, reloader) = (std::sync::Arc::new(args), server.reloader());
    let set_level = std::sync::Arc::new(set_level);
    if watch_ms > 0 {
        let (args, reloader, set_level) = (args.clone(), reloader.clone(), set_level.clone());
        let every = std::time::Duration::from_millis(watch_ms);
        shardcast::reload::watch(args.config.clone(), every, move || {
            reload(&args, &reloader, &set_level, "the file changed")
        });
    }
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]);
    match signals {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                let mut seen = 0;
                for signal in signals.forever() {
                    if signal == signal_hook::consts::SIGHUP {
                        reload(&args, &reloader, &set_level, "SIGHUP");
                        continue;
                    }
                    seen += 1;
                    if seen > 1 {
                        tracing::warn!("second signal: exiting without draining");
                        std::process::exit(130);
                    }
                    tracing::info!(signal, "shutting down: draining connections");
                    stopper.stop();
                }
            });
        }
        Err(e) => tracing::warn!("cannot watch signals ({e}); stop with SIGKILL"),
    }
    server.join();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
