//! Many conversions at once never create two contacts for one e-mail nor two
//! accounts for one company, within a job or across jobs (issue: concurrency
//! safety; SPEC §7).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use leadconv::store::convert;
use leadconv::store::job::{self, Trigger};
use serde_json::json;
use tokio::sync::Semaphore;

const LEADS: usize = 2_000;
const TASKS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_conversions_create_no_duplicates_and_convert_each_lead_once() {
    let crm = Crm { db: TestDb::with_connections(TASKS as u32 + 2).await };
    let boss = crm.user("Boss", json!({"is_admin": true})).await;

    // Existing CRM data, including a pair of contacts that already share an
    // e-mail and a pair of accounts that already share a name.
    for i in 0..50 {
        let a = crm.account(json!({"owner_id": boss, "account_name": format!("Existing Co {i}")})).await;
        crm.contact(json!({"owner_id": boss, "account_id": a, "last_name": format!("Old{i}"), "email": format!("old{i}@example.com")})).await;
    }
    crm.contact(json!({"owner_id": boss, "last_name": "Twin", "email": "OLD7@example.com"})).await;
    crm.account(json!({"owner_id": boss, "account_name": "existing co 7"})).await;
    let contacts_before: Vec<(String, i64)> = sqlx::query_as(
        "SELECT leadconv_norm_email(email), count(*) FROM contacts GROUP BY 1 HAVING count(*) > 1 ORDER BY 1",
    )
    .fetch_all(crm.pool())
    .await
    .unwrap();
    assert_eq!(contacts_before, vec![("old7@example.com".to_owned(), 2)]);

    // Leads: a third reuse existing e-mails (in other case and spacing), a
    // third share e-mails among themselves in small groups of neighbours, so
    // that leads sharing an e-mail are converted at the same moment;
    // companies likewise.
    let mut leads = Vec::with_capacity(LEADS);
    let mut shared = 0;
    for i in 0..LEADS {
        let email = match i % 3 {
            0 => Some(format!("  OLD{}@Example.COM ", i % 50)),
            1 => Some(format!("shared{}@example.org", i / 12)),
            _ => Some(format!("lead{i}@example.net")),
        };
        let company = match i % 4 {
            0 => Some(format!("EXISTING  co {}", i % 50)),
            1 => Some(format!("New Co {}", i / 16)),
            2 => Some(format!("Unique Co {i}")),
            _ => None,
        };
        if i % 3 != 2 || i % 4 < 2 {
            shared += 1;
        }
        let id = crm
            .lead(json!({"owner_id": boss, "last_name": format!("Lead{i}"), "email": email, "company": company,
                          "tags": ["bulk"]}))
            .await;
        leads.push(id);
    }
    assert!(shared * 10 >= LEADS * 3, "at least 30% of leads share an e-mail or a company");

    // Two jobs over overlapping halves, converted together.
    let options = json!({"create_deal": true, "deal": {"closing_date": "+30d", "stage": "Qualification"}});
    let first = &leads[..1_200];
    let second = &leads[800..];
    let job_a = job::create_for_leads(crm.pool(), boss, Trigger::Manual, &options, first).await.unwrap();
    let job_b = job::create_for_leads(crm.pool(), boss, Trigger::Schedule, &options, second).await.unwrap();
    let settings =
        Arc::new(job::settings(crm.pool(), &job::get(crm.pool(), job_a).await.unwrap().unwrap()).await.unwrap());

    let gate = Arc::new(Semaphore::new(TASKS));
    let mut handles = Vec::new();
    let work: Vec<_> = first.iter().map(|&l| (job_a, l)).chain(second.iter().map(|&l| (job_b, l))).collect();
    // Interleave the jobs so that the overlap really races.
    let (a, b) = work.split_at(first.len());
    for k in 0..a.len().max(b.len()) {
        for &(job, lead) in a.get(k).into_iter().chain(b.get(k)) {
            let (pool, settings, gate) = (crm.pool().clone(), settings.clone(), gate.clone());
            handles.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                convert::convert_lead(&pool, job, &settings, lead).await
            }));
        }
    }
    for h in handles {
        h.await.unwrap().expect("every conversion finishes without error");
    }

    // No e-mail gained a second contact; the pre-existing pair is unchanged.
    let dup_contacts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT leadconv_norm_email(email), count(*) FROM contacts GROUP BY 1 HAVING count(*) > 1 ORDER BY 1",
    )
    .fetch_all(crm.pool())
    .await
    .unwrap();
    assert_eq!(dup_contacts, contacts_before);
    let dup_accounts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT leadconv_norm_company(account_name), count(*) FROM accounts GROUP BY 1 HAVING count(*) > 1 ORDER BY 1",
    )
    .fetch_all(crm.pool())
    .await
    .unwrap();
    assert_eq!(dup_accounts, vec![("existing co 7".to_owned(), 2)]);

    // Every lead converted, exactly once across both jobs.
    assert_eq!(crm.count("SELECT count(*) FROM leads WHERE converted_at IS NULL").await, 0);
    let converted_twice = crm
        .count("SELECT count(*) FROM (SELECT lead_id FROM conversion_results WHERE outcome = 'converted' GROUP BY lead_id HAVING count(*) <> 1) x")
        .await;
    assert_eq!(converted_twice, 0);
    assert_eq!(
        crm.count("SELECT count(DISTINCT lead_id) FROM conversion_results WHERE outcome = 'converted'").await,
        LEADS as i64
    );
    // The overlap: each lead converted by one job, skipped by the other.
    assert_eq!(
        crm.count(
            "SELECT count(*) FROM conversion_results WHERE outcome = 'skipped' AND error_code = 'already_converted'"
        )
        .await,
        400
    );
    assert_eq!(crm.count("SELECT count(*) FROM conversion_results WHERE outcome IN ('pending', 'failed')").await, 0);

    // Result rows agree with the leads and the CRM tables.
    let disagreeing = crm
        .count(
            "SELECT count(*) FROM conversion_results r JOIN leads l ON l.id = r.lead_id
             WHERE r.outcome = 'converted' AND (
                   l.converted_contact_id IS DISTINCT FROM r.contact_id
                OR l.converted_account_id IS DISTINCT FROM r.account_id
                OR l.converted_deal_id IS DISTINCT FROM r.deal_id
                OR l.is_repeat IS DISTINCT FROM r.is_repeat
                OR l.is_repeat <> (r.contact_action = 'merged' OR r.account_action = 'matched'))",
        )
        .await;
    assert_eq!(disagreeing, 0);
    assert_eq!(
        crm.count("SELECT count(*) FROM contacts").await,
        51 + crm.count("SELECT count(*) FROM conversion_results WHERE contact_action = 'created'").await
    );
    assert_eq!(
        crm.count("SELECT count(*) FROM accounts").await,
        51 + crm.count("SELECT count(*) FROM conversion_results WHERE account_action = 'created'").await
    );
    assert_eq!(crm.count("SELECT count(*) FROM deals").await, LEADS as i64);
    // Each merged contact is one that had the lead's e-mail.
    let wrong_merge = crm
        .count(
            "SELECT count(*) FROM conversion_results r JOIN leads l ON l.id = r.lead_id JOIN contacts c ON c.id = r.contact_id
             WHERE leadconv_norm_email(c.email) IS DISTINCT FROM leadconv_norm_email(l.email)",
        )
        .await;
    assert_eq!(wrong_merge, 0);

    // Job counts equal their result rows.
    for job_id in [job_a, job_b] {
        let j = job::get(crm.pool(), job_id).await.unwrap().unwrap();
        let by = |outcome: &str| {
            let pool = crm.pool().clone();
            let outcome = outcome.to_owned();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM conversion_results WHERE job_id = $1 AND outcome = $2",
                )
                .bind(job_id)
                .bind(outcome)
                .fetch_one(&pool)
                .await
                .unwrap() as i32
            }
        };
        assert_eq!(j.converted_count, by("converted").await);
        assert_eq!(j.skipped_count, by("skipped").await);
        assert_eq!(j.failed_count, 0);
        assert_eq!(j.pending_count(), 0);
        assert_eq!(j.status, "completed");
        let merged: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM conversion_results WHERE job_id = $1 AND contact_action = 'merged'",
        )
        .bind(job_id)
        .fetch_one(crm.pool())
        .await
        .unwrap();
        assert_eq!(j.merged_count as i64, merged);
    }
}

