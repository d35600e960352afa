//! Taking conversions back (SPEC §4a): an undo job's leads, in batches,
//! through the same queue and workers as conversion.
//!
//! Follow a batch here: lock its pending result rows in the undo job, lock
//! the lead rows and the advisory locks of their keys (the very keys a
//! conversion of the same e-mail or company takes, so the two never
//! interleave), read their journal entries and the records as they are now
//! (`Now`), decide lead after lead (`undo::Run`, shared with the dry run),
//! carry the decisions out, record the results, commit.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::error::ErrorCode;
use crate::journal::{Entry, Related};
use crate::plan::LeadKeys;
use crate::record::{Module, Record};
use crate::store::apply::{as_kept, writable_columns, Converted};
use crate::store::convert::{self, ConvertError, Done, Finish, Item, LeadResult};
use crate::store::options::Settings;
use crate::store::snapshot;
use crate::store::types::{JobStatus, Outcome};
use crate::undo::{self, Now, RelatedRow, Takeback, UndoVerdict};

/// Deadlocks are resolved by trying the batch again at once, this many
/// times.
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
/// `of`, in one transaction, as a conversion batch converts: the batch's
/// journal entries and the records they name read together, each lead
/// decided in turn (the latest conversions first) seeing what the earlier
/// ones of the batch take back ([`undo::Run`], as the dry run decides),
/// written with a fixed number of statements, one commit.
///
/// A lead whose created records are used by a lead of `of` converted after
/// it, which this job has not taken back yet and which is not in the batch
/// (or waits itself), waits for it: [`ConvertError::Waits`], nothing of it
/// written, its message comes back after a short delay. So a lead that
/// merged into another's records is taken back first, whatever order the
/// workers get them in.
///
/// Failures as for [`convert::convert_batch`]: a database error rolls the
/// batch back and its leads are taken back one by one, so the bad lead
/// fails alone; a delete refused by a reference that appeared after the
/// check (another table's row made meanwhile) skips that lead `in_use`.
pub async fn undo_batch(
    pool: &PgPool,
    job_id: Uuid,
    of: Uuid,
    settings: &Settings,
    items: &[Item],
) -> Result<Vec<Result<LeadResult, ConvertError>>, ConvertError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let e = match try_batch(pool, job_id, of, settings, items, tries).await {
            Ok(results) => return Ok(results),
            Err(e) => e,
        };
        match e {
            ConvertError::Transient(e) if tries < LOCAL_TRIES && convert::is_lock_conflict(&e) => {
                tokio::time::sleep(std::time::Duration::from_millis(5 << tries)).await;
            }
            ConvertError::Transient(e) if items.len() == 1 || !convert::is_lock_wait(&e) => {
                return Err(ConvertError::Transient(e))
            }
            e if items.len() > 1 => {
                tracing::warn!(error = %e, leads = items.len(), "undo batch failed; taking its leads back one by one");
                metrics::counter!(crate::metrics::BATCH_SPLITS).increment(1);
                let mut results = Vec::with_capacity(items.len());
                for item in items {
                    results.push(match Box::pin(undo_batch(pool, job_id, of, settings, &[*item])).await {
                        Ok(mut one) => one.pop().expect("one result per lead"),
                        Err(e) => Err(e),
                    });
                }
                return Ok(results);
            }
            ConvertError::Database(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23503") => {
                let item = &items[0];
                let f = Finish::skipped(
                    ErrorCode::InUse,
                    format!("a record this conversion created is referenced elsewhere ({})", db.message()),
                );
                return Ok(vec![convert::record(pool, job_id, item.lead_id, &f, item.earlier_attempts + tries).await]);
            }
            e @ ConvertError::NotInJob { .. } => return Ok(vec![Err(e)]),
            e => return Err(e),
        }
    }
}

