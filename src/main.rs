//! The `leadconv` command line.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use lapin::options::ConfirmSelectOptions;
use leadconv::bench;
use leadconv::demo;
use leadconv::error::{ErrorCode, Refusal};
use leadconv::http::serve;
use leadconv::queue::producer;
use leadconv::queue::worker;
use leadconv::queue::{self, Lane, Topology};
use leadconv::report;
use leadconv::seed;
use leadconv::shutdown;
use leadconv::store::convert;
use leadconv::store::db;
use leadconv::store::job::{self, Dispatch, NewJob, Trigger};
use serde_json::Value;
use uuid::Uuid;

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
    /// Postgres holding the CRM tables.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/leadconv",
        global = true,
        hide_env_values = true
    )]
    database_url: String,

    /// RabbitMQ carrying the lead messages.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true,
        hide_env_values = true
    )]
    amqp_url: String,

    /// Prefix of every exchange and queue name, to share a broker.
    #[arg(long, env = "LEADCONV_QUEUE_PREFIX", default_value = "leadconv", global = true)]
    queue_prefix: String,

    /// Log lines as text for people or JSON for log collectors.
    #[arg(long, env = "LEADCONV_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the CRM and job tables (idempotent).
    Migrate {
        /// Also create the database when it does not exist.
        #[arg(long)]
        create_database: bool,
    },
    /// Create a conversion job from criteria and options and publish its leads.
    ///
    /// Prints the job id (or, with --dry-run, what each lead would become).
    /// Bad criteria or options exit with code 2 and change nothing.
    Enqueue {
        /// Criteria as JSON, or @FILE. E.g. '{"field": "lead_status", "op": "eq", "value": "Qualified"}',
        /// '{"ids": [1, 2]}', '{"all_leads": true}'.
        #[arg(long)]
        criteria: String,
        /// Options as JSON, or @FILE. E.g. '{"create_deal": true, "deal": {"closing_date": "+30d", "stage": "Qualification"}}'.
        #[arg(long, default_value = "{}")]
        options: String,
        /// The acting user: needs can_convert and active.
        #[arg(long)]
        requested_by: i64,
        #[arg(long, value_enum, default_value_t = Trigger::Manual)]
        trigger: Trigger,
        /// Report what each lead would become, writing and publishing nothing.
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable output (JSON; JSON lines for --dry-run).
        #[arg(long)]
        json: bool,
        /// How long this process holds the job's publisher lease between
        /// batches; after that a worker's sweeper takes over publishing.
        #[arg(long, default_value = "30", value_parser = parse_secs)]
        lease_secs: Duration,
        /// Messages published before their confirms are awaited.
        #[arg(long, default_value_t = producer::BATCH)]
        batch_size: i64,
    },
    /// Convert leads from the queues until stopped (SIGTERM/SIGINT finish in-flight conversions first).
    Worker {
        /// Bulk conversions in flight at once.
        #[arg(long, default_value_t = 8)]
        concurrency: u16,
        /// Workflow-triggered conversions in flight at once, reserved beside the bulk ones.
        #[arg(long, default_value_t = 2)]
        workflow_concurrency: u16,
        /// Exit once the queues are empty and no job waits to be published.
        #[arg(long)]
        exit_when_idle: bool,
        /// Publisher lease used when this worker takes over an orphaned job's outbox.
        #[arg(long, default_value = "30", value_parser = parse_secs)]
        lease_secs: Duration,
        /// Serve Prometheus metrics (/metrics) and /healthz on this address.
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Serve the HTTP API (/v1), /metrics, /healthz, /readyz and /openapi.json.
    Serve {
        #[arg(long, env = "LEADCONV_LISTEN", default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage conversion rules: a lead inserted or updated so that it matches
    /// an enabled rule is converted by a one-lead workflow job (run by `serve`).
    #[command(subcommand)]
    Rule(RuleCommand),
    /// Manage conversion schedules: `serve` creates one schedule job per due
    /// cron tick (5 fields, UTC; missed ticks collapse into one run).
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Show a job: status, counts, rate and ETA.
    Status {
        job_id: Uuid,
        #[arg(long)]
        json: bool,
        /// Follow the job with a live progress bar until it finishes.
        #[arg(long)]
        watch: bool,
    },
    /// Export a job's per-lead results.
    Results {
        job_id: Uuid,
        #[arg(long, value_enum)]
        outcome: Option<Outcome>,
        #[arg(long, value_enum, default_value_t = report::Format::Jsonl)]
        format: report::Format,
    },
    /// Cancel a job: its pending leads become skipped (cancelled).
    Cancel { job_id: Uuid },
    /// Publish every pending lead of a job again, e.g. after RabbitMQ lost
    /// its queues' contents. Leads whose message was not lost get it twice,
    /// which is harmless: a lead is converted once.
    Republish {
        job_id: Uuid,
        /// Publisher lease, renewed after each confirmed batch.
        #[arg(long, default_value = "30", value_parser = parse_secs)]
        lease_secs: Duration,
    },
    /// Insert sample users, contacts, accounts and leads.
    Seed {
        #[arg(long, default_value_t = 1000)]
        leads: usize,
        /// Share of leads duplicating an existing e-mail or company (0–1).
        #[arg(long, default_value_t = 0.3)]
        duplicates: f64,
        #[arg(long, default_value_t = 2026)]
        rng_seed: u64,
    },
    /// Create the database if missing, migrate, seed sample leads and
    /// convert them all in one job through RabbitMQ.
    Demo {
        #[arg(long, default_value_t = 2000)]
        leads: usize,
        #[arg(long, default_value_t = 0.3)]
        duplicates: f64,
        /// Conversions running at once.
        #[arg(long, default_value_t = 8)]
        concurrency: u16,
    },
    /// Measure end-to-end throughput through RabbitMQ against direct conversion.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a bearer token for a user and print it once (only its hash is stored).
    Create {
        #[arg(long)]
        user: i64,
        /// A label to recognise the token by.
        #[arg(long, default_value = "")]
        name: String,
    },
}

#[derive(Subcommand)]
enum RuleCommand {
    /// Create a rule (criteria, options and acting user checked as a job's; exit 2 when refused).
    Add {
        #[arg(long)]
        name: String,
        /// Criteria as JSON, or @FILE.
        #[arg(long)]
        criteria: String,
        /// Options as JSON, or @FILE.
        #[arg(long, default_value = "{}")]
        options: String,
        /// The user the rule's conversions act as: needs can_convert and active.
        #[arg(long)]
        acting_user: i64,
        /// Create the rule disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List rules.
    List {
        #[arg(long)]
        json: bool,
    },
    Enable {
        id: i64,
    },
    Disable {
        id: i64,
    },
    Delete {
        id: i64,
    },
}

#[derive(Subcommand)]
enum ScheduleCommand {
    /// Create a schedule (cron, criteria, options and acting user checked; exit 2 when refused).
    Add {
        #[arg(long)]
        name: String,
        /// Standard 5-field cron expression in UTC, e.g. "0 2 * * *".
        #[arg(long)]
        cron: String,
        /// Criteria as JSON, or @FILE.
        #[arg(long)]
        criteria: String,
        /// Options as JSON, or @FILE.
        #[arg(long, default_value = "{}")]
        options: String,
        /// The user the schedule's jobs act as: needs can_convert and active.
        #[arg(long)]
        acting_user: i64,
        /// Create the schedule disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List schedules.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Enable a schedule; its next run is the first tick after now.
    Enable {
        id: i64,
    },
    Disable {
        id: i64,
    },
    Delete {
        id: i64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Outcome {
    Pending,
    Converted,
    Skipped,
    Failed,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a positive number of seconds"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,leadconv=info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().with_current_span(true).init(),
        LogFormat::Text => logs.init(),
    }
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
                    ExitCode::from(2)
                }
                None => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Reads a JSON argument given inline or as @FILE.
fn json_arg(name: &str, raw: &str) -> anyhow::Result<Value> {
    let text = match raw.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| Refusal::new(ErrorCode::InvalidOption, name, format!("cannot read {path}: {e}")))?,
        None => raw.to_owned(),
    };
    let code = if name == "criteria" { ErrorCode::InvalidCriteria } else { ErrorCode::InvalidOption };
    serde_json::from_str(&text).map_err(|e| Refusal::new(code, name, format!("not valid JSON: {e}")).into())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let topology = Topology::new(cli.queue_prefix.clone());
    match cli.command {
        Command::Migrate { create_database } => {
            if create_database && db::create_database_if_missing(&cli.database_url).await? {
                println!("created the database");
            }
            let pool = db::connect(&cli.database_url, 2).await?;
            db::migrate(&pool).await?;
            println!("migrated");
        }
        Command::Enqueue { criteria, options, requested_by, trigger, dry_run, json, lease_secs, batch_size } => {
            let new = NewJob {
                criteria: json_arg("criteria", &criteria)?,
                options: json_arg("options", &options)?,
                requested_by,
                trigger,
            };
            let pool = db::connect(&cli.database_url, 2).await?;
            let checked = job::check(&pool, new).await?;
            if dry_run {
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                let mut summary = report::PlanSummary::default();
                let n = convert::dry_run(&pool, &checked.settings, &checked.criteria, |plan| {
                    summary.add(&plan);
                    if json {
                        serde_json::to_writer(&mut out, &plan)?;
                        writeln!(out)
                    } else {
                        writeln!(out, "{}", report::plan_line(&plan))
                    }
                })
                .await?;
                out.flush()?;
                if !json {
                    println!("{n} leads would be processed: {summary}");
                }
                return Ok(());
            }
            // The broker is checked before anything is written, so an
            // unreachable RabbitMQ refuses the job instead of leaving one.
            let conn = queue::connect(&cli.amqp_url).await?;
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            topology.declare(&ch).await?;
            let created = job::create(&pool, &checked, Dispatch::Queue { lease: lease_secs }).await?;
            if json {
                println!("{}", serde_json::json!({"job_id": created.id, "total_count": created.total_count}));
            } else {
                println!("{}", created.id);
            }
            std::io::stdout().flush()?;
            let published = producer::publish_job(
                &pool,
                &ch,
                &topology,
                created.id,
                Lane::for_trigger(trigger.as_str()),
                lease_secs,
                batch_size,
            )
            .await?;
            tracing::info!(job_id = %created.id, published, "enqueued");
            let _ = conn.close(200, "bye").await;
        }
        Command::Worker { concurrency, workflow_concurrency, exit_when_idle, lease_secs, metrics } => {
            let pool =
                db::connect(&cli.database_url, u32::from(concurrency) + u32::from(workflow_concurrency) + 2).await?;
            let mut cfg = worker::WorkerConfig::new(cli.amqp_url.clone(), topology);
            cfg.concurrency = concurrency;
            cfg.workflow_concurrency = workflow_concurrency;
            cfg.exit_when_idle = exit_when_idle;
            cfg.lease = lease_secs;
            let stop = shutdown::on_signal();
            if let Some(addr) = metrics {
                leadconv::metrics::install();
                let stop = stop.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve::metrics_only(addr, stop).await {
                        tracing::error!(error = %e, "metrics listener failed");
                    }
                });
            }
            worker::run(pool, cfg, stop).await?;
        }
        Command::Serve { listen } => {
            let pool = db::connect(&cli.database_url, 16).await?;
            let cfg = serve::ServeConfig { listen, amqp_url: cli.amqp_url.clone(), topology };
            serve::run(pool, cfg, shutdown::on_signal()).await?;
        }
        Command::Token(TokenCommand::Create { user, name }) => {
            let pool = db::connect(&cli.database_url, 2).await?;
            println!("{}", leadconv::store::auth::create_token(&pool, user, &name).await?);
        }
        Command::Rule(cmd) => rule_command(&cli.database_url, cmd).await?,
        Command::Schedule(cmd) => schedule_command(&cli.database_url, cmd).await?,
        Command::Status { job_id, json, watch } => {
            let pool = db::connect(&cli.database_url, 2).await?;
            report::status(&pool, job_id, json, watch).await?;
        }
        Command::Results { job_id, outcome, format } => {
            let pool = db::connect(&cli.database_url, 2).await?;
            let outcome = outcome.map(|o| match o {
                Outcome::Pending => "pending",
                Outcome::Converted => "converted",
                Outcome::Skipped => "skipped",
                Outcome::Failed => "failed",
            });
            report::results(&pool, job_id, outcome, format).await?;
        }
        Command::Cancel { job_id } => {
            let pool = db::connect(&cli.database_url, 2).await?;
            let job = job::cancel(&pool, job_id).await?;
            println!(
                "cancelled job {}: converted {}, skipped {}, failed {} of {}",
                job.id, job.converted_count, job.skipped_count, job.failed_count, job.total_count
            );
        }
        Command::Republish { job_id, lease_secs } => {
            let pool = db::connect(&cli.database_url, 2).await?;
            let conn = queue::connect(&cli.amqp_url).await?;
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            topology.declare(&ch).await?;
            let trigger = job::rewind_outbox(&pool, job_id, lease_secs).await?;
            let lane = Lane::for_trigger(&trigger);
            let published =
                producer::publish_job(&pool, &ch, &topology, job_id, lane, lease_secs, producer::BATCH).await?;
            println!("republished job {job_id}: {published} pending leads");
            let _ = ch.close(200, "bye").await;
            let _ = conn.close(200, "bye").await;
        }
        Command::Seed { leads, duplicates, rng_seed } => {
            let pool = db::connect(&cli.database_url, 2).await?;
            let s = seed::seed(&pool, &seed::SeedSpec { leads, duplicates, rng_seed }).await?;
            println!("seeded {} leads; user {} may convert them", s.lead_ids.len(), s.acting_user);
        }
        Command::Demo { leads, duplicates, concurrency } => {
            db::create_database_if_missing(&cli.database_url).await?;
            let pool = db::connect(&cli.database_url, u32::from(concurrency) + 4).await?;
            db::migrate(&pool).await?;
            demo::run(&pool, &cli.amqp_url, &topology, &demo::DemoSpec { leads, duplicates, concurrency }).await?;
        }
        Command::Bench(args) => {
            bench::run(&cli.database_url, &cli.amqp_url, &args).await?;
        }
    }
    Ok(())
}

