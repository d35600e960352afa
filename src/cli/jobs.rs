//! Job commands: `enqueue` (or a dry run), `status`, `results`, `cancel`,
//! `republish`.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use lapin::options::ConfirmSelectOptions;
use leadconv::config::Services;
use leadconv::queue::{self, producer, Lane};
use leadconv::report;
use leadconv::store::convert;
use leadconv::store::db;
use leadconv::store::job::{self, Dispatch, NewJob, Trigger};
use leadconv::store::types::{JobStatus, Outcome};
use uuid::Uuid;

use super::{json_arg, parse_secs, say};

#[derive(Args)]
pub struct Enqueue {
    /// Criteria as JSON, or @FILE. E.g. '{"field": "lead_status", "op": "eq", "value": "Qualified"}',
    /// '{"ids": [1, 2]}', '{"all_leads": true}'.
    #[arg(long)]
    pub criteria: String,
    /// Options as JSON, or @FILE. E.g. '{"create_deal": true, "deal": {"closing_date": "+30d", "stage": "Qualification"}}'.
    #[arg(long, default_value = "{}")]
    pub options: String,
    /// The acting user: needs can_convert and active.
    #[arg(long)]
    pub requested_by: i64,
    /// Who asks for the job, as recorded on it: `manual` for a person at the
    /// command line, `schedule` for a cron job, `workflow` for at most 100
    /// leads named by id (`{"ids": [...]}`), converted in the fast lane
    /// ahead of bulk jobs.
    #[arg(long, value_enum, default_value_t = Trigger::Manual)]
    pub trigger: Trigger,
    /// Report what each lead would become, writing and publishing nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Machine-readable output (JSON; JSON lines for --dry-run).
    #[arg(long)]
    pub json: bool,
    /// How long this process holds the job's publisher lease between
    /// batches; after that a worker's sweeper takes over publishing.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub lease_secs: Duration,
    /// Messages published before their confirms are awaited.
    #[arg(long, default_value_t = producer::BATCH)]
    pub batch_size: i64,
}

impl Enqueue {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let Enqueue { criteria, options, requested_by, trigger, dry_run, json, lease_secs, batch_size } = self;
        let criteria = json_arg("criteria", &criteria)?;
        let trigger = job::check_caller_trigger(trigger, &criteria, true)?;
        let new = NewJob { criteria, options: json_arg("options", &options)?, requested_by, trigger };
        let pool = db::connect_migrated(&s.database_url, 2).await?;
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
                say(format!("{n} leads would be processed: {summary}"))?;
                if let Some(line) = report::unmapped_line(&checked.settings) {
                    say(line)?;
                }
            }
            return Ok(());
        }
        let lane = Lane::for_trigger(trigger);
        create_and_publish(s, &pool, lane, json, lease_secs, batch_size, |dispatch| {
            job::create(&pool, &checked, dispatch)
        })
        .await
    }
}