async fn try_batch(
    pool: &PgPool,
    job_id: Uuid,
    of: Uuid,
    settings: &Settings,
    items: &[Item],
    tries: u32,
) -> Result<Vec<Result<LeadResult, ConvertError>>, ConvertError> {
    let started = std::time::Instant::now();
    let mut tx = pool.begin().await?;
    let mut ids: Vec<i64> = items.iter().map(|i| i.lead_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let locked = convert::lock_results(&mut tx, job_id, &ids).await?;
    let (cancelled, workflow) =
        locked.first().map(|l| (l.job_status == JobStatus::Cancelled, l.workflow)).unwrap_or((false, false));
    let mut recorded: HashMap<i64, Result<LeadResult, ConvertError>> = HashMap::new();
    let mut pending: Vec<i64> = Vec::new();
    let mut rows: HashMap<i64, String> = HashMap::new();
    for l in locked {
        if l.result.outcome == Outcome::Pending {
            pending.push(l.result.lead_id);
            rows.insert(l.result.lead_id, l.row);
        } else {
            recorded.insert(l.result.lead_id, Ok(l.result));
        }
    }

    let mut finishes: Vec<(i64, Finish)> = Vec::new();
    if cancelled {
        for &lead_id in &pending {
            finishes.push((lead_id, Finish::skipped(ErrorCode::Cancelled, format!("job {job_id} was cancelled"))));
        }
    } else if !pending.is_empty() {
        let (reads, later) = read_batch(&mut tx, of, &pending, Some((settings, job_id))).await?;
        let mut run = undo::Run::default();
        let mut waiting: HashSet<i64> = HashSet::new();
        let mut takebacks: Vec<(i64, Takeback)> = Vec::new();
        let in_batch: HashSet<i64> = pending.iter().copied().collect();
        for read in reads {
            let lead_id = read.lead_id;
            // Leads converted after this one into its records, not taken
            // back yet: those of the batch were decided just before this
            // one, unless they wait; the others are another batch's.
            let blockers: Vec<i64> = later
                .get(&lead_id)
                .into_iter()
                .flatten()
                .copied()
                .filter(|l| !in_batch.contains(l) || waiting.contains(l))
                .collect();
            if !blockers.is_empty() {
                waiting.insert(lead_id);
                recorded.insert(lead_id, Err(ConvertError::Waits(blockers)));
                continue;
            }
            let finish = match run.decide(lead_id, read.entry.as_ref(), read.now) {
                UndoVerdict::Skipped { code, message, .. } => Finish::skipped(code, message),
                UndoVerdict::Undo(t) => {
                    let entry = read.entry.as_ref().expect("an undo has a journal entry");
                    let id = |k: &str| entry.lead.after.get(k).and_then(Value::as_i64);
                    let ids = Converted {
                        contact_id: id("converted_contact_id"),
                        account_id: id("converted_account_id"),
                        deal_id: id("converted_deal_id"),
                    };
                    let note = t.opt_out_kept.map(|c| format!("the e-mail opt-out on {c} stays (consent wins)"));
                    takebacks.push((lead_id, *t));
                    Finish::undone(ids, note)
                }
            };
            finishes.push((lead_id, finish));
        }
        carry_out(&mut tx, &takebacks).await?;
        let undone: Vec<i64> = takebacks.iter().map(|(lead_id, _)| *lead_id).collect();
        if !undone.is_empty() {
            sqlx::query(
                "UPDATE conversion_journal SET undone_at = now(), undone_by = $3 WHERE job_id = $1 AND lead_id = ANY($2)",
            )
            .bind(of)
            .bind(&undone)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        }
    }
    if finishes.is_empty() {
        // Nothing to record (every lead recorded already, or waiting).
        tx.rollback().await?;
    } else {
        finishes.sort_by_key(|(lead_id, _)| *lead_id);
        let item = |lead_id: i64| items.iter().find(|i| i.lead_id == lead_id).expect("a lead of the batch");
        let done: Vec<Done> = finishes
            .iter()
            .map(|(lead_id, finish)| Done {
                job_id,
                lead_id: *lead_id,
                row: &rows[lead_id],
                finish,
                tries: item(*lead_id).earlier_attempts + tries,
                enqueued_at: item(*lead_id).enqueued_at,
                workflow,
            })
            .collect();
        let fresh = convert::finish(&mut tx, &done, Some(started)).await?;
        tx.commit().await?;
        for r in fresh {
            crate::metrics::record_result(&r, started.elapsed());
            recorded.insert(r.lead_id, Ok(r));
        }
    }
    // A lead twice in the batch (a message published twice): the second
    // finds it recorded by the first.
    let mut seen = HashSet::new();
    Ok(items
        .iter()
        .map(|i| {
            let first = seen.insert(i.lead_id);
            match recorded.get(&i.lead_id) {
                Some(Ok(r)) => Ok(r.clone()),
                Some(Err(ConvertError::Waits(w))) if first => Err(ConvertError::Waits(w.clone())),
                _ => Err(ConvertError::NotInJob { job_id, lead_id: i.lead_id }),
            }
        })
        .collect())
}

/// One lead of a batch as read: its journal entry in the converted job,
/// when that was written, and the world as it is now.
pub(crate) struct Read {
    pub(crate) lead_id: i64,
    pub(crate) entry: Option<Entry>,
    at: Option<DateTime<Utc>>,
    pub(crate) now: Now,
}

/// For each lead of `reads`, the leads of the converted job `of` still
/// pending in undo job `job_id`, converted after it into a contact or
/// account its conversion created or filled: they are taken back first
/// (their fills, links and tags lie over this lead's).
async fn later_of_same_job(
    conn: &mut PgConnection,
    job_id: Uuid,
    of: Uuid,
    reads: &[(i64, &Entry, DateTime<Utc>)],
) -> sqlx::Result<HashMap<i64, Vec<i64>>> {
    let touched = |entry: &Entry, m: Module| -> Vec<i64> {
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
    let (mut contacts, mut accounts) = (Vec::new(), Vec::new());
    for (_, e, _) in reads {
        contacts.extend(touched(e, Module::Contact));
        accounts.extend(touched(e, Module::Account));
    }
    if contacts.is_empty() && accounts.is_empty() {
        return Ok(HashMap::new());
    }
    contacts.sort_unstable();
    contacts.dedup();
    accounts.sort_unstable();
    accounts.dedup();
    // The leads converted into those records first (indexed, usually
    // none but the batch's own), then which of them are pending here: by
    // primary key, whatever the statistics of a job's results just
    // inserted say.
    let candidates: Vec<(i64, Option<i64>, Option<i64>)> = sqlx::query_as(
        "SELECT id, converted_contact_id, converted_account_id FROM leads
         WHERE converted_contact_id = ANY($1) OR converted_account_id = ANY($2)",
    )
    .bind(&contacts)
    .bind(&accounts)
    .fetch_all(&mut *conn)
    .await?;
    if candidates.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<i64> = candidates.iter().map(|c| c.0).collect();
    let pending: HashMap<i64, DateTime<Utc>> = sqlx::query_as(
        "SELECT r.lead_id, j.created_at FROM conversion_results r
         JOIN conversion_journal j ON j.job_id = $2 AND j.lead_id = r.lead_id AND j.undone_at IS NULL
         WHERE r.job_id = $1 AND r.lead_id = ANY($3) AND r.outcome = 'pending'",
    )
    .bind(job_id)
    .bind(of)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    let mut out: HashMap<i64, Vec<i64>> = HashMap::new();
    for &(lead_id, entry, at) in reads {
        let (mine_c, mine_a) = (touched(entry, Module::Contact), touched(entry, Module::Account));
        let mut later: Vec<i64> = candidates
            .iter()
            .filter(|(id, c, a)| {
                *id != lead_id
                    && (c.is_some_and(|c| mine_c.binary_search(&c).is_ok())
                        || a.is_some_and(|a| mine_a.binary_search(&a).is_ok()))
                    && pending.get(id).is_some_and(|t| (*t, *id) > (at, lead_id))
            })
            .map(|(id, _, _)| *id)
            .collect();
        if !later.is_empty() {
            later.sort_unstable();
            later.dedup();
            out.insert(lead_id, later);
        }
    }
    Ok(out)
}

/// Something about records, for each lead of a batch.
type PerLead<T> = HashMap<i64, HashMap<(Module, i64), T>>;

/// A related row as read: id, parent module and id, title and body (notes).
type RelatedRead = (i64, String, i64, Option<Json<Value>>, Option<Json<Value>>);

/// The journal entries in job `of` of `lead_ids` and the world as it is
/// now, read for all of them at once, with every row locked when `undo`
/// (its settings and the undo job's id) is given; the dry run reads
/// without locks. In the order the undo decides them: the latest
/// conversions first, leads without an entry last. With them, for an
/// undo, the leads each must wait for ([`later_of_same_job`]).
pub(crate) async fn read_batch(
    conn: &mut PgConnection,
    of: Uuid,
    lead_ids: &[i64],
    undo: Option<(&Settings, Uuid)>,
) -> sqlx::Result<(Vec<Read>, HashMap<i64, Vec<i64>>)> {
    let settings = undo.map(|(settings, _)| settings);
    let locking = if settings.is_some() { " FOR UPDATE" } else { "" };
    // Each lead with its e-mail and company as matching and locking see them.
    type LeadRead = (i64, Json<Record>, Option<String>, Option<String>);
    let leads: Vec<LeadRead> = sqlx::query_as(&format!(
        "SELECT id, row_to_json(l), {} FROM leads l WHERE id = ANY($1) ORDER BY id{locking}",
        snapshot::LEAD_KEYS
    ))
    .bind(lead_ids)
    .fetch_all(&mut *conn)
    .await?;
    let keys: Vec<LeadKeys> =
        leads.iter().map(|(_, _, email, company)| snapshot::lock_keys_of(email.clone(), company.clone())).collect();
    if let Some(settings) = settings {
        // The keys a conversion of these leads' e-mails or companies locks.
        snapshot::lock(conn, leads.iter().map(|(_, j, _, _)| &j.0).zip(&keys), settings).await?;
    }
    let mut leads: HashMap<i64, Record> = leads.into_iter().map(|(id, j, _, _)| (id, j.0)).collect();
    let rows: Vec<(i64, Json<Entry>, bool, DateTime<Utc>)> = sqlx::query_as(&format!(
        "SELECT lead_id, entry, undone_at IS NOT NULL, created_at FROM conversion_journal
         WHERE job_id = $1 AND lead_id = ANY($2) ORDER BY lead_id{locking}"
    ))
    .bind(of)
    .bind(lead_ids)
    .fetch_all(&mut *conn)
    .await?;
    let entries: HashMap<i64, (Entry, bool, DateTime<Utc>)> =
        rows.into_iter().map(|(lead_id, Json(e), undone, at)| (lead_id, (e, undone, at))).collect();

    // The records the entries name, locked in one global order: contacts,
    // accounts, deals, each by id.
    let mut ids: HashMap<Module, Vec<i64>> = HashMap::new();
    for (e, _, _) in entries.values() {
        for (m, id) in e.created.iter().map(|c| (c.module, c.id)).chain(e.filled.iter().map(|f| (f.module, f.id))) {
            ids.entry(m).or_default().push(id);
        }
    }
    let mut records: HashMap<(Module, i64), Record> = HashMap::new();
    for m in [Module::Contact, Module::Account, Module::Deal] {
        let Some(list) = ids.get_mut(&m) else { continue };
        list.sort_unstable();
        list.dedup();
        let rows: Vec<(i64, Json<Record>)> = sqlx::query_as(&format!(
            "SELECT id, row_to_json(t) FROM {} t WHERE id = ANY($1) ORDER BY id{locking}",
            table(m)
        ))
        .bind(&*list)
        .fetch_all(&mut *conn)
        .await?;
        records.extend(rows.into_iter().map(|(id, r)| ((m, id), as_kept(r.0))));
    }

    // The related rows the entries moved or copied.
    let mut related: HashMap<Related, Vec<i64>> = HashMap::new();
    for (e, _, _) in entries.values() {
        for m in &e.moved {
            related.entry(m.table).or_default().push(m.id);
        }
        for c in &e.copies {
            related.entry(Related::Notes).or_default().push(c.id);
        }
    }
    let mut rows: HashMap<(Related, i64), RelatedRow> = HashMap::new();
    for kind in [Related::Notes, Related::Attachments, Related::Activities] {
        let Some(list) = related.get_mut(&kind) else { continue };
        list.sort_unstable();
        list.dedup();
        let (title, body) =
            if kind == Related::Notes { ("to_jsonb(title)", "to_jsonb(body)") } else { ("NULL::jsonb", "NULL::jsonb") };
        let found: Vec<RelatedRead> = sqlx::query_as(&format!(
            "SELECT id, parent_module, parent_id, {title}, {body} FROM {} WHERE id = ANY($1) ORDER BY id{locking}",
            kind.table()
        ))
        .bind(&*list)
        .fetch_all(&mut *conn)
        .await?;
        for (id, parent_module, parent_id, title, body) in found {
            let row = RelatedRow {
                parent_module,
                parent_id,
                title: title.map_or(Value::Null, |j| j.0),
                body: body.map_or(Value::Null, |j| j.0),
            };
            rows.insert((kind, id), row);
        }
    }

    let with_entries: Vec<(i64, &Entry, DateTime<Utc>)> =
        entries.iter().map(|(lead_id, (e, _, at))| (*lead_id, e, *at)).collect();
    // Who must wait is read before what later work there is. Each statement
    // sees every commit made before it starts (READ COMMITTED), so a later
    // lead of the job not seen pending here is seen taken back below, never
    // the other way round: read after, a lead whose undo committed in
    // between counted as later work (its tags kept on this lead's account)
    // while nothing made this lead wait for it.
    let later = match undo {
        Some((_, job_id)) => {
            let later = later_of_same_job(conn, job_id, of, &with_entries).await?;
            // Where a test lets another undo commit between the two reads.
            fail::fail_point!("undo-between-waits-and-later-work");
            later
        }
        None => HashMap::new(),
    };
    let mut used_by = used_by(conn, &with_entries).await?;
    let mut later_tags = later_tags(conn, &with_entries).await?;

    let mut out: Vec<Read> = Vec::with_capacity(lead_ids.len());
    let mut entries = entries;
    for &lead_id in lead_ids {
        let lead = leads.remove(&lead_id);
        let Some((entry, undone, at)) = entries.remove(&lead_id) else {
            out.push(Read { lead_id, entry: None, at: None, now: Now { lead, ..Default::default() } });
            continue;
        };
        let mut now = Now {
            lead,
            undone,
            used_by: used_by.remove(&lead_id).unwrap_or_default(),
            later_tags: later_tags.remove(&lead_id).unwrap_or_default(),
            ..Default::default()
        };
        for key in entry.created.iter().map(|c| (c.module, c.id)).chain(entry.filled.iter().map(|f| (f.module, f.id))) {
            if let Some(r) = records.get(&key) {
                now.records.insert(key, r.clone());
            }
        }
        for key in
            entry.moved.iter().map(|m| (m.table, m.id)).chain(entry.copies.iter().map(|c| (Related::Notes, c.id)))
        {
            if let Some(r) = rows.get(&key) {
                now.rows.insert(key, r.clone());
            }
        }
        out.push(Read { lead_id, entry: Some(entry), at: Some(at), now });
    }
    // The latest conversions first (a lead that merged into another's
    // records before that one), leads without an entry last.
    out.sort_by_key(|r| std::cmp::Reverse((r.at.is_some(), r.at, r.lead_id)));
    Ok((out, later))
}

/// For each lead of `entries`, what refers to each record its conversion
/// created, other than what the same conversion made: rows of any table
/// with a foreign key to it (another contact of the account, a deal, a
/// lead converted into it since) and notes, attachments and activities
/// attached to it.
async fn used_by(
    conn: &mut PgConnection,
    entries: &[(i64, &Entry, DateTime<Utc>)],
) -> sqlx::Result<PerLead<Vec<String>>> {
    let mut out: PerLead<Vec<String>> = HashMap::new();
    let mut created: HashMap<Module, Vec<i64>> = HashMap::new();
    for (_, e, _) in entries {
        for c in &e.created {
            created.entry(c.module).or_default().push(c.id);
        }
    }
    if created.is_empty() {
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
    // Every reference to a created record, by the referencing row's name,
    // in a fixed order.
    let mut refs: HashMap<(Module, i64), Vec<String>> = HashMap::new();
    for m in [Module::Contact, Module::Account, Module::Deal] {
        let Some(list) = created.get_mut(&m) else { continue };
        list.sort_unstable();
        list.dedup();
        for (from, column, _) in fks.iter().filter(|(_, _, to)| to == table(m)) {
            let crm = matches!(from.as_str(), "leads" | "contacts" | "deals" | "accounts");
            let found: Vec<(i64, Option<i64>)> = sqlx::query_as(&format!(
                "SELECT {column}::bigint, {id} FROM {from} WHERE {column} = ANY($1) ORDER BY 1, 2",
                id = if crm { "id::bigint" } else { "NULL::bigint" },
                from = quote_ident(from),
                column = quote_ident(column),
            ))
            .bind(&*list)
            .fetch_all(&mut *conn)
            .await?;
            for (record, id) in found {
                let label = match id {
                    Some(id) => format!("{} {id}", singular(from)),
                    None => format!("{from}.{column}"),
                };
                refs.entry((m, record)).or_default().push(label);
            }
        }
        for kind in [Related::Notes, Related::Attachments, Related::Activities] {
            let found: Vec<(i64, i64)> = sqlx::query_as(&format!(
                "SELECT parent_id, id FROM {} WHERE parent_module = $1 AND parent_id = ANY($2) ORDER BY 1, 2",
                kind.table()
            ))
            .bind(m.as_str())
            .bind(&*list)
            .fetch_all(&mut *conn)
            .await?;
            for (record, id) in found {
                refs.entry((m, record)).or_default().push(format!("{} {id}", related_name(kind)));
            }
        }
    }
    for (lead_id, e, _) in entries {
        // The rows of this very conversion do not count: its lead, the
        // records it created (a deal of its contact and account), contacts
        // it linked to its account (their link goes back with it), the
        // rows it moved or copied.
        let mut own: HashSet<String> = HashSet::new();
        own.insert(format!("lead {lead_id}"));
        for c in &e.created {
            own.insert(format!("{} {}", c.module.as_str(), c.id));
        }
        for m in &e.moved {
            own.insert(format!("{} {}", related_name(m.table), m.id));
        }
        for c in &e.copies {
            own.insert(format!("note {}", c.id));
        }
        for c in &e.created {
            let Some(found) = refs.get(&(c.module, c.id)) else { continue };
            let linked = |label: &str| {
                e.filled.iter().any(|f| {
                    f.module == Module::Contact
                        && f.field == "account_id"
                        && f.after.as_i64() == Some(c.id)
                        && label == format!("contact {}", f.id)
                })
            };
            let users: Vec<String> = found.iter().filter(|l| !own.contains(*l) && !linked(l)).cloned().collect();
            if !users.is_empty() {
                out.entry(*lead_id).or_default().insert((c.module, c.id), users);
            }
        }
    }
    Ok(out)
}

fn related_name(kind: Related) -> &'static str {
    match kind {
        Related::Notes => "note",
        Related::Attachments => "attachment",
        Related::Activities => "activity",
    }
}

/// "leads" → "lead": how a referencing row is named.
fn singular(table: &str) -> &str {
    table.strip_suffix('s').unwrap_or(table)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// For each lead of `entries`, the tags other leads converted into the
/// records it filled tags on brought, by lead: a tag this conversion added
/// that a later one brought too stays.
async fn later_tags(
    conn: &mut PgConnection,
    entries: &[(i64, &Entry, DateTime<Utc>)],
) -> sqlx::Result<PerLead<Vec<(i64, String)>>> {
    let mut out: PerLead<Vec<(i64, String)>> = HashMap::new();
    for m in [Module::Contact, Module::Account, Module::Deal] {
        let mut ids: Vec<i64> = entries
            .iter()
            .flat_map(|(_, e, _)| e.filled.iter().filter(|f| f.field == "tags" && f.module == m).map(|f| f.id))
            .collect();
        if ids.is_empty() {
            continue;
        }
        ids.sort_unstable();
        ids.dedup();
        let column = match m {
            Module::Contact => "converted_contact_id",
            Module::Account => "converted_account_id",
            _ => "converted_deal_id",
        };
        let found: Vec<(i64, i64, String, DateTime<Utc>)> = sqlx::query_as(&format!(
            "SELECT l.{column}, l.id, t.tag, j.created_at FROM leads l
             JOIN conversion_journal j ON j.lead_id = l.id AND j.undone_at IS NULL
             CROSS JOIN unnest(l.tags) AS t(tag)
             WHERE l.{column} = ANY($1) AND l.converted_at IS NOT NULL
             ORDER BY 1, 2"
        ))
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?;
        for (lead_id, e, at) in entries {
            for f in e.filled.iter().filter(|f| f.field == "tags" && f.module == m) {
                // Later than this conversion, by the journal: an earlier
                // one that had the tag would have left nothing to add. The
                // same time counts as later: leads of one batch (several
                // convert-now jobs' among them) are journaled by one
                // statement, and may share a microsecond; keeping a tag an
                // earlier lead brought loses nothing, removing one a later
                // lead brought would.
                let tags: Vec<(i64, String)> = found
                    .iter()
                    .filter(|(record, l, _, when)| *record == f.id && l != lead_id && when >= at)
                    .map(|(_, l, tag, _)| (*l, tag.clone()))
                    .collect();
                out.entry(*lead_id).or_default().insert((m, f.id), tags);
            }
        }
    }
    Ok(out)
}

/// Carries out the [`Takeback`]s of a batch, decided in this order (the
/// latest conversions first), in the caller's transaction: a fixed number
/// of statements whatever the number of leads. Fields first, each record's
/// set back to what the earliest conversion found; then the leads, whose
/// `converted_*` point at the records deleted last (deals, contacts,
/// accounts: no foreign key minds).
async fn carry_out(conn: &mut PgConnection, takebacks: &[(i64, Takeback)]) -> sqlx::Result<()> {
    if takebacks.is_empty() {
        return Ok(());
    }
    for kind in [Related::Notes, Related::Attachments, Related::Activities] {
        let (ids, leads): (Vec<i64>, Vec<i64>) = takebacks
            .iter()
            .flat_map(|(lead_id, t)| t.move_back.iter().filter(|(k, _)| *k == kind).map(move |(_, id)| (*id, *lead_id)))
            .unzip();
        if !ids.is_empty() {
            sqlx::query(&format!(
                "UPDATE {} r SET parent_module = 'lead', parent_id = v.lead_id
                 FROM unnest($1::bigint[], $2::bigint[]) AS v(id, lead_id) WHERE r.id = v.id",
                kind.table()
            ))
            .bind(&ids)
            .bind(&leads)
            .execute(&mut *conn)
            .await?;
        }
    }
    let copies: Vec<i64> = takebacks.iter().flat_map(|(_, t)| t.delete_copies.iter().copied()).collect();
    if !copies.is_empty() {
        sqlx::query("DELETE FROM notes WHERE id = ANY($1)").bind(&copies).execute(&mut *conn).await?;
    }

    // Fields set back: per record, each field's value from the last lead
    // decided (the earliest conversion) that restores it.
    for module in [Module::Contact, Module::Account, Module::Deal] {
        let mut per_record: Vec<(i64, serde_json::Map<String, Value>)> = Vec::new();
        for r in takebacks.iter().flat_map(|(_, t)| &t.restore).filter(|r| r.module == module) {
            let i = match per_record.iter().position(|(id, _)| *id == r.id) {
                Some(i) => i,
                None => {
                    per_record.push((r.id, serde_json::Map::new()));
                    per_record.len() - 1
                }
            };
            per_record[i].1.insert(r.field.clone(), r.value.clone());
        }
        if per_record.is_empty() {
            continue;
        }
        let (name, columns) = writable_columns(module);
        let mut set_columns: Vec<&str> = Vec::new();
        let (mut ids, mut patches, mut drops, mut puts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (id, fields) in per_record {
            let (mut patch, mut drop_keys, mut put_keys) = (Record::new(), Vec::new(), serde_json::Map::new());
            for (field, value) in fields {
                match field.strip_prefix(crate::journal::CUSTOM_PREFIX) {
                    Some(key) if value.is_null() => drop_keys.push(Value::String(key.to_owned())),
                    Some(key) => {
                        put_keys.insert(key.to_owned(), value);
                    }
                    None => {
                        // Only columns a conversion writes: never a name from elsewhere.
                        let column = columns
                            .iter()
                            .find(|c| **c == field && **c != "custom_fields")
                            .unwrap_or_else(|| panic!("{field} is not a writable column of {name}"));
                        if !set_columns.contains(column) {
                            set_columns.push(column);
                        }
                        patch.insert(field, value);
                    }
                }
            }
            ids.push(id);
            patches.push(Json(Value::Object(patch)));
            drops.push(Json(Value::Array(drop_keys)));
            puts.push(Json(Value::Object(put_keys)));
        }
        // A column is set from the patch only on the records whose patch
        // has it; custom fields key by key.
        let mut sets: Vec<String> =
            set_columns.iter().map(|c| format!("{c} = CASE WHEN v.patch ? '{c}' THEN p.{c} ELSE t.{c} END")).collect();
        sets.push(
            "custom_fields = (coalesce(t.custom_fields, '{}'::jsonb)
                 - ARRAY(SELECT jsonb_array_elements_text(v.drops))) || v.puts"
                .into(),
        );
        sqlx::query(&format!(
            "UPDATE {name} t SET {}
             FROM unnest($1::bigint[], $2::jsonb[], $3::jsonb[], $4::jsonb[]) AS v(id, patch, drops, puts)
             CROSS JOIN LATERAL jsonb_populate_record(NULL::{name}, v.patch) p
             WHERE t.id = v.id",
            sets.join(", ")
        ))
        .bind(&ids)
        .bind(&patches)
        .bind(&drops)
        .bind(&puts)
        .execute(&mut *conn)
        .await?;
    }

    // The leads before the records their converted_* point at.
    let leads: Vec<i64> = takebacks.iter().map(|(lead_id, _)| *lead_id).collect();
    let marks: Vec<Json<&Record>> = takebacks.iter().map(|(_, t)| Json(&t.lead)).collect();
    sqlx::query(
        "UPDATE leads l SET lead_status = p.lead_status, is_repeat = p.is_repeat, converted_at = p.converted_at,
                converted_account_id = p.converted_account_id, converted_contact_id = p.converted_contact_id,
                converted_deal_id = p.converted_deal_id
         FROM unnest($1::bigint[], $2::jsonb[]) AS v(id, marks)
         CROSS JOIN LATERAL jsonb_populate_record(NULL::leads, v.marks) p
         WHERE l.id = v.id",
    )
    .bind(&leads)
    .bind(&marks)
    .execute(&mut *conn)
    .await?;
    for module in [Module::Deal, Module::Contact, Module::Account] {
        let ids: Vec<i64> = takebacks
            .iter()
            .flat_map(|(_, t)| t.delete.iter().filter(|(m, _)| *m == module).map(|(_, id)| *id))
            .collect();
        if !ids.is_empty() {
            sqlx::query(&format!("DELETE FROM {} WHERE id = ANY($1)", table(module)))
                .bind(&ids)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
}

/// Leads a dry run reads at once.
const DRY_RUN_CHUNK: usize = 500;

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
    let mut run = undo::Run::default();
    let mut out = Vec::with_capacity(leads.len());
    for chunk in leads.chunks(DRY_RUN_CHUNK) {
        for read in read_batch(&mut tx, of.job_id, chunk, None).await?.0 {
            let verdict = run.decide(read.lead_id, read.entry.as_ref(), read.now);
            out.push((read.lead_id, verdict));
        }
    }
    out.sort_by_key(|(lead_id, _)| *lead_id);
    Ok(out)
}
