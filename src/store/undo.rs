//! Taking conversions back (SPEC §4a): an undo job's leads, each in one
//! transaction, through the same queue and workers as conversion.
//!
//! Follow a lead here: lock its pending result row in the undo job, lock
//! the lead row and the advisory locks of its keys (the very keys a
//! conversion of the same e-mail or company takes, so the two never
//! interleave), read its journal entry and the records as they are now
//! (`Now`), decide (`undo::decide`, shared with the dry run), carry the
//! decision out, record the result, commit.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::error::ErrorCode;
use crate::journal::{Entry, Related};
use crate::record::{Module, Record};
use crate::store::apply::{writable_columns, Converted};
use crate::store::convert::{self, ConvertError, Done, Finish, Item, LeadResult};
use crate::store::options::Settings;
use crate::store::snapshot;
use crate::store::types::{JobStatus, Outcome};
use crate::undo::{self, Now, RelatedRow, Takeback, UndoVerdict};

/// Deadlocks are resolved by trying again at once, this many times.
const LOCAL_TRIES: u32 = 5;

fn table(module: Module) -> &'static str {
    match module {
        Module::Account => "accounts",
        Module::Contact => "contacts",
        Module::Deal => "deals",
        Module::Lead => "leads",
    }
}

/// Takes back the leads of `items` for undo job `job_id`, which undoes job
/// `of`: each lead in a transaction of its own. A lead whose created
/// records are used by another lead of `of` that this job has not taken
/// back yet waits for it (a transient error: its message comes back after
/// a delay), so that a lead that merged into another's records is taken
/// back first, whatever the order the workers get them in.
pub async fn undo_batch(
    pool: &PgPool,
    job_id: Uuid,
    of: Uuid,
    settings: &Settings,
    items: &[Item],
) -> Result<Vec<Result<LeadResult, ConvertError>>, ConvertError> {
    // The latest conversions first, so that a batch holding both a lead
    // and one that merged into its records after it needs no wait.
    let ids: Vec<i64> = items.iter().map(|i| i.lead_id).collect();
    let order: Vec<i64> = sqlx::query_scalar(
        "SELECT v.lead_id FROM unnest($2::bigint[]) AS v(lead_id)
         LEFT JOIN conversion_journal j ON j.job_id = $1 AND j.lead_id = v.lead_id
         ORDER BY j.created_at DESC NULLS LAST, v.lead_id DESC",
    )
    .bind(of)
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let mut results: HashMap<i64, Result<LeadResult, ConvertError>> = HashMap::new();
    for lead_id in order {
        let Some(item) = items.iter().find(|i| i.lead_id == lead_id) else { continue };
        if results.contains_key(&lead_id) {
            continue;
        }
        results.insert(lead_id, undo_lead(pool, job_id, of, settings, item).await);
    }
    Ok(items
        .iter()
        .map(|i| match results.remove(&i.lead_id) {
            Some(r) => r,
            // A lead twice in one batch: its second message finds it recorded.
            None => Err(ConvertError::NotInJob { job_id, lead_id: i.lead_id }),
        })
        .collect())
}

async fn undo_lead(
    pool: &PgPool,
    job_id: Uuid,
    of: Uuid,
    settings: &Settings,
    item: &Item,
) -> Result<LeadResult, ConvertError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match try_undo(pool, job_id, of, settings, item, tries).await {
            Err(ConvertError::Transient(e)) if tries < LOCAL_TRIES && convert::is_lock_conflict(&e) => {
                tokio::time::sleep(std::time::Duration::from_millis(5 << tries)).await;
            }
            // A delete refused by a reference that appeared after the check
            // (another table's row made in between): the record is in use.
            Err(ConvertError::Database(sqlx::Error::Database(db))) if db.code().as_deref() == Some("23503") => {
                let f = Finish::skipped(
                    ErrorCode::InUse,
                    format!("a record this conversion created is referenced elsewhere ({})", db.message()),
                );
                return convert::record(pool, job_id, item.lead_id, &f, item.earlier_attempts + tries).await;
            }
            other => return other,
        }
    }
}

