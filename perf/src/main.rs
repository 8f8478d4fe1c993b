//! shardcast-bench: a load generator for shardcast and the servers it is compared with.
//!
//! Scenarios run on one thread (pin it with taskset): `connect`, `fanout`, `ingest`, `churn`.
//! Every scenario prints a table and can write JSON (`--json FILE`); `table` prints several
//! JSON results side by side and `plot` draws their latency percentile curves as SVG.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shardcast_bench::{connect, fanout, report};

#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
    /// Also write the result as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Open and hold N connections: connect rate, latency, server memory per connection.
    Connect(connect::Params),
    /// N subscribers, P publishers: deliveries/s, loss, order, publish→deliver latency.
    Fanout(fanout::Params),
    /// P publishers send INGEST with unique keys: acks/s and ack latency.
    Ingest(fanout::Params),
    /// Fan-out while connections open and close at --churn per second.
    Churn(fanout::Params),
    /// Print JSON results side by side.
    Table {
        /// Result files.
        files: Vec<PathBuf>,
    },
    /// Draw the latency percentile curves of JSON results as SVG.
    Plot {
        /// Result files.
        files: Vec<PathBuf>,
        /// Output SVG.
        #[arg(short, long, default_value = "latency.svg")]
        output: PathBuf,
        /// Title.
        #[arg(long, default_value = "publish → deliver latency")]
        title: String,
    },
}

fn load(files: &[PathBuf]) -> Result<Vec<report::Report>, String> {
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))
        })
        .collect()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.command {
        Command::Connect(p) => connect::run(p),
        Command::Fanout(p) => fanout::run(p, false, "fanout"),
        Command::Ingest(p) => fanout::run(p, true, "ingest"),
        Command::Churn(p) => {
            let mut p = p.clone();
            if p.churn == 0 {
                p.churn = 100;
            }
            fanout::run(&p, false, "churn")
        }
        Command::Table { files } => {
            return match load(files) {
                Ok(reports) => {
                    report::print_table(&reports);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Plot {
            files,
            output,
            title,
        } => {
            return match load(files).and_then(|r| {
                std::fs::write(output, report::plot_svg(&r, title)).map_err(|e| e.to_string())
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(report) => {
            report.print();
            if let Some(path) = &args.json {
                let text = serde_json::to_string_pretty(&report).unwrap_or_default();
                if let Err(e) = std::fs::write(path, text) {
                    eprintln!("cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
