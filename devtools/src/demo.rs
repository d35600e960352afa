//! The demo: seed sample leads, enqueue one job over them through
//! RabbitMQ, convert it with an in-process worker, report what happened.

use std::time::Instant;

use lapin::options::ConfirmSelectOptions;
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use leadconv::queue::producer;
use leadconv::queue::worker;
use leadconv::queue::{self, Lane, Topology};
use leadconv::report::{self, Progress};
use leadconv::store::convert;
use leadconv::store::job::{self, Dispatch, NewJob, Trigger};
use leadconv_sample::{self as seed, SeedSpec};

pub struct DemoSpec {
    pub leads: usize,
    pub duplicates: f64,
    pub concurrency: u16,
}

pub async fn run(pool: &PgPool, amqp_url: &str, topology: &Topology, spec: &DemoSpec) -> anyhow::Result<()> {
    let started = Instant::now();
    let seeded =
        seed::seed(pool, &SeedSpec { leads: spec.leads, duplicates: spec.duplicates, rng_seed: rand::random() })
            .await?;
    println!(
        "seeded {} leads ({:.0}% duplicating {} existing contacts/accounts) in {:.1?}",
        seeded.lead_ids.len(),
        spec.duplicates * 100.0,
        seeded.existing_contacts,
        started.elapsed()
    );

    let (first, last) = (seeded.lead_ids[0], *seeded.lead_ids.last().expect("seeded leads"));
    let new = NewJob {
        criteria: json!({"all": [{"field": "id", "op": "between", "value": [first, last]},
                                 {"field": "lead_status", "op": "in", "value": ["Qualified", "Contacted", "New"]}]}),
        options: json!({
            "create_deal": true,
            "deal": {"name": "{{company}} – {{last_name}}", "closing_date": "+30d", "stage": "Qualification",
                     "amount": 1200.50, "contact_role": "Purchasing", "campaign_source": "Spring webinar"},
            "carry_over_tags": true
        }),
        requested_by: seeded.acting_user,
        trigger: Trigger::Schedule,
    };
    let checked = job::check(pool, new).await?;
    let conn = queue::connect(amqp_url).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    topology.declare(&ch).await?;
    let lease = producer::Lease::new(std::time::Duration::from_secs(30));
    let t = Instant::now();
    let created = job::create(pool, &checked, Dispatch::Queue { lease }).await?;
    let published = producer::publish_job(pool, &ch, topology, created.id, Lane::Bulk, &lease, producer::BATCH).await?;
    println!(
        "job {}: {} leads, {published} messages published to {}",
        created.id,
        created.total_count,
        topology.work_queue(Lane::Bulk)
    );

    let mut cfg = worker::WorkerConfig::new(amqp_url, topology.clone());
    cfg.concurrency = spec.concurrency;
    cfg.exit_when_idle = true;
    worker::run(pool.clone(), cfg, CancellationToken::new()).await?;
    let elapsed = t.elapsed();
    job::rollup(pool, created.id).await?;
    let _ = conn.close(200, "bye").await;

    let progress = Progress::of(job::get(pool, created.id).await?.expect("job exists"));
    println!("{}", progress.line());
    let results = convert::results(pool, created.id).await?;
    for (what, n) in report::actions(&results) {
        println!("  {what:<28} {n:>7}");
    }
    println!(
        "enqueue to last commit: {:.2?}, {:.0} leads/s",
        elapsed,
        results.len() as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    if let Some(r) = results.iter().find(|r| r.contact_action.map(|a| a.as_str()) == Some("merged")) {
        println!("example merge: {}", serde_json::to_string(r)?);
    }
    println!("see all results with: leadconv results {} --format csv", created.id);
    Ok(())
}