async fn try_undo(
    pool: &PgPool,
    job_id: Uuid,
    of: Uuid,
    settings: &Settings,
    item: &Item,
    tries: u32,
) -> Result<LeadResult, ConvertError> {
    let started = std::time::Instant::now();
    let lead_id = item.lead_id;
    let mut tx = pool.begin().await?;
    let Some(locked) = convert::lock_results(&mut tx, job_id, &[lead_id]).await?.pop() else {
        return Err(ConvertError::NotInJob { job_id, lead_id });
    };
    if locked.result.outcome != Outcome::Pending {
        return Ok(locked.result);
    }
    let finish = if locked.job_status == JobStatus::Cancelled {
        Finish::skipped(ErrorCode::Cancelled, format!("job {job_id} was cancelled"))
    } else {
        let (entry, now) = read_now(&mut tx, of, lead_id, Some(settings)).await?;
        let waiting = later_of_same_job(&mut tx, job_id, of, lead_id, entry.as_ref()).await?;
        if !waiting.is_empty() {
            // Rolled back: the message comes back shortly.
            return Err(ConvertError::Waits(waiting));
        }
        match undo::decide(lead_id, entry.as_ref(), &now) {
            UndoVerdict::Skipped { code, message, .. } => Finish::skipped(code, message),
            UndoVerdict::Undo(t) => {
                let entry = entry.expect("an undo has a journal entry");
                carry_out(&mut tx, lead_id, &t).await?;
                sqlx::query(
                    "UPDATE conversion_journal SET undone_at = now(), undone_by = $3 WHERE job_id = $1 AND lead_id = $2",
                )
                .bind(of)
                .bind(lead_id)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
                let id = |k: &str| entry.lead.after.get(k).and_then(Value::as_i64);
                let ids = Converted {
                    contact_id: id("converted_contact_id").unwrap_or(0),
                    account_id: id("converted_account_id"),
                    deal_id: id("converted_deal_id"),
                };
                let note = t.opt_out_kept.map(|c| format!("the e-mail opt-out on {c} stays (consent wins)"));
                Finish::undone(ids, note)
            }
        }
    };
    let done = [Done { lead_id, finish: &finish, tries: item.earlier_attempts + tries, enqueued_at: item.enqueued_at }];
    let r = convert::finish(&mut tx, job_id, &done, Some(started), locked.workflow)
        .await?
        .pop()
        .expect("a pending row is recorded");
    tx.commit().await?;
    crate::metrics::record_result(&r, started.elapsed());
    Ok(r)
}

/// The leads of the converted job `of`, still pending in undo job `job_id`,
/// converted after `lead_id` into a contact or account its conversion
/// created or filled: they are taken back first (their fills, links and
/// tags lie over this lead's), whatever order the workers get them in —
/// the order the dry run decides in.
async fn later_of_same_job(
    conn: &mut PgConnection,
    job_id: Uuid,
    of: Uuid,
    lead_id: i64,
    entry: Option<&Entry>,
) -> sqlx::Result<Vec<i64>> {
    let Some(entry) = entry else { return Ok(Vec::new()) };
    let touched = |m: Module| {
        let mut ids: Vec<i64> = entry
            .created
            .iter()
            .map(|c| (c.module, c.id))
            .chain(entry.filled.iter().map(|f| (f.module, f.id)))
            .filter(|(x, _)| *x == m)
            .map(|(_, id)| id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    // The leads converted into those records first (indexed, usually
    // none but this one), then which of them are pending here and later:
    // by primary key, whatever the statistics of a job's results just
    // inserted say.
    let candidates: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM leads WHERE (converted_contact_id = ANY($1) OR converted_account_id = ANY($2)) AND id <> $3",
    )
    .bind(touched(Module::Contact))
    .bind(touched(Module::Account))
    .bind(lead_id)
    .fetch_all(&mut *conn)
    .await?;
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "SELECT r.lead_id FROM conversion_results r
         JOIN conversion_journal j ON j.job_id = $2 AND j.lead_id = r.lead_id AND j.undone_at IS NULL
         JOIN conversion_journal mine ON mine.job_id = $2 AND mine.lead_id = $3
         WHERE r.job_id = $1 AND r.lead_id = ANY($4) AND r.outcome = 'pending'
           AND (j.created_at, j.lead_id) > (mine.created_at, mine.lead_id)
         ORDER BY r.lead_id",
    )
    .bind(job_id)
    .bind(of)
    .bind(lead_id)
    .bind(&candidates)
    .fetch_all(conn)
    .await
}

