//! Undo (SPEC §4a) of two leads of one job taken back at once by two
//! batches that share no lock, the earlier lead's paused (a `fail` pause
//! point) between reading which later leads it waits for and reading the
//! later work on its records: the tags the earlier lead added still go.
//! Its own test binary: a pause point is armed for the whole process.
//!
//! Seen once in CI (2026-12-07, `undo.rs`'s two-worker test): every lead
//! undone, yet a seeded account kept the tag a merge had added. The batch
//! read the later work on its records (a later lead of the job, converted
//! into the same account, bringing the same tag) before it read which
//! later leads it must wait for; the later lead's undo committed in between,
//! so the tag counted as later work and nothing made the lead wait.

mod common;

use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use leadconv::store::convert::{ConvertError, Item};
use leadconv::store::types::Outcome;
use serde_json::{json, Value};

const PAUSE: &str = "undo-between-waits-and-later-work";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lead_undone_beside_a_later_lead_of_its_job_still_takes_back_the_tags_it_added() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let crane = crm.account(json!({"owner_id": rep, "account_name": "Żuraw Logistyka", "tags": []})).await;
    crm.contact(json!({"owner_id": rep, "account_id": crane, "last_name": "Żurawska", "email": "jola@zuraw.pl"})).await;
    let lead = |v: Value| {
        let mut base = json!({"owner_id": rep, "lead_status": "Qualified", "tags": ["partner"]});
        merge(&mut base, v);
        crm.lead(base)
    };
    // The earlier lead matches the account by its company and adds the tag;
    // the later one matches the account's contact by e-mail and is linked
    // to its account without filling it (another company): its undo locks
    // neither the account nor any key of the earlier lead.
    let earlier = lead(json!({"last_name": "Kran", "email": "kran@dzwig.pl", "company": "ŻURAW\u{a0}LOGISTYKA"})).await;
    let later =
        lead(json!({"last_name": "Żurawska", "email": "\"Jola\" <JOLA@zuraw.pl>", "company": "Inna Firma"})).await;
    let (job, results) = crm.convert_in_batches(rep, json!({}), &[earlier, later], 1).await;
    let tags = || async {
        sqlx::query_scalar::<_, Value>("SELECT to_jsonb(tags) FROM accounts WHERE id = $1")
            .bind(crane)
            .fetch_one(crm.pool())
            .await
            .unwrap()
    };
    assert_eq!(
        results.iter().map(|r| (r.outcome, r.account_id)).collect::<Vec<_>>(),
        vec![(Outcome::Converted, Some(crane)), (Outcome::Converted, Some(crane))],
        "both leads went into the account: {results:#?}"
    );
    assert_eq!(tags().await, json!(["partner"]));

    let (undo, settings) = crm.undo_job(job, None).await;
    let item = |lead_id| [Item { lead_id, enqueued_at: None, earlier_attempts: 0 }];

    // The first batch to reach the pause point (the earlier lead's) waits
    // there until released; the others pass.
    let (reached_tx, reached) = mpsc::channel::<()>();
    let (release, release_rx) = mpsc::channel::<()>();
    let hold = Mutex::new(Some((reached_tx, release_rx)));
    fail::cfg_callback(PAUSE, move || {
        // Taken out of the lock first: the others must not wait on it.
        let first = hold.lock().unwrap().take();
        if let Some((reached, release)) = first {
            reached.send(()).unwrap();
            let _ = release.recv_timeout(Duration::from_secs(60));
        }
    })
    .unwrap();
    let first = {
        let (url, settings, item) = (crm.url(), settings.clone(), item(earlier));
        // A thread and runtime of its own, as another worker would be: the
        // pause blocks this thread only.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let pool = sqlx::PgPool::connect(&url).await.unwrap();
                leadconv::store::undo::undo_batch(&pool, undo.id, job, &settings, &item).await
            })
        })
    };
    tokio::task::spawn_blocking(move || reached.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the earlier lead's undo reached the pause point");

    // The later lead goes while the earlier one's batch is held.
    let second = tokio::time::timeout(
        Duration::from_secs(30),
        leadconv::store::undo::undo_batch(crm.pool(), undo.id, job, &settings, &item(later)),
    )
    .await
    .expect("the later lead's undo does not wait on the held batch")
    .unwrap();
    assert_eq!(second[0].as_ref().map(|r| r.outcome).ok(), Some(Outcome::Undone), "{second:?}");

    release.send(()).unwrap();
    let mut outcome = tokio::task::spawn_blocking(move || first.join().unwrap()).await.unwrap().unwrap().pop().unwrap();
    // Told to wait for the later lead (read pending before the pause), it
    // is tried again, as a worker would.
    for _ in 0..3 {
        if !matches!(outcome, Err(ConvertError::Waits(_))) {
            break;
        }
        outcome = leadconv::store::undo::undo_batch(crm.pool(), undo.id, job, &settings, &item(earlier))
            .await
            .unwrap()
            .pop()
            .unwrap();
    }
    fail::remove(PAUSE);
    assert_eq!(outcome.as_ref().map(|r| r.outcome).ok(), Some(Outcome::Undone), "{outcome:?}");
    assert_eq!(tags().await, json!([]), "the tag the earlier lead added is taken back");
}