/// Creates a job with `create` and publishes its leads on `lane`, printing
/// its id (or, with `json`, its id and size) as soon as it exists. The
/// broker is checked before anything is written, so an unreachable
/// RabbitMQ refuses the job instead of leaving one.
async fn create_and_publish<F, Fut>(
    s: &Services,
    pool: &sqlx::PgPool,
    lane: Lane,
    json: bool,
    lease_secs: Duration,
    batch_size: i64,
    create: F,
) -> anyhow::Result<()>
where
    F: FnOnce(Dispatch) -> Fut,
    Fut: std::future::Future<Output = Result<job::Job, leadconv::Error>>,
{
    let topology = s.topology();
    let conn = queue::connect(&s.amqp_url).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    topology.declare(&ch).await?;
    let lease = producer::Lease::new(lease_secs);
    let created = create(Dispatch::Queue { lease }).await?;
    if json {
        let mut out = serde_json::json!({"job_id": created.id, "total_count": created.total_count});
        if let Some(of) = created.retry_of {
            out["retry_of"] = serde_json::json!(of);
        }
        if let Some(of) = created.undo_of {
            out["undo_of"] = serde_json::json!(of);
        }
        say(out)?;
    } else {
        say(created.id)?;
    }
    std::io::stdout().flush()?;
    let (mut conn, mut ch) = (conn, ch);
    // With a cluster's addresses, a lost node is one of several: go on
    // through each other node once. Nacks (a quorum queue whose leader was
    // lost refuses messages until its other members have elected another)
    // are answered by publishing again on a fresh channel after a pause,
    // for about a minute. Either way publish_job resumes past the confirmed
    // watermark; a message sent twice converts nothing twice.
    let mut reconnects = queue::Brokers::parse(&s.amqp_url).map_or(0, |b| b.nodes().len().saturating_sub(1));
    let mut pause = Duration::from_millis(250);
    let nacks_until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match producer::publish_job(pool, &ch, &topology, created.id, lane, &lease, batch_size).await {
            Ok(published) => tracing::info!(job_id = %created.id, published, "enqueued"),
            Err(producer::PublishError::Nacked(_)) if std::time::Instant::now() < nacks_until => {
                tracing::warn!(job_id = %created.id, "RabbitMQ refused a message; publishing again in {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(4));
                let fresh = async {
                    let channel = conn.create_channel().await?;
                    channel.confirm_select(ConfirmSelectOptions::default()).await?;
                    lapin::Result::Ok(channel)
                };
                match fresh.await {
                    Ok(channel) => ch = channel,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not open a fresh channel; publishing again on the old one")
                    }
                }
                continue;
            }
            Err(producer::PublishError::Broker(e)) if reconnects > 0 => {
                reconnects -= 1;
                tracing::warn!(job_id = %created.id, error = %e, "lost the RabbitMQ node while publishing; going on through another");
                let reopened = async {
                    let c = queue::connect(&s.amqp_url).await?;
                    let channel = c.create_channel().await?;
                    channel.confirm_select(ConfirmSelectOptions::default()).await?;
                    topology.declare(&channel).await?;
                    anyhow::Ok((c, channel))
                };
                match reopened.await {
                    Ok((c, channel)) => {
                        (conn, ch) = (c, channel);
                        continue;
                    }
                    Err(e) => lost_broker(s, pool, created.id, &lease, &e.to_string()).await?,
                }
            }
            // The job exists and its outbox is in Postgres: losing RabbitMQ
            // now delays it, it does not fail it.
            Err(e @ (producer::PublishError::Broker(_) | producer::PublishError::Nacked(_))) => {
                lost_broker(s, pool, created.id, &lease, &e.to_string()).await?
            }
            Err(e @ producer::PublishError::LeaseLost(_)) => eprintln!("warning: {e}; it publishes the rest"),
            Err(e) => return Err(e.into()),
        }
        break;
    }
    let _ = conn.close(200, "bye").await;
    Ok(())
}

/// Gives the lease up at once, so that a worker's sweeper publishes the
/// rest of the job without waiting for it to run out, and says so.
async fn lost_broker(
    s: &Services,
    pool: &sqlx::PgPool,
    job_id: uuid::Uuid,
    lease: &producer::Lease,
    error: &str,
) -> anyhow::Result<()> {
    producer::release(pool, job_id, lease).await?;
    eprintln!(
        "warning: lost {} while publishing job {job_id} ({error}); the workers publish the rest of its leads",
        queue::describe(&s.amqp_url)
    );
    Ok(())
}

#[derive(Args)]
pub struct Retry {
    /// The job whose failed (or skipped) leads to convert again.
    pub job_id: Uuid,
    /// Which leads: `failed` ones, or `skipped` ones (say, those a cancel left).
    #[arg(long, value_enum, default_value_t = Outcome::Failed)]
    pub outcome: Outcome,
    /// Only the leads that ended with this error code (e.g. missing_mandatory_field).
    #[arg(long)]
    pub code: Option<String>,
    /// The acting user (needs can_convert and active); by default whoever
    /// asked for the earlier job.
    #[arg(long)]
    pub requested_by: Option<i64>,
    /// Machine-readable output: the new job's id, size and the job it retries.
    #[arg(long)]
    pub json: bool,
    /// How long this process holds the job's publisher lease between
    /// batches; after that a worker's sweeper takes over publishing.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub lease_secs: Duration,
}