/// A related row as read: id, parent module and id, title and body (notes).
type RelatedRead = (i64, String, i64, Option<Json<Value>>, Option<Json<Value>>);

/// A lead's journal entry in job `of` and the world as it is now, with
/// the rows locked when `settings` is given (an undo; the dry run reads
/// without locks).
pub(crate) async fn read_now(
    conn: &mut PgConnection,
    of: Uuid,
    lead_id: i64,
    settings: Option<&Settings>,
) -> sqlx::Result<(Option<Entry>, Now)> {
    let locking = if settings.is_some() { " FOR UPDATE" } else { "" };
    let lead: Option<Json<Record>> =
        sqlx::query_scalar(&format!("SELECT to_jsonb(l) FROM leads l WHERE id = $1{locking}"))
            .bind(lead_id)
            .fetch_optional(&mut *conn)
            .await?;
    let lead = lead.map(|j| j.0);
    if let (Some(settings), Some(lead)) = (settings, &lead) {
        // The keys a conversion of this lead's e-mail or company locks.
        snapshot::lock(conn, std::iter::once(lead), settings).await?;
    }
    let row: Option<(Json<Entry>, bool)> = sqlx::query_as(&format!(
        "SELECT entry, undone_at IS NOT NULL FROM conversion_journal WHERE job_id = $1 AND lead_id = $2{locking}"
    ))
    .bind(of)
    .bind(lead_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((Json(entry), undone)) = row else {
        return Ok((None, Now { lead, ..Default::default() }));
    };
    let mut now = Now { lead, undone, ..Default::default() };

    // The records the entry names, locked in one global order: contacts,
    // accounts, deals, each by id.
    let mut ids: HashMap<Module, Vec<i64>> = HashMap::new();
    for (m, id) in entry.created.iter().map(|c| (c.module, c.id)).chain(entry.filled.iter().map(|f| (f.module, f.id))) {
        ids.entry(m).or_default().push(id);
    }
    for m in [Module::Contact, Module::Account, Module::Deal] {
        let Some(list) = ids.get_mut(&m) else { continue };
        list.sort_unstable();
        list.dedup();
        let rows: Vec<(i64, Json<Record>)> = sqlx::query_as(&format!(
            "SELECT id, to_jsonb(t) - 'created_at' - 'updated_at' FROM {} t WHERE id = ANY($1) ORDER BY id{locking}",
            table(m)
        ))
        .bind(&*list)
        .fetch_all(&mut *conn)
        .await?;
        for (id, r) in rows {
            now.records.insert((m, id), r.0);
        }
    }

    // The related rows the entry moved or copied.
    let mut related: HashMap<Related, Vec<i64>> = HashMap::new();
    for m in &entry.moved {
        related.entry(m.table).or_default().push(m.id);
    }
    for c in &entry.copies {
        related.entry(Related::Notes).or_default().push(c.id);
    }
    for (kind, list) in &related {
        let (title, body) = if *kind == Related::Notes {
            ("to_jsonb(title)", "to_jsonb(body)")
        } else {
            ("NULL::jsonb", "NULL::jsonb")
        };
        let rows: Vec<RelatedRead> = sqlx::query_as(&format!(
            "SELECT id, parent_module, parent_id, {title}, {body} FROM {} WHERE id = ANY($1) ORDER BY id{locking}",
            kind.table()
        ))
        .bind(list)
        .fetch_all(&mut *conn)
        .await?;
        for (id, parent_module, parent_id, title, body) in rows {
            let row = RelatedRow {
                parent_module,
                parent_id,
                title: title.map_or(Value::Null, |j| j.0),
                body: body.map_or(Value::Null, |j| j.0),
            };
            now.rows.insert((*kind, id), row);
        }
    }

    now.used_by = used_by(conn, lead_id, &entry).await?;
    now.later_tags = later_tags(conn, of, lead_id, &entry).await?;
    Ok((Some(entry), now))
}

/// What refers to each record `entry` created, other than what the same
/// conversion made: rows of any table with a foreign key to it (another
/// contact of the account, a deal, a lead converted into it since) and
/// notes, attachments and activities attached to it.
async fn used_by(
    conn: &mut PgConnection,
    lead_id: i64,
    entry: &Entry,
) -> sqlx::Result<HashMap<(Module, i64), Vec<String>>> {
    let mut out: HashMap<(Module, i64), Vec<String>> = HashMap::new();
    if entry.created.is_empty() {
        return Ok(out);
    }
    // Every foreign key to accounts, contacts and deals, whatever other
    // systems added to the schema.
    let fks: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT c.conrelid::regclass::text, a.attname::text, c.confrelid::regclass::text
         FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
         WHERE c.contype = 'f' AND c.confrelid IN ('accounts'::regclass, 'contacts'::regclass, 'deals'::regclass)
         ORDER BY 1, 2",
    )
    .fetch_all(&mut *conn)
    .await?;
    let own: HashSet<(Module, i64)> = entry.created.iter().map(|c| (c.module, c.id)).collect();
    let own_ids = |m: Module| own.iter().filter(|(x, _)| *x == m).map(|(_, id)| *id).collect::<Vec<i64>>();
    let moved: HashSet<i64> = entry.moved.iter().map(|m| m.id).chain(entry.copies.iter().map(|c| c.id)).collect();
    for c in &entry.created {
        let t = table(c.module);
        for (from, column, to) in fks.iter().filter(|(_, _, to)| to == t) {
            debug_assert_eq!(to, t);
            // The rows of this very conversion do not count: its lead, and
            // the records it created (a deal of its contact and account).
            let (exclude, ids): (&str, Vec<i64>) = match from.as_str() {
                "leads" => (" AND id <> ALL($2)", vec![lead_id]),
                // Contacts this conversion linked to the account (their
                // link goes back with it) are its own too.
                "contacts" => {
                    let linked = entry.filled.iter().filter(|f| {
                        f.module == Module::Contact && f.field == "account_id" && f.after.as_i64() == Some(c.id)
                    });
                    (" AND id <> ALL($2)", own_ids(Module::Contact).into_iter().chain(linked.map(|f| f.id)).collect())
                }
                "deals" => (" AND id <> ALL($2)", own_ids(Module::Deal)),
                "accounts" => (" AND id <> ALL($2)", own_ids(Module::Account)),
                _ => ("", Vec::new()),
            };
            let found: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT {label} FROM {from} WHERE {column} = $1{exclude} LIMIT 1000",
                label = if exclude.is_empty() {
                    format!("'{from}.{column}'")
                } else {
                    format!("'{}' || ' ' || id", singular(from))
                },
                from = quote_ident(from),
                column = quote_ident(column),
            ))
            .bind(c.id)
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?;
            out.entry((c.module, c.id)).or_default().extend(found);
        }
        for kind in [Related::Notes, Related::Attachments, Related::Activities] {
            let found: Vec<i64> = sqlx::query_scalar(&format!(
                "SELECT id FROM {} WHERE parent_module = $1 AND parent_id = $2 ORDER BY id LIMIT 1000",
                kind.table()
            ))
            .bind(c.module.as_str())
            .bind(c.id)
            .fetch_all(&mut *conn)
            .await?;
            let name = match kind {
                Related::Notes => "note",
                Related::Attachments => "attachment",
                Related::Activities => "activity",
            };
            out.entry((c.module, c.id))
                .or_default()
                .extend(found.into_iter().filter(|id| !moved.contains(id)).map(|id| format!("{name} {id}")));
        }
    }
    out.retain(|_, v| !v.is_empty());
    Ok(out)
}