/// A conversion in flight holds its result row, then counts itself (a new
/// counter shard, whose foreign key share-locks the job row). `cancel` locks
/// the job row, then waits for that result row. The two locks must not form a
/// cycle: the conversion commits and the cancel goes through, neither chosen
/// as a deadlock victim.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_while_a_conversion_counts_itself_does_not_deadlock() {
    let crm = Crm { db: TestDb::with_connections(6).await };
    let boss = crm.user("Boss", json!({"is_admin": true})).await;
    let mut leads = Vec::new();
    for i in 0..5 {
        leads.push(crm.lead(json!({"owner_id": boss, "last_name": format!("L{i}")})).await);
    }
    let job_id = job::create_for_leads(crm.pool(), boss, Trigger::Manual, &json!({}), &leads).await.unwrap();

    // The conversion in flight, as `convert` runs it: the result row first.
    let mut conversion = crm.pool().begin().await.unwrap();
    // This session looks for deadlocks long before `cancel`'s session does,
    // so if there is a cycle, the conversion is the victim and fails below.
    sqlx::query("SET LOCAL deadlock_timeout = '20ms'").execute(&mut *conversion).await.unwrap();
    sqlx::query("SELECT 1 FROM conversion_results WHERE job_id = $1 AND lead_id = $2 FOR UPDATE")
        .bind(job_id)
        .bind(leads[0])
        .execute(&mut *conversion)
        .await
        .unwrap();

    let pool = crm.pool().clone();
    let cancel = tokio::spawn(async move { job::cancel(&pool, job_id).await });
    common::broker::wait_for("cancel waits for the result row", Duration::from_secs(30), || async {
        crm.count(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'UPDATE conversion_results%'",
        )
        .await
            == 1
    })
    .await;

    sqlx::query(
        "UPDATE conversion_results SET outcome = 'failed', error_code = 'internal_error', finished_at = now()
         WHERE job_id = $1 AND lead_id = $2",
    )
    .bind(job_id)
    .bind(leads[0])
    .execute(&mut *conversion)
    .await
    .unwrap();
    sqlx::query("INSERT INTO conversion_job_counters (job_id, shard, failed) VALUES ($1, 0, 1)")
        .bind(job_id)
        .execute(&mut *conversion)
        .await
        .expect("the conversion counts itself while cancel waits, without being a deadlock victim");
    conversion.commit().await.unwrap();

    let cancelled = tokio::time::timeout(Duration::from_secs(30), cancel).await.unwrap().unwrap().unwrap();
    assert_eq!(cancelled.status, "cancelled");
    assert_eq!((cancelled.failed_count, cancelled.skipped_count, cancelled.total_count), (1, 4, 5));
}
