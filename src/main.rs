//! The `leadconv` command line: parses and dispatches to `cli/`.

mod cli;

/// jemalloc rather than glibc's malloc, which kept the memory of thousands
/// of closed connections: after 4,100 slow clients had come and gone
/// (tests/slow_clients.rs), serve stayed at 56 MiB from 17 MiB before with
/// glibc, and at 60–78 MiB with mimalloc; jemalloc, whose background
/// threads purge freed pages, was back at 22 MiB within 8 s.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (`_RJEM_MALLOC_CONF` in the environment still
/// overrides them): freed pages go back to the system after a second rather
/// than ten. A worker whose batches all run at once (issue 22) peaked at
/// 99–105 MiB on a 100,000-lead job with the defaults, 85–86 MiB with these,
/// at the same rate; purging at once (0) cost a few percent of the rate.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"dirty_decay_ms:1000,muzzy_decay_ms:0\0";

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
    /// Create or upgrade the CRM and job tables (idempotent), or check them (--check).
    Migrate(cli::admin::Migrate),
    /// Check the installation: Postgres, schema, locale, RabbitMQ, queues,
    /// workers; one line per check, with the fix for each failing one.
    /// Exits 1 when a check fails.
    Doctor(cli::doctor::Doctor),
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
    /// List jobs, newest first: status, counts, rate and ETA of each.
    Jobs(cli::jobs::Jobs),
    /// Export a job's per-lead results.
    Results(cli::jobs::Results),
    /// Cancel a job: its pending leads become skipped (cancelled).
    Cancel(cli::jobs::Cancel),
    /// Convert the failed (or skipped) leads of a job again, as a new job
    /// with the same options that names the first (`retry_of`).
    Retry(cli::jobs::Retry),
    /// Take back the conversions of a finished job, lead by lead, from its
    /// journal (SPEC §4a): a new job (`undo_of`) through the same queue and
    /// workers. Work people did since is never destroyed: such a lead is
    /// skipped with a code naming the record. --dry-run shows each lead's.
    Undo(cli::jobs::Undo),
    /// Every conversion and undo that created or changed a lead, account,
    /// contact or deal: when, by whom, which job and lead, each field
    /// before and after.
    History(cli::jobs::History),
    /// Publish every pending lead of a job again, e.g. after RabbitMQ lost
    /// its queues' contents. Leads whose message was not lost get it twice,
    /// which is harmless: a lead is converted once.
    Republish(cli::jobs::Republish),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // `doctor` probes queues that may not exist, which lapin logs as
    // errors: its own lines say all there is to say.
    let quiet = matches!(cli.command, Command::Doctor(_));
    cli.services.init_logging(if quiet { "error,lapin=off" } else { "warn,leadconv=info" });
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`leadconv results | head -1`): it has all it
        // wanted, so this is not an error worth a message.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
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

/// Whether writing to stdout failed because its reader closed it, however
/// the writer wrapped the I/O error (serde_json and csv hide it from
/// `source()`).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let kind = c
            .downcast_ref::<std::io::Error>()
            .map(std::io::Error::kind)
            .or_else(|| c.downcast_ref::<serde_json::Error>().and_then(serde_json::Error::io_error_kind))
            .or_else(|| match c.downcast_ref::<csv::Error>().map(csv::Error::kind) {
                Some(csv::ErrorKind::Io(io)) => Some(io.kind()),
                _ => None,
            });
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
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
        Command::Jobs(c) => c.run(s).await,
        Command::Doctor(c) => c.run(s).await,
        Command::Results(c) => c.run(s).await,
        Command::Cancel(c) => c.run(s).await,
        Command::Retry(c) => c.run(s).await,
        Command::Undo(c) => c.run(s).await,
        Command::History(c) => c.run(s).await,
        Command::Republish(c) => c.run(s).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag and argument of every command says what it is for in
    /// `--help` (issue 13: many had no text at all).
    #[test]
    fn every_flag_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{}", arg.get_long().unwrap_or(id)));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_long_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (command)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "leadconv", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
    }

    /// `serve`'s flags default to the listener's own defaults, which
    /// `worker --metrics` uses.
    #[test]
    fn serve_defaults_to_the_listeners_limits() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from(["leadconv", "serve"]).unwrap();
        let super::Command::Serve(serve) = cli.command else { panic!("serve parses as serve") };
        assert_eq!(serve.clients.limits(), leadconv::http::listener::Limits::DEFAULT);
        assert!(super::Cli::try_parse_from(["leadconv", "serve", "--idle-timeout-secs", "61"]).is_err());
    }
}