/// "leads" → "lead": how a referencing row is named.
fn singular(table: &str) -> &str {
    table.strip_suffix('s').unwrap_or(table)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Tags other leads converted into the records this one filled brought:
/// a tag this conversion added that a later one brought too stays.
async fn later_tags(
    conn: &mut PgConnection,
    of: Uuid,
    lead_id: i64,
    entry: &Entry,
) -> sqlx::Result<HashMap<(Module, i64), Vec<(i64, String)>>> {
    let mut out = HashMap::new();
    for f in entry.filled.iter().filter(|f| f.field == "tags") {
        let column = match f.module {
            Module::Contact => "converted_contact_id",
            Module::Account => "converted_account_id",
            Module::Deal => "converted_deal_id",
            Module::Lead => continue,
        };
        // Later than this conversion, by the journal: an earlier one that
        // had the tag would have left nothing for this one to add.
        let tags: Vec<(i64, String)> = sqlx::query_as(&format!(
            "SELECT l.id, unnest(l.tags) FROM leads l
             JOIN conversion_journal j ON j.lead_id = l.id AND j.undone_at IS NULL
             WHERE l.{column} = $1 AND l.id <> $2 AND l.converted_at IS NOT NULL
               AND j.created_at > (SELECT created_at FROM conversion_journal WHERE job_id = $3 AND lead_id = $2)"
        ))
        .bind(f.id)
        .bind(lead_id)
        .bind(of)
        .fetch_all(&mut *conn)
        .await?;
        out.insert((f.module, f.id), tags);
    }
    Ok(out)
}

/// Carries a [`Takeback`] out, in the caller's transaction.
async fn carry_out(conn: &mut PgConnection, lead_id: i64, t: &Takeback) -> sqlx::Result<()> {
    for kind in [Related::Notes, Related::Attachments, Related::Activities] {
        let ids: Vec<i64> = t.move_back.iter().filter(|(k, _)| *k == kind).map(|(_, id)| *id).collect();
        if !ids.is_empty() {
            sqlx::query(&format!(
                "UPDATE {} SET parent_module = 'lead', parent_id = $2 WHERE id = ANY($1)",
                kind.table()
            ))
            .bind(&ids)
            .bind(lead_id)
            .execute(&mut *conn)
            .await?;
        }
    }
    if !t.delete_copies.is_empty() {
        sqlx::query("DELETE FROM notes WHERE id = ANY($1)").bind(&t.delete_copies).execute(&mut *conn).await?;
    }
    // Fields set back, a statement per record.
    let mut by_record: Vec<((Module, i64), Vec<&undo::Restore>)> = Vec::new();
    for r in &t.restore {
        match by_record.iter_mut().find(|(k, _)| *k == (r.module, r.id)) {
            Some((_, list)) => list.push(r),
            None => by_record.push(((r.module, r.id), vec![r])),
        }
    }
    for ((module, id), restores) in by_record {
        let (name, columns) = writable_columns(module);
        let (mut sets, mut patch) = (Vec::new(), Record::new());
        let (mut drop_keys, mut put_keys) = (Vec::new(), serde_json::Map::new());
        for r in restores {
            match r.field.strip_prefix(crate::journal::CUSTOM_PREFIX) {
                Some(key) if r.value.is_null() => drop_keys.push(key.to_owned()),
                Some(key) => {
                    put_keys.insert(key.to_owned(), r.value.clone());
                }
                None => {
                    // Only columns a conversion writes: never a name from elsewhere.
                    assert!(columns.contains(&r.field.as_str()), "{} is not a writable column of {name}", r.field);
                    sets.push(format!("{0} = p.{0}", r.field));
                    patch.insert(r.field.clone(), r.value.clone());
                }
            }
        }
        if !drop_keys.is_empty() || !put_keys.is_empty() {
            sets.push("custom_fields = (coalesce(t.custom_fields, '{}'::jsonb) - $3::text[]) || $4::jsonb".into());
        }
        sqlx::query(&format!(
            "UPDATE {name} t SET {} FROM jsonb_populate_record(NULL::{name}, $2) p WHERE t.id = $1",
            sets.join(", ")
        ))
        .bind(id)
        .bind(Json(&patch))
        .bind(&drop_keys)
        .bind(Json(&Value::Object(put_keys)))
        .execute(&mut *conn)
        .await?;
    }
    // The lead first: its converted_* point at the records deleted below.
    sqlx::query(
        "UPDATE leads l SET lead_status = p.lead_status, is_repeat = p.is_repeat, converted_at = p.converted_at,
                converted_account_id = p.converted_account_id, converted_contact_id = p.converted_contact_id,
                converted_deal_id = p.converted_deal_id
         FROM jsonb_populate_record(NULL::leads, $2) p WHERE l.id = $1",
    )
    .bind(lead_id)
    .bind(Json(&t.lead))
    .execute(&mut *conn)
    .await?;
    for (module, id) in &t.delete {
        sqlx::query(&format!("DELETE FROM {} WHERE id = $1", table(*module))).bind(id).execute(&mut *conn).await?;
    }
    Ok(())
}

/// What undoing each lead of `of` would do, written nowhere: the undo's
/// dry run. Leads are decided as the undo takes them back: the latest
/// conversions first (a lead that merged into another's records before
/// that one), each seeing what the earlier ones of the run take back.
pub async fn dry_run(pool: &PgPool, of: &crate::store::job::UndoOf) -> Result<Vec<(i64, UndoVerdict)>, crate::Error> {
    crate::store::job::check_undo(pool, of).await?;
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let leads: Vec<i64> = sqlx::query_scalar(
        "SELECT r.lead_id FROM conversion_results r
         LEFT JOIN conversion_journal j ON j.job_id = r.job_id AND j.lead_id = r.lead_id
         WHERE r.job_id = $1 AND r.outcome = 'converted' AND ($2::bigint[] IS NULL OR r.lead_id = ANY($2))
         ORDER BY j.created_at DESC NULLS LAST, r.lead_id DESC",
    )
    .bind(of.job_id)
    .bind(of.lead_ids.as_deref())
    .fetch_all(&mut *tx)
    .await?;
    let mut seen = Overlay::default();
    let mut out = Vec::with_capacity(leads.len());
    for lead_id in leads {
        let (entry, mut now) = read_now(&mut tx, of.job_id, lead_id, None).await?;
        seen.lay_over(&mut now);
        let verdict = undo::decide(lead_id, entry.as_ref(), &now);
        if let UndoVerdict::Undo(t) = &verdict {
            seen.note(lead_id, t);
        }
        out.push((lead_id, verdict));
    }
    out.sort_by_key(|(lead_id, _)| *lead_id);
    Ok(out)
}

/// What the undos decided earlier in a dry run changed, laid over what a
/// later lead reads (the database, unchanged by a dry run).
#[derive(Default)]
struct Overlay {
    /// Names of rows gone or detached: deleted records, leads taken back,
    /// rows moved back to their lead, copies deleted, contacts unlinked.
    gone: HashSet<String>,
    deleted: HashSet<(Module, i64)>,
    restored: HashMap<(Module, i64), Vec<(String, Value)>>,
    leads: HashSet<i64>,
}

impl Overlay {
    fn note(&mut self, lead_id: i64, t: &Takeback) {
        self.leads.insert(lead_id);
        self.gone.insert(format!("lead {lead_id}"));
        for (m, id) in &t.delete {
            self.deleted.insert((*m, *id));
            self.gone.insert(format!("{} {id}", m.as_str()));
        }
        for (kind, id) in &t.move_back {
            let name = match kind {
                Related::Notes => "note",
                Related::Attachments => "attachment",
                Related::Activities => "activity",
            };
            self.gone.insert(format!("{name} {id}"));
        }
        for id in &t.delete_copies {
            self.gone.insert(format!("note {id}"));
        }
        for r in &t.restore {
            if r.module == Module::Contact && r.field == "account_id" {
                self.gone.insert(format!("contact {}", r.id));
            }
            self.restored.entry((r.module, r.id)).or_default().push((r.field.clone(), r.value.clone()));
        }
    }

    fn lay_over(&self, now: &mut Now) {
        now.records.retain(|k, _| !self.deleted.contains(k));
        for (k, row) in now.records.iter_mut() {
            for (field, value) in self.restored.get(k).into_iter().flatten() {
                crate::journal::set_field(row, field, value.clone());
            }
        }
        for users in now.used_by.values_mut() {
            users.retain(|u| !self.gone.contains(u));
        }
        now.used_by.retain(|_, u| !u.is_empty());
        for tags in now.later_tags.values_mut() {
            tags.retain(|(lead, _)| !self.leads.contains(lead));
        }
    }
}