async fn rule_command(database_url: &str, cmd: RuleCommand) -> anyhow::Result<()> {
    use leadconv::automation::rules;
    let line = |r: &rules::Rule| {
        format!(
            "{}\t{}\t{}\tacting_user={}\t{}",
            r.id,
            r.name,
            if r.enabled { "enabled" } else { "disabled" },
            r.acting_user,
            r.criteria.0
        )
    };
    match cmd {
        RuleCommand::Add { name, criteria, options, acting_user, disabled } => {
            let new = rules::NewRule {
                name,
                criteria: json_arg("criteria", &criteria)?,
                options: json_arg("options", &options)?,
                acting_user,
                enabled: !disabled,
            };
            let pool = db::connect(database_url, 2).await?;
            println!("{}", rules::create(&pool, new).await?.id);
        }
        RuleCommand::List { json } => {
            let pool = db::connect(database_url, 2).await?;
            for r in rules::list(&pool).await? {
                println!("{}", if json { serde_json::to_string(&r)? } else { line(&r) });
            }
        }
        RuleCommand::Enable { id } | RuleCommand::Disable { id } => {
            let enabled = matches!(cmd, RuleCommand::Enable { .. });
            let pool = db::connect(database_url, 2).await?;
            println!("{}", line(&rules::set_enabled(&pool, id, enabled).await?));
        }
        RuleCommand::Delete { id } => {
            let pool = db::connect(database_url, 2).await?;
            rules::delete(&pool, id).await?;
            println!("deleted rule {id}");
        }
    }
    Ok(())
}