impl Retry {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let pool = db::connect_migrated(&s.database_url, 2).await?;
        let of = job::RetryOf { job_id: self.job_id, outcome: self.outcome, code: self.code };
        let new = job::retry_request(&pool, &of, self.requested_by, Trigger::Manual).await?;
        let checked = job::check(&pool, new).await?;
        create_and_publish(s, &pool, Lane::Bulk, self.json, self.lease_secs, producer::BATCH, |dispatch| {
            job::create_retry(&pool, &checked, of.job_id, None, dispatch)
        })
        .await
    }
}

#[derive(Args)]
pub struct Status {
    /// The job's id, as printed by `enqueue`.
    pub job_id: Uuid,
    /// Machine-readable output: one JSON object (per change with --watch).
    #[arg(long)]
    pub json: bool,
    /// Follow the job until it finishes: a progress bar on a terminal, a
    /// line per change otherwise. Exits 1 when the job ends failed or cancelled.
    #[arg(long)]
    pub watch: bool,
}

impl Status {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let pool = db::connect_migrated(&s.database_url, 2).await?;
        if let Some(job) = job::get(&pool, self.job_id).await? {
            if !job.is_finished() && job.pending_count() > 0 {
                warn_without_consumer(s, Lane::for_trigger(job.trigger)).await;
            }
        }
        report::status(&pool, self.job_id, self.json, self.watch).await
    }
}

/// Says on stderr when no worker consumes `lane`'s queue: a job there would
/// otherwise sit `scheduled` with no hint why. Best effort: an unreachable
/// broker is reported, not fatal (status reads Postgres only).
async fn warn_without_consumer(s: &Services, lane: Lane) {
    let topology = s.topology();
    let queue = topology.work_queue(lane);
    let state = async {
        let conn = queue::connect(&s.amqp_url).await?;
        let ch = conn.create_channel().await?;
        let state = topology.state(&ch, &queue).await;
        let _ = conn.close(200, "bye").await;
        anyhow::Ok(state?)
    };
    match state.await {
        Ok(q) if q.consumers == 0 => eprintln!(
            "warning: no worker consumes {queue} on {}: the job's leads wait until one runs (`leadconv worker`)",
            queue::describe(&s.amqp_url)
        ),
        Ok(_) => {}
        Err(e) => eprintln!("warning: cannot tell whether a worker consumes {queue}: {e:#}"),
    }
}

#[derive(Args)]
pub struct Jobs {
    /// Only jobs in this status.
    #[arg(long, value_enum)]
    pub status: Option<JobStatus>,
    /// Only jobs made by this trigger.
    #[arg(long, value_enum)]
    pub trigger: Option<Trigger>,
    /// At most this many jobs, newest first.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i64).range(1..=10_000))]
    pub limit: i64,
    /// One JSON object per line instead of one text line per job.
    #[arg(long)]
    pub json: bool,
}

impl Jobs {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let pool = db::connect_migrated(&s.database_url, 2).await?;
        for j in job::list(&pool, self.status, self.trigger, None, self.limit, 0).await? {
            let p = report::Progress::of(j);
            say(if self.json { serde_json::to_string(&p)? } else { p.line() })?;
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct Results {
    /// The job's id, as printed by `enqueue`.
    pub job_id: Uuid,
    /// Only the leads with this outcome.
    #[arg(long, value_enum)]
    pub outcome: Option<Outcome>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = report::Format::Jsonl)]
    pub format: report::Format,
}

impl Results {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let pool = db::connect_migrated(&s.database_url, 2).await?;
        report::results(&pool, self.job_id, self.outcome, self.format).await
    }
}

#[derive(Args)]
pub struct Cancel {
    /// The job's id, as printed by `enqueue`.
    pub job_id: Uuid,
}

impl Cancel {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let pool = db::connect_migrated(&s.database_url, 2).await?;
        let job = job::cancel(&pool, self.job_id).await?;
        say(format!(
            "cancelled job {}: converted {}, skipped {}, failed {} of {}",
            job.id, job.converted_count, job.skipped_count, job.failed_count, job.total_count
        ))?;
        Ok(())
    }
}

