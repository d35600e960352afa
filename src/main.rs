//! The `leadconv` command line: parses and dispatches to `cli/`.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use leadconv::config::Services;
use leadconv::error::Refusal;

#[derive(Parser)]
#[command(
    name = "leadconv",
    version,
    about = "Bulk conversion of CRM leads into accounts, contacts and deals",
    long_about = "Bulk conversion of CRM leads into accounts, contacts and deals.\n\n\
        A producer (`enqueue`) snapshots the leads matching criteria into a conversion job in Postgres and \
        publishes one message per lead to RabbitMQ; workers (`worker`) convert each lead in one transaction \
        and record the result. `status`, `results` and `cancel` follow and steer jobs.\n\n\
        Exit codes: 0 done, 2 bad input (nothing was written or published), 1 anything else."
)]
struct Cli {
    #[command(flatten)]
    services: Services,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the CRM and job tables (idempotent).
    Migrate(cli::admin::Migrate),
    /// Create a conversion job from criteria and options and publish its leads.
    ///
    /// Prints the job id (or, with --dry-run, what each lead would become).
    /// Bad criteria or options exit with code 2 and change nothing.
    Enqueue(cli::jobs::Enqueue),
    /// Convert leads from the queues until stopped (SIGTERM/SIGINT finish in-flight conversions first).
    Worker(cli::services::Worker),
    /// Serve the HTTP API (/v1), /metrics, /healthz, /readyz and /openapi.json.
    Serve(cli::services::Serve),
    /// Manage API tokens.
    #[command(subcommand)]
    Token(cli::admin::TokenCommand),
    /// Manage conversion rules: a lead inserted or updated so that it matches
    /// an enabled rule is converted by a one-lead workflow job (run by `serve`).
    #[command(subcommand)]
    Rule(cli::automation::RuleCommand),
    /// Manage conversion schedules: `serve` creates one schedule job per due
    /// cron tick (5 fields, UTC; missed ticks collapse into one run).
    #[command(subcommand)]
    Schedule(cli::automation::ScheduleCommand),
    /// Show a job: status, counts, rate and ETA.
    Status(cli::jobs::Status),
    /// Export a job's per-lead results.
    Results(cli::jobs::Results),
    /// Cancel a job: its pending leads become skipped (cancelled).
    Cancel(cli::jobs::Cancel),
    /// Publish every pending lead of a job again, e.g. after RabbitMQ lost
    /// its queues' contents. Leads whose message was not lost get it twice,
    /// which is harmless: a lead is converted once.
    Republish(cli::jobs::Republish),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.services.init_logging();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let refused = e.downcast_ref::<leadconv::Error>().and_then(|e| match e {
                leadconv::Error::Refused(r) => Some(r.clone()),
                _ => None,
            });
            match refused.or_else(|| e.downcast_ref::<Refusal>().cloned()) {
                Some(r) => {
                    eprintln!("refused: {}: {} ({})", r.field, r.message, r.code);
                    ExitCode::from(leadconv::error::answer(r.code).1)
                }
                None => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let s = &cli.services;
    match cli.command {
        Command::Migrate(c) => c.run(s).await,
        Command::Enqueue(c) => c.run(s).await,
        Command::Worker(c) => c.run(s).await,
        Command::Serve(c) => c.run(s).await,
        Command::Token(c) => c.run(s).await,
        Command::Rule(c) => c.run(s).await,
        Command::Schedule(c) => c.run(s).await,
        Command::Status(c) => c.run(s).await,
        Command::Results(c) => c.run(s).await,
        Command::Cancel(c) => c.run(s).await,
        Command::Republish(c) => c.run(s).await,
    }
}
