//! Prometheus metrics: names in one place, the recorder, and the gauges
//! read from Postgres and RabbitMQ.
//!
//! Naming follows Prometheus conventions: `leadconv_` prefix, `_total`
//! counters, seconds, and no per-lead or per-job labels (they would make
//! one time series per lead).

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;

use crate::queue::{Lane, Topology, RETRY_DELAYS};
use crate::store::convert::LeadResult;
use crate::store::types::JobStatus;

pub const LEADS_ENQUEUED: &str = "leadconv_leads_enqueued_total";
pub const CONVERSIONS: &str = "leadconv_conversions_total";
pub const FAILURES: &str = "leadconv_conversion_failures_total";
pub const CONVERSION_SECONDS: &str = "leadconv_conversion_duration_seconds";
pub const END_TO_END_SECONDS: &str = "leadconv_end_to_end_seconds";
pub const RETRIES: &str = "leadconv_retries_total";
pub const DEAD_LETTERS: &str = "leadconv_dead_letters_total";
pub const JOBS: &str = "leadconv_jobs";
pub const QUEUE_DEPTH: &str = "leadconv_queue_depth";
pub const IN_FLIGHT: &str = "leadconv_worker_in_flight";
pub const JOBS_CREATED: &str = "leadconv_jobs_created_total";

/// Every metric the application exports (dashboards may use only these).
pub const ALL: &[&str] = &[
    LEADS_ENQUEUED,
    CONVERSIONS,
    FAILURES,
    CONVERSION_SECONDS,
    END_TO_END_SECONDS,
    RETRIES,
    DEAD_LETTERS,
    JOBS,
    QUEUE_DEPTH,
    IN_FLIGHT,
    JOBS_CREATED,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder once; later calls return the same handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(CONVERSION_SECONDS.into()),
                    &[0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
                )
                .expect("valid buckets")
                .set_buckets_for_metric(
                    Matcher::Full(END_TO_END_SECONDS.into()),
                    &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0],
                )
                .expect("valid buckets")
                .install_recorder()
                .expect("one metrics recorder per process");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(LEADS_ENQUEUED, "Lead messages published to RabbitMQ");
    describe_counter!(JOBS_CREATED, "Conversion jobs created, by trigger");
    describe_counter!(CONVERSIONS, "Leads finished, by outcome and contact/account/deal action");
    describe_counter!(FAILURES, "Leads failed or skipped, by error code");
    describe_histogram!(CONVERSION_SECONDS, Unit::Seconds, "Time of one lead's conversion transaction");
    describe_histogram!(END_TO_END_SECONDS, Unit::Seconds, "Time from a lead's message being published to its commit");
    describe_counter!(RETRIES, "Messages sent to a retry delay queue after a transient failure");
    describe_counter!(DEAD_LETTERS, "Messages parked in the dead-letter queue");
    describe_gauge!(JOBS, "Conversion jobs by status");
    describe_gauge!(QUEUE_DEPTH, "Messages ready in each leadconv queue");
    describe_gauge!(IN_FLIGHT, "Messages a worker holds now: converting, or waiting for a free conversion slot");
}

/// Counts one finished lead (called once per result actually recorded).
pub fn record_result(r: &LeadResult, took: Duration) {
    counter!(
        CONVERSIONS,
        "outcome" => r.outcome.as_str(),
        "contact_action" => r.contact_action.map_or("none", |a| a.as_str()),
        "account_action" => r.account_action.map_or("none", |a| a.as_str()),
        "deal_action" => r.deal_action.map_or("none", |a| a.as_str())
    )
    .increment(1);
    if let Some(code) = &r.error_code {
        counter!(FAILURES, "outcome" => r.outcome.as_str(), "code" => code.clone()).increment(1);
    }
    if !took.is_zero() {
        histogram!(CONVERSION_SECONDS).record(took.as_secs_f64());
    }
    if let (Some(enqueued), Some(finished)) = (r.enqueued_at, r.finished_at) {
        histogram!(END_TO_END_SECONDS).record(((finished - enqueued).num_milliseconds().max(0) as f64) / 1000.0);
    }
}

/// Sets the gauges read from Postgres (jobs by status) and, when a channel
/// is given, RabbitMQ (queue depths).
pub async fn refresh_gauges(pool: &PgPool, broker: Option<(&lapin::Channel, &Topology)>) -> anyhow::Result<()> {
    let rows = sqlx::query!(
        r#"SELECT status AS "status!: JobStatus", count(*) AS "n!" FROM conversion_job_progress GROUP BY status"#
    )
    .fetch_all(pool)
    .await?;
    for &status in JobStatus::ALL {
        let n = rows.iter().find(|r| r.status == status).map_or(0, |r| r.n);
        gauge!(JOBS, "status" => status.as_str()).set(n as f64);
    }
    if let Some((ch, topology)) = broker {
        let mut queues =
            vec![topology.work_queue(Lane::Workflow), topology.work_queue(Lane::Bulk), topology.dead_queue()];
        queues.extend((0..RETRY_DELAYS.len()).map(|l| topology.retry_queue(l)));
        for q in queues {
            let depth = topology.depth(ch, &q).await?;
            gauge!(QUEUE_DEPTH, "queue" => q).set(f64::from(depth));
        }
    }
    Ok(())
}
