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
use leadconv::store::types::Outcome;
use uuid::Uuid;

use super::{json_arg, parse_secs};

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
        let topology = s.topology();
        let new = NewJob {
            criteria: json_arg("criteria", &criteria)?,
            options: json_arg("options", &options)?,
            requested_by,
            trigger,
        };
        let pool = db::connect(&s.database_url, 2).await?;
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
        let conn = queue::connect(&s.amqp_url).await?;
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
            Lane::for_trigger(trigger),
            lease_secs,
            batch_size,
        )
        .await?;
        tracing::info!(job_id = %created.id, published, "enqueued");
        let _ = conn.close(200, "bye").await;
        Ok(())
    }
}

#[derive(Args)]
pub struct Status {
    pub job_id: Uuid,
    #[arg(long)]
    pub json: bool,
    /// Follow the job with a live progress bar until it finishes.
    #[arg(long)]
    pub watch: bool,
}

impl Status {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let pool = db::connect(&s.database_url, 2).await?;
        report::status(&pool, self.job_id, self.json, self.watch).await
    }
}

#[derive(Args)]
pub struct Results {
    pub job_id: Uuid,
    #[arg(long, value_enum)]
    pub outcome: Option<Outcome>,
    #[arg(long, value_enum, default_value_t = report::Format::Jsonl)]
    pub format: report::Format,
}

impl Results {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let pool = db::connect(&s.database_url, 2).await?;
        report::results(&pool, self.job_id, self.outcome, self.format).await
    }
}

#[derive(Args)]
pub struct Cancel {
    pub job_id: Uuid,
}

impl Cancel {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let pool = db::connect(&s.database_url, 2).await?;
        let job = job::cancel(&pool, self.job_id).await?;
        println!(
            "cancelled job {}: converted {}, skipped {}, failed {} of {}",
            job.id, job.converted_count, job.skipped_count, job.failed_count, job.total_count
        );
        Ok(())
    }
}

#[derive(Args)]
pub struct Republish {
    pub job_id: Uuid,
    /// Publisher lease, renewed after each confirmed batch.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    pub lease_secs: Duration,
}

impl Republish {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let Republish { job_id, lease_secs } = self;
        let topology = s.topology();
        let pool = db::connect(&s.database_url, 2).await?;
        let conn = queue::connect(&s.amqp_url).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        topology.declare(&ch).await?;
        let trigger = job::rewind_outbox(&pool, job_id, lease_secs).await?;
        let lane = Lane::for_trigger(trigger);
        let published = producer::publish_job(&pool, &ch, &topology, job_id, lane, lease_secs, producer::BATCH).await?;
        println!("republished job {job_id}: {published} pending leads");
        let _ = ch.close(200, "bye").await;
        let _ = conn.close(200, "bye").await;
        Ok(())
    }
}