#[derive(Args)]
pub struct Republish {
    /// The job's id, as printed by `enqueue`.
    pub job_id: Uuid,
    /// Publisher lease, renewed after each confirmed batch.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub lease_secs: Duration,
}

impl Republish {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let Republish { job_id, lease_secs } = self;
        let topology = s.topology();
        let pool = db::connect_migrated(&s.database_url, 2).await?;
        let conn = queue::connect(&s.amqp_url).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        topology.declare(&ch).await?;
        let lease = producer::Lease::new(lease_secs);
        let trigger = job::rewind_outbox(&pool, job_id, &lease).await?;
        let lane = Lane::for_trigger(trigger);
        let published = producer::publish_job(&pool, &ch, &topology, job_id, lane, &lease, producer::BATCH).await?;
        say(format!("republished job {job_id}: {published} pending leads"))?;
        let _ = ch.close(200, "bye").await;
        let _ = conn.close(200, "bye").await;
        Ok(())
    }
}

#[derive(Args)]
pub struct Undo {
    /// The converted job whose conversions to take back.
    pub job_id: Uuid,
    /// Print what each lead's undo would do (and a summary); change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Machine-readable output: the undo job's id and size, or (with
    /// --dry-run) one JSON object per lead.
    #[arg(long)]
    pub json: bool,
    /// The undo job's acting user (active, may convert); by default whoever
    /// asked for the converted job.
    #[arg(long)]
    pub requested_by: Option<i64>,
    /// Only this lead (repeatable); by default every lead the job converted.
    #[arg(long = "lead")]
    pub leads: Vec<i64>,
    /// How long this process holds the job's publisher lease between
    /// batches; after that a worker's sweeper takes over publishing.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub lease_secs: Duration,
}

impl Undo {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let pool = db::connect_migrated(&s.database_url, 2).await?;
        let of = job::UndoOf { job_id: self.job_id, lead_ids: (!self.leads.is_empty()).then_some(self.leads) };
        if self.dry_run {
            let verdicts = leadconv::store::undo::dry_run(&pool, &of).await?;
            for (lead_id, v) in &verdicts {
                if self.json {
                    let mut line = serde_json::to_value(v)?;
                    line["lead_id"] = (*lead_id).into();
                    say(line)?;
                } else {
                    say(leadconv::report::undo_line(*lead_id, v))?;
                }
            }
            if !self.json {
                say(leadconv::report::undo_summary(&verdicts))?;
            }
            return Ok(());
        }
        create_and_publish(s, &pool, Lane::Bulk, self.json, self.lease_secs, producer::BATCH, |dispatch| {
            job::create_undo(&pool, &of, self.requested_by, None, Trigger::Manual, dispatch)
        })
        .await
    }
}

#[derive(Args)]
pub struct History {
    /// The record's module: lead, account, contact or deal.
    #[arg(value_parser = parse_module)]
    pub module: leadconv::record::Module,
    /// The record's id.
    pub id: i64,
    /// Machine-readable output: one JSON object per event.
    #[arg(long)]
    pub json: bool,
}

fn parse_module(raw: &str) -> Result<leadconv::record::Module, String> {
    leadconv::record::Module::parse(raw)
        .ok_or_else(|| format!("{raw:?} is not a module: write lead, account, contact or deal"))
}

impl History {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let pool = db::connect_migrated(&s.database_url, 2).await?;
        let events = leadconv::store::history::of(&pool, self.module, self.id, None).await?;
        if events.is_empty() && !self.json {
            say(format!("no conversion or undo touched {} {}", self.module.as_str(), self.id))?;
        }
        for e in events {
            if self.json {
                say(serde_json::to_string(&e)?)?;
                continue;
            }
            let asked = e.asked_by.map(|u| format!(" (asked by user {u})")).unwrap_or_default();
            let changes: Vec<String> =
                e.changes.iter().map(|c| format!("{}: {} → {}", c.field, c.before, c.after)).collect();
            say(format!(
                "{} {} job {} lead {} by user {}{asked}: {:?}; {}",
                e.at.to_rfc3339(),
                e.kind,
                e.job_id,
                e.lead_id,
                e.by,
                e.what,
                changes.join(", ")
            ))?;
        }
        Ok(())
    }
}