async fn schedule_command(database_url: &str, cmd: ScheduleCommand) -> anyhow::Result<()> {
    use leadconv::automation::schedule;
    let line = |s: &schedule::Schedule| {
        format!(
            "{}\t{}\t{}\t{}\tnext={}\tlast_job={}",
            s.id,
            s.name,
            s.cron,
            if s.enabled { "enabled" } else { "disabled" },
            s.next_run_at.to_rfc3339(),
            s.last_job_id.map(|j| j.to_string()).unwrap_or_else(|| "-".into())
        )
    };
    match cmd {
        ScheduleCommand::Add { name, cron, criteria, options, acting_user, disabled } => {
            let new = schedule::NewSchedule {
                name,
                cron,
                criteria: json_arg("criteria", &criteria)?,
                options: json_arg("options", &options)?,
                acting_user,
                enabled: !disabled,
            };
            let pool = db::connect(database_url, 2).await?;
            println!("{}", schedule::create(&pool, new).await?.id);
        }
        ScheduleCommand::List { json } => {
            let pool = db::connect(database_url, 2).await?;
            for s in schedule::list(&pool).await? {
                println!("{}", if json { serde_json::to_string(&s)? } else { line(&s) });
            }
        }
        ScheduleCommand::Enable { id } | ScheduleCommand::Disable { id } => {
            let enabled = matches!(cmd, ScheduleCommand::Enable { .. });
            let pool = db::connect(database_url, 2).await?;
            println!("{}", line(&schedule::set_enabled(&pool, id, enabled).await?));
        }
        ScheduleCommand::Delete { id } => {
            let pool = db::connect(database_url, 2).await?;
            schedule::delete(&pool, id).await?;
            println!("deleted schedule {id}");
        }
    }
    Ok(())
}
