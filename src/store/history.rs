//! A record's history (SPEC §4a): every conversion and undo that created
//! or changed a lead, account, contact or deal, when, by whom, which job
//! and lead, each field before and after — read from the journal.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::journal::{self, Change, Entry, Touch};
use crate::record::Module;

/// One conversion or undo of a record.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub at: DateTime<Utc>,
    /// `conversion` or `undo`.
    pub kind: &'static str,
    /// The conversion job, or the undo job.
    pub job_id: Uuid,
    pub lead_id: i64,
    /// The job's acting user, and who asked for it when someone else did.
    pub by: i64,
    pub asked_by: Option<i64>,
    pub what: Touch,
    pub changes: Vec<Change>,
}

type Row = (
    Uuid,
    i64,
    Json<Entry>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<Uuid>,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

/// The history of `module` `id`, oldest first, of the jobs whose acting
/// user is one of `reach` (`None`: everyone): an undo shows only when its
/// own job is within reach too.
pub async fn of(pool: &PgPool, module: Module, id: i64, reach: Option<&[i64]>) -> sqlx::Result<Vec<Event>> {
    const COLUMNS: &str = "j.job_id, j.lead_id, j.entry, j.created_at, j.undone_at, j.undone_by,
                           c.requested_by, c.asked_by, u.requested_by, u.asked_by
                           FROM conversion_journal j JOIN conversion_jobs c ON c.id = j.job_id
                           LEFT JOIN conversion_jobs u ON u.id = j.undone_by";
    let rows: Vec<Row> = if module == Module::Lead {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} WHERE j.lead_id = $1 AND ($2::bigint[] IS NULL OR c.requested_by = ANY($2))
             ORDER BY j.created_at, j.job_id"
        ))
        .bind(id)
        .bind(reach)
        .fetch_all(pool)
        .await?
    } else {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} WHERE j.records @> ARRAY[$1]
               AND ($2::bigint[] IS NULL OR c.requested_by = ANY($2))
             ORDER BY j.created_at, j.job_id"
        ))
        .bind(format!("{}:{id}", module.as_str()))
        .bind(reach)
        .fetch_all(pool)
        .await?
    };
    let mut events = Vec::new();
    for (job_id, lead_id, Json(entry), at, undone_at, undone_by, by, asked_by, undo_by, undo_asked_by) in rows {
        if let Some((what, changes)) = journal::touched(&entry, lead_id, module, id, false) {
            events.push(Event { at, kind: "conversion", job_id, lead_id, by, asked_by, what, changes });
        }
        let undo = (undone_at, undone_by, undo_by);
        if let (Some(at), Some(undo_job), Some(undo_by)) = undo {
            if reach.is_none_or(|r| r.contains(&undo_by)) {
                if let Some((what, changes)) = journal::touched(&entry, lead_id, module, id, true) {
                    let asked_by = undo_asked_by;
                    events.push(Event {
                        at,
                        kind: "undo",
                        job_id: undo_job,
                        lead_id,
                        by: undo_by,
                        asked_by,
                        what,
                        changes,
                    });
                }
            }
        }
    }
    events.sort_by_key(|e| e.at);
    Ok(events)
}
