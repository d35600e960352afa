//! Gathering the [`Facts`] about one lead from Postgres.
//!
//! In a conversion the facts are read under locks that make them stay true
//! until commit: the lead row (so a lead is converted once), advisory locks
//! on its normalised e-mail, company and unique values (so two concurrent
//! conversions never both decide to create the same contact or account),
//! then the candidate records themselves. A dry run reads without locks.
//!
//! "The same" e-mail, company and name are decided by Postgres alone
//! (`leadconv_norm*`, migration 0009): the lead's keys, the lock keys, the
//! lookups and the keys of every record read are all computed there, so the
//! rules in `plan` and the dry run's memory in `run` compare keys and never
//! normalise text themselves.

use std::collections::HashMap;

use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgConnection;

use crate::plan::{ContactKeys, Facts, LeadKeys};
use crate::record::{self, Module, Record};
use crate::store::mapping::UniqueKey;
use crate::store::options::Settings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locking {
    /// For a conversion: hold everything read until the transaction ends.
    ForUpdate,
    /// For a dry run: read only.
    None,
}

impl Locking {
    fn clause(self) -> &'static str {
        match self {
            Locking::ForUpdate => " FOR UPDATE",
            Locking::None => "",
        }
    }
}

/// A contact as read: the row and its keys, normalised by Postgres.
const CONTACT: &str =
    "row_to_json(c), leadconv_norm_email(c.email), leadconv_norm(c.first_name), leadconv_norm(c.last_name)";
/// An account as read: the row and its normalised name.
const ACCOUNT: &str = "row_to_json(a), leadconv_norm_company(a.account_name)";

type ContactRow = (Json<Record>, Option<String>, Option<String>, Option<String>);
type AccountRow = (Json<Record>, Option<String>);
/// The lead and its keys: e-mail, company, first and last name.
type LeadRow = (Json<Record>, Option<String>, Option<String>, Option<String>, Option<String>);
type IdLeadRow = (i64, Json<Record>, Option<String>, Option<String>, Option<String>, Option<String>);

/// A lead's (`l`) e-mail and company as matching and locking compare
/// them: the columns of [`LeadKeys`]' `email` and `company`, in that order
/// (see [`lock_keys_of`]).
pub(crate) const LEAD_KEYS: &str = "leadconv_norm_email(l.email), leadconv_norm_company(l.company)";

/// The keys [`lock`] needs, from the columns of [`LEAD_KEYS`].
pub(crate) fn lock_keys_of(email: Option<String>, company: Option<String>) -> LeadKeys {
    LeadKeys { email, company, ..LeadKeys::default() }
}

/// The advisory locks of a batch of leads, taken in one statement in the
/// order of their 64-bit keys, so every transaction takes them in one
/// global order and two conversions cannot deadlock on them. The keys come
/// from the same SQL functions as the lookups (`leadconv_lock_key` over
/// `leadconv_norm*`): the e-mails and companies are bound as the statement
/// that read the leads normalised them ([`LeadKeys`]), so each is
/// normalised once a conversion (the normalising, not the locking, was
/// most of this statement's time). Unique values are compared as jsonb
/// (numbers by value), as `@>` does.
const LOCK_KEYS: &str = "
    SELECT pg_advisory_xact_lock(k) FROM (
        SELECT DISTINCT k FROM (
            SELECT leadconv_lock_key('email', e) FROM unnest($1::text[]) AS e
            UNION ALL
            SELECT leadconv_lock_key('company', c) FROM unnest($2::text[]) AS c
            UNION ALL
            SELECT leadconv_lock_key('unique:' || f, CASE jsonb_typeof(v) WHEN 'number' THEN trim_scale(v::numeric)::text
                                                                     ELSE v::text END)
            FROM unnest($3::text[], $4::jsonb[]) AS u(f, v)
        ) AS keys(k) WHERE k IS NOT NULL ORDER BY k
    ) AS sorted";

/// The unique values of a lead: `module.field` and the lead's value, for
/// the unique custom fields some lead field maps into.
fn unique_values(lead: &Record, settings: &Settings) -> Vec<(String, Json<Value>)> {
    let custom = record::custom_fields(lead);
    let mut out = Vec::new();
    for module in [Module::Contact, Module::Account] {
        for k in settings.fields.unique_keys(module) {
            if let Some(v) = custom.get(&k.lead_field).filter(|v| !record::is_empty(Some(v))) {
                out.push((format!("{}.{}", module.as_str(), k.target_field), Json(v.clone())));
            }
        }
    }
    out
}

/// The bind values of [`LOCK_KEYS`]: e-mails, companies, unique fields and
/// their values.
type LockArgs = (Vec<Option<String>>, Vec<Option<String>>, Vec<String>, Vec<Json<Value>>);

/// The bind values of [`LOCK_KEYS`] for `leads`, each with its keys as
/// the database normalised them.
fn lock_args<'a>(leads: impl Iterator<Item = (&'a Record, &'a LeadKeys)>, settings: &Settings) -> LockArgs {
    let (mut emails, mut companies, mut fields, mut values) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (lead, keys) in leads {
        emails.push(keys.email.clone());
        companies.push(keys.company.clone());
        for (f, v) in unique_values(lead, settings) {
            fields.push(f);
            values.push(v);
        }
    }
    (emails, companies, fields, values)
}

/// Takes the advisory locks of `leads` (see [`LOCK_KEYS`]), each given
/// with its keys as read by [`LEAD_KEYS`].
pub(crate) async fn lock<'a>(
    conn: &mut PgConnection,
    leads: impl Iterator<Item = (&'a Record, &'a LeadKeys)>,
    settings: &Settings,
) -> sqlx::Result<()> {
    let (emails, companies, fields, values) = lock_args(leads, settings);
    sqlx::query(LOCK_KEYS).bind(emails).bind(companies).bind(fields).bind(values).execute(conn).await?;
    Ok(())
}

/// The keys each of `lead_ids` (that exists) is converted under, as far as
/// the database tells before its conversion, in this order: the lock key
/// of its e-mail and of its company, as [`lock`] takes them (0: none),
/// then the company key of the account of each contact its e-mail matches
/// now (merging into that contact locks that account's row, as a lead of
/// that company does). The keys of unique fields are left out: they
/// depend on a job's mappings. The producer sends them with each message
/// (`queue::KEYS_HEADER`) so that workers form batches that do not wait
/// on each other's locks; the locks themselves are taken as always.
pub async fn lead_lock_keys(pool: &sqlx::PgPool, lead_ids: &[i64]) -> sqlx::Result<HashMap<i64, Vec<i64>>> {
    let rows: Vec<(i64, Vec<i64>)> = sqlx::query_as(
        "SELECT l.id, ARRAY[coalesce(leadconv_lock_key('email', leadconv_norm_email(l.email)), 0),
                            coalesce(leadconv_lock_key('company', leadconv_norm_company(l.company)), 0)]
                      || array_remove(ARRAY(
                             SELECT leadconv_lock_key('company', leadconv_norm_company(a.account_name))
                             FROM contacts c JOIN accounts a ON a.id = c.account_id
                             WHERE leadconv_norm_email(c.email) = leadconv_norm_email(l.email)), NULL)
         FROM leads l WHERE l.id = ANY($1)",
    )
    .bind(lead_ids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The lock keys [`lock`] takes for `lead`, sorted: for tests that check
/// that the locks and the matching agree on what is "the same".
pub async fn lock_keys(conn: &mut PgConnection, lead: &Record, settings: &Settings) -> sqlx::Result<Vec<i64>> {
    let (email, company): (Option<String>, Option<String>) =
        sqlx::query_as(&format!("SELECT {LEAD_KEYS} FROM jsonb_populate_record(NULL::leads, $1) AS l"))
            .bind(Json(lead))
            .fetch_one(&mut *conn)
            .await?;
    let keys = lock_keys_of(email, company);
    let (emails, companies, fields, values) = lock_args(std::iter::once((lead, &keys)), settings);
    let sql = LOCK_KEYS.replacen("SELECT pg_advisory_xact_lock(k) FROM", "SELECT k FROM", 1);
    sqlx::query_scalar(&sql).bind(emails).bind(companies).bind(fields).bind(values).fetch_all(conn).await
}

/// The facts of one lead (see [`load_batch`]).
pub async fn load(conn: &mut PgConnection, settings: &Settings, lead_id: i64, locking: Locking) -> sqlx::Result<Facts> {
    let mut all = load_batch(conn, settings, &[lead_id], locking).await?;
    Ok(all.pop().expect("one fact per lead"))
}

/// The facts of each of `lead_ids` (in that order; ids distinct), gathered
/// for all of them at once: a few set-based statements per batch, not per
/// lead. Each lead's facts are what the database holds before any of them
/// is converted; what earlier leads of the batch do is laid over them by
/// [`crate::run::Run`], as for a dry run.
pub async fn load_batch(
    conn: &mut PgConnection,
    settings: &Settings,
    lead_ids: &[i64],
    locking: Locking,
) -> sqlx::Result<Vec<Facts>> {
    let lock = locking.clause();
    // Candidates are looked up without row locks, then locked all at once
    // in one global order (contacts by id, then accounts by id) and read
    // again: two batches whose candidates overlap never wait on each other
    // in a cycle. The advisory locks keep every candidate of a lead's keys
    // from appearing or changing meanwhile through another conversion; a
    // candidate a CRM user changed or deleted in between makes the batch
    // look again (see `LookedUp`).
    let mut all: Vec<Facts> = lead_ids.iter().map(|&lead_id| Facts { lead_id, ..Facts::default() }).collect();
    // Locked in id order, whatever the batch's order: two batches that
    // share a lead (two jobs) never wait on each other in a cycle.
    let rows: Vec<IdLeadRow> = sqlx::query_as(&format!(
        "SELECT l.id, row_to_json(l), {LEAD_KEYS}, leadconv_norm(l.first_name), leadconv_norm(l.last_name)
             FROM leads l WHERE id = ANY($1) ORDER BY id{lock}"
    ))
    .bind(lead_ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut found: HashMap<i64, LeadRow> =
        rows.into_iter().map(|(id, lead, e, c, f, l)| (id, (lead, e, c, f, l))).collect();
    // The leads still to convert (converted or deleted ones need no more).
    let mut open: Vec<usize> = Vec::new();
    for (i, facts) in all.iter_mut().enumerate() {
        let Some((Json(lead), email, company, first_name, last_name)) = found.remove(&facts.lead_id) else { continue };
        facts.keys = LeadKeys { email, company, first_name, last_name };
        if record::is_empty(lead.get("converted_at")) {
            open.push(i);
        }
        facts.lead = Some(lead);
    }
    if open.is_empty() {
        return Ok(all);
    }
    if locking == Locking::ForUpdate {
        self::lock(conn, open.iter().filter_map(|&i| Some((all[i].lead.as_ref()?, &all[i].keys))), settings).await?;
    }

    let mut contact_keys: HashMap<i64, ContactKeys> = HashMap::new();
    let mut account_names: HashMap<i64, String> = HashMap::new();
    let mut round = 1;
    let accounts: HashMap<i64, Record> = loop {
        look_up(conn, settings, &mut all, &open, &mut contact_keys, &mut account_names).await?;
        if locking != Locking::ForUpdate {
            break read_accounts(conn, &all, &open, Locking::None, &mut account_names).await?;
        }
        let looked_up: Vec<LookedUp> = open.iter().map(|&i| LookedUp::of(&all[i])).collect();
        let accounts = lock_and_read_again(conn, &mut all, &open, &mut contact_keys, &mut account_names).await?;
        // The advisory locks keep other conversions from changing what
        // matched (they only fill empty fields), but a CRM user may have
        // edited or deleted a candidate before it was locked: then look
        // again, as a locking lookup would (Postgres checks its WHERE again
        // on the locked row).
        let holds = open
            .iter()
            .zip(&looked_up)
            .all(|(&i, before)| before.still_matches(&all[i], &contact_keys, &account_names));
        if holds {
            break accounts;
        }
        if round == LOOKUP_ROUNDS {
            return Err(sqlx::Error::Protocol(format!(
                "the candidates of leads {lead_ids:?} kept changing while they were locked ({round} rounds)"
            )));
        }
        tracing::debug!(round, "a candidate changed before it was locked; looking the candidates up again");
        round += 1;
    };
    for &i in &open {
        let facts = &mut all[i];
        let mut ids: Vec<i64> = facts.candidate_contacts().filter_map(|c| record::id(c, "account_id")).collect();
        ids.sort_unstable();
        ids.dedup();
        facts.contact_accounts = ids.iter().filter_map(|id| accounts.get(id).cloned()).collect();
    }

    // Won deals of every candidate, and the hierarchy above every user
    // concerned, once for the batch.
    let mut contact_ids: Vec<i64> = Vec::new();
    let mut account_ids: Vec<i64> = Vec::new();
    let mut users: Vec<i64> = vec![settings.acting_user];
    for &i in &open {
        let facts = &all[i];
        contact_ids.extend(facts.candidate_contacts().filter_map(|c| record::id(c, "id")));
        account_ids.extend(facts.candidate_accounts().filter_map(|a| record::id(a, "id")));
        users.extend(facts.lead.as_ref().and_then(|l| record::id(l, "owner_id")));
        users.extend(
            facts.candidate_contacts().chain(facts.candidate_accounts()).filter_map(|r| record::id(r, "owner_id")),
        );
    }
    let (mut won_contacts, mut won_accounts) = (Vec::new(), Vec::new());
    if !contact_ids.is_empty() || !account_ids.is_empty() {
        let won = sqlx::query!(
            "SELECT d.contact_id, d.account_id FROM deals d
             JOIN deal_stages s ON s.pipeline = d.pipeline AND s.stage = d.stage
             WHERE s.is_won AND (d.contact_id = ANY($1) OR d.account_id = ANY($2))",
            &contact_ids,
            &account_ids
        )
        .fetch_all(&mut *conn)
        .await?;
        won_contacts = won.iter().filter_map(|d| d.contact_id).collect();
        won_accounts = won.iter().filter_map(|d| d.account_id).collect();
    }
    users.sort_unstable();
    users.dedup();
    let managers = managers_above(conn, &users).await?;
    let acting_is_admin = sqlx::query_scalar!("SELECT is_admin FROM users WHERE id = $1", settings.acting_user)
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(false);
    for &i in &open {
        let facts = &mut all[i];
        let contacts: Vec<i64> = facts.candidate_contacts().filter_map(|c| record::id(c, "id")).collect();
        let accounts: Vec<i64> = facts.candidate_accounts().filter_map(|a| record::id(a, "id")).collect();
        facts.won_contacts = won_contacts.iter().copied().filter(|c| contacts.contains(c)).collect();
        facts.won_accounts = won_accounts.iter().copied().filter(|a| accounts.contains(a)).collect();
        facts.contact_keys = contacts.iter().filter_map(|id| contact_keys.get(id).map(|k| (*id, k.clone()))).collect();
        facts.account_names =
            accounts.iter().filter_map(|id| account_names.get(id).map(|n| (*id, n.clone()))).collect();
        facts.managers_above = managers.clone();
        facts.acting_is_admin = acting_is_admin;
    }
    Ok(all)
}

/// Rounds of looking candidates up and locking them before a batch gives
/// up (as a transient error, retried later): only a CRM user editing or
/// deleting a candidate between its lookup and its lock makes a second
/// round. A later round takes its locks after the first round's, out of
/// the global order: a deadlock with another batch is then possible,
/// detected by Postgres, and retried like any (40P01 is transient).
const LOOKUP_ROUNDS: u32 = 5;

/// Finds the candidates of the `open` leads of `all`, without locks:
/// contacts by e-mail and accounts by company (the oldest per key), by
/// unique field, and, for leads without e-mail, contacts by name within the
/// matched account. A few statements for the whole batch.
async fn look_up(
    conn: &mut PgConnection,
    settings: &Settings,
    all: &mut [Facts],
    open: &[usize],
    contact_keys: &mut HashMap<i64, ContactKeys>,
    account_names: &mut HashMap<i64, String>,
) -> sqlx::Result<()> {
    for &i in open {
        let facts = &mut all[i];
        facts.contact_by_unique = None;
        facts.contact_by_email = None;
        facts.contact_by_name = None;
        facts.account_by_unique = None;
        facts.account_by_company = None;
        facts.named_contact = None;
        facts.named_account = None;
        facts.contact_accounts.clear();
    }
    // The records a (one-lead) conversion names to convert into.
    if let Some(id) = settings.into_contact {
        let rows: Vec<ContactRow> = by_id(conn, "contacts c", CONTACT, vec![id], Locking::None).await?;
        let named = rows.into_iter().next().map(|row| note_contact(contact_keys, row));
        open.iter().for_each(|&i| all[i].named_contact.clone_from(&named));
    }
    if let Some(id) = settings.into_account {
        let rows: Vec<AccountRow> = by_id(conn, "accounts a", ACCOUNT, vec![id], Locking::None).await?;
        let named = rows.into_iter().next().map(|row| note_account(account_names, row));
        open.iter().for_each(|&i| all[i].named_account.clone_from(&named));
    }
    // The oldest contact of each e-mail and account of each company, one
    // index lookup per distinct key (LATERAL … LIMIT 1). Each statement
    // reads what the batch's keys reach whatever the planner's statistics
    // say: `id IN (SELECT DISTINCT ON …)` was planned, on a CRM of a few
    // thousand records, as a scan of the whole table normalising every
    // name (the normalisation's cost is invisible to the planner), each
    // batch again.
    let emails: Vec<&str> = open.iter().filter_map(|&i| all[i].keys.email.as_deref()).collect();
    let mut by_email: HashMap<String, Record> = HashMap::new();
    if !emails.is_empty() {
        let rows: Vec<ContactRow> = sqlx::query_as(&format!(
            "SELECT {CONTACT} FROM (SELECT DISTINCT unnest($1::text[]) AS key) k
             CROSS JOIN LATERAL (SELECT * FROM contacts WHERE leadconv_norm_email(email) = k.key
                                 ORDER BY created_at, id LIMIT 1) c
             ORDER BY c.id"
        ))
        .bind(&emails)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            let key = row.1.clone();
            let c = note_contact(contact_keys, row);
            by_email.extend(key.map(|k| (k, c)));
        }
    }
    let companies: Vec<&str> = open.iter().filter_map(|&i| all[i].keys.company.as_deref()).collect();
    let mut by_company: HashMap<String, Record> = HashMap::new();
    if !companies.is_empty() {
        let rows: Vec<AccountRow> = sqlx::query_as(&format!(
            "SELECT {ACCOUNT} FROM (SELECT DISTINCT unnest($1::text[]) AS key) k
             CROSS JOIN LATERAL (SELECT * FROM accounts WHERE leadconv_norm_company(account_name) = k.key
                                 ORDER BY created_at, id LIMIT 1) a
             ORDER BY a.id"
        ))
        .bind(&companies)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            let key = row.1.clone();
            let a = note_account(account_names, row);
            by_company.extend(key.map(|k| (k, a)));
        }
    }

    // Unique fields (configured per installation), then, for leads without
    // e-mail, the name within the matched account: a statement per unique
    // field and one for the names, for the whole batch.
    let customs: Vec<(usize, serde_json::Map<String, Value>)> =
        open.iter().map(|&i| (i, record::custom_fields(all[i].lead.as_ref().expect("open leads exist")))).collect();
    let contact_uniques = settings.fields.unique_keys(Module::Contact);
    let account_uniques = settings.fields.unique_keys(Module::Account);
    for (i, (f, row)) in by_unique::<ContactRow>(conn, "contacts c", CONTACT, &contact_uniques, &customs).await? {
        all[i].contact_by_unique = Some((f, note_contact(contact_keys, row)));
    }
    for (i, (f, row)) in by_unique::<AccountRow>(conn, "accounts a", ACCOUNT, &account_uniques, &customs).await? {
        all[i].account_by_unique = Some((f, note_account(account_names, row)));
    }
    // SPEC §3.4 (seed 000): a lead without e-mail whose account was matched
    // merges into the contact of that account with its first and last name.
    let mut by_name: Vec<(usize, i64, String, Option<String>)> = Vec::new();
    for &i in open {
        let facts = &mut all[i];
        facts.contact_by_email = facts.keys.email.as_ref().and_then(|e| by_email.get(e)).cloned();
        facts.account_by_company = facts.keys.company.as_ref().and_then(|c| by_company.get(c)).cloned();
        if facts.keys.email.is_none() && facts.contact_by_unique.is_none() {
            let account = facts.account_by_unique.as_ref().map(|(_, a)| a).or(facts.account_by_company.as_ref());
            if let (Some(account_id), Some(last)) = (account.and_then(|a| record::id(a, "id")), &facts.keys.last_name) {
                by_name.push((i, account_id, last.clone(), facts.keys.first_name.clone()));
            }
        }
    }
    if !by_name.is_empty() {
        let rows = sqlx::query(&format!(
            "SELECT DISTINCT ON (v.ord) {CONTACT}, v.ord AS batch_ord
             FROM unnest($1::bigint[], $2::text[], $3::text[]) WITH ORDINALITY AS v(account_id, last_name, first_name, ord)
             JOIN contacts c ON c.account_id = v.account_id AND leadconv_norm(c.last_name) = v.last_name
                            AND leadconv_norm(c.first_name) IS NOT DISTINCT FROM v.first_name
             ORDER BY v.ord, c.created_at, c.id"
        ))
        .bind(by_name.iter().map(|n| n.1).collect::<Vec<_>>())
        .bind(by_name.iter().map(|n| n.2.clone()).collect::<Vec<_>>())
        .bind(by_name.iter().map(|n| n.3.clone()).collect::<Vec<_>>())
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            let (i, contact) = in_batch::<ContactRow>(&row, &by_name.iter().map(|n| n.0).collect::<Vec<_>>())?;
            all[i].contact_by_name = Some(note_contact(contact_keys, contact));
        }
    }
    Ok(())
}

/// Locks the candidates of the `open` leads of `all` and reads them again,
/// as they are now: in one global order (contacts by id, then accounts by
/// id, with the accounts of the candidate contacts), so two batches whose
/// candidates overlap never wait on each other in a cycle.
async fn lock_and_read_again(
    conn: &mut PgConnection,
    all: &mut [Facts],
    open: &[usize],
    contact_keys: &mut HashMap<i64, ContactKeys>,
    account_names: &mut HashMap<i64, String>,
) -> sqlx::Result<HashMap<i64, Record>> {
    let ids: Vec<i64> =
        open.iter().flat_map(|&i| all[i].candidate_contacts().filter_map(|c| record::id(c, "id"))).collect();
    let rows: Vec<ContactRow> = by_id(conn, "contacts c", CONTACT, ids, Locking::ForUpdate).await?;
    let fresh: HashMap<i64, Record> = rows
        .into_iter()
        .map(|row| note_contact(contact_keys, row))
        .filter_map(|c| Some((record::id(&c, "id")?, c)))
        .collect();
    for &i in open {
        let facts = &mut all[i];
        facts.contact_by_unique = facts.contact_by_unique.take().and_then(|(f, c)| Some((f, now(&fresh, &c)?)));
        facts.contact_by_email = facts.contact_by_email.take().and_then(|c| now(&fresh, &c));
        facts.contact_by_name = facts.contact_by_name.take().and_then(|c| now(&fresh, &c));
        facts.named_contact = facts.named_contact.take().and_then(|c| now(&fresh, &c));
    }
    let accounts = read_accounts(conn, all, open, Locking::ForUpdate, account_names).await?;
    for &i in open {
        let facts = &mut all[i];
        facts.account_by_unique = facts.account_by_unique.take().and_then(|(f, a)| Some((f, now(&accounts, &a)?)));
        facts.account_by_company = facts.account_by_company.take().and_then(|a| now(&accounts, &a));
        facts.named_account = facts.named_account.take().and_then(|a| now(&accounts, &a));
    }
    Ok(accounts)
}

/// The candidate accounts of the `open` leads of `all` and the accounts of
/// their candidate contacts, by id, in one statement (locked in id order
/// with [`Locking::ForUpdate`]).
async fn read_accounts(
    conn: &mut PgConnection,
    all: &[Facts],
    open: &[usize],
    locking: Locking,
    account_names: &mut HashMap<i64, String>,
) -> sqlx::Result<HashMap<i64, Record>> {
    let ids: Vec<i64> = open
        .iter()
        .flat_map(|&i| {
            let facts = &all[i];
            let candidates = facts.candidate_accounts().filter_map(|a| record::id(a, "id"));
            candidates.chain(facts.candidate_contacts().filter_map(|c| record::id(c, "account_id")))
        })
        .collect();
    let rows: Vec<AccountRow> = by_id(conn, "accounts a", ACCOUNT, ids, locking).await?;
    Ok(rows
        .into_iter()
        .map(|row| note_account(account_names, row))
        .filter_map(|a| Some((record::id(&a, "id")?, a)))
        .collect())
}

/// The records of `table` (with its alias) whose id is one of `ids`, as
/// `columns`, in id order: locked in that order with
/// [`Locking::ForUpdate`], the one global order every batch locks in.
async fn by_id<R>(
    conn: &mut PgConnection,
    table: &'static str,
    columns: &'static str,
    mut ids: Vec<i64>,
    locking: Locking,
) -> sqlx::Result<Vec<R>>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let lock = locking.clause();
    sqlx::query_as(&format!("SELECT {columns} FROM {table} WHERE id = ANY($1) ORDER BY id{lock}"))
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await
}

/// A lead's candidates as looked up (unlocked): their ids, and for unique
/// fields the value that matched.
struct LookedUp {
    contact_by_unique: Option<(i64, Option<Value>)>,
    contact_by_email: Option<i64>,
    contact_by_name: Option<i64>,
    account_by_unique: Option<(i64, Option<Value>)>,
    account_by_company: Option<i64>,
}

impl LookedUp {
    fn of(facts: &Facts) -> LookedUp {
        LookedUp {
            contact_by_unique: facts.contact_by_unique.as_ref().map(unique_ground),
            contact_by_email: facts.contact_by_email.as_ref().map(id_of),
            contact_by_name: facts.contact_by_name.as_ref().map(id_of),
            account_by_unique: facts.account_by_unique.as_ref().map(unique_ground),
            account_by_company: facts.account_by_company.as_ref().map(id_of),
        }
    }

    /// Whether every candidate, as locked and read again (`facts` and the
    /// keys read with it), is still there and still matches the lead as the
    /// lookup found it: the same unique value, the lead's e-mail key, its
    /// names within the account it matched, its company key.
    fn still_matches(
        &self,
        facts: &Facts,
        contact_keys: &HashMap<i64, ContactKeys>,
        account_names: &HashMap<i64, String>,
    ) -> bool {
        let keys = &facts.keys;
        let contact_keys_of = |c: &Record| contact_keys.get(&id_of(c));
        let name_account = facts.account_by_unique.as_ref().map(|(_, a)| a).or(facts.account_by_company.as_ref());
        facts.contact_by_unique.as_ref().map(unique_ground) == self.contact_by_unique
            && facts.account_by_unique.as_ref().map(unique_ground) == self.account_by_unique
            && facts.contact_by_email.as_ref().map(id_of) == self.contact_by_email
            && facts
                .contact_by_email
                .as_ref()
                .is_none_or(|c| contact_keys_of(c).is_some_and(|k| k.email.is_some() && k.email == keys.email))
            && facts.account_by_company.as_ref().map(id_of) == self.account_by_company
            && facts
                .account_by_company
                .as_ref()
                .is_none_or(|a| keys.company.is_some() && account_names.get(&id_of(a)) == keys.company.as_ref())
            && facts.contact_by_name.as_ref().map(id_of) == self.contact_by_name
            && facts.contact_by_name.as_ref().is_none_or(|c| {
                record::id(c, "account_id") == name_account.and_then(|a| record::id(a, "id"))
                    && contact_keys_of(c).is_some_and(|k| {
                        k.last_name.is_some() && k.last_name == keys.last_name && k.first_name == keys.first_name
                    })
            })
    }
}

fn id_of(r: &Record) -> i64 {
    record::id(r, "id").unwrap_or(0)
}

fn unique_ground((field, r): &(String, Record)) -> (i64, Option<Value>) {
    (id_of(r), record::custom_fields(r).get(field).cloned())
}

/// `r` as read again (`None`: deleted meanwhile).
fn now(fresh: &HashMap<i64, Record>, r: &Record) -> Option<Record> {
    record::id(r, "id").and_then(|id| fresh.get(&id)).cloned()
}

/// Keeps a contact's keys and returns the contact.
fn note_contact(keys: &mut HashMap<i64, ContactKeys>, (Json(c), email, first_name, last_name): ContactRow) -> Record {
    if let Some(id) = record::id(&c, "id") {
        keys.insert(id, ContactKeys { email, first_name, last_name });
    }
    c
}

/// Keeps an account's normalised name (forgets it when the name is blank
/// now) and returns the account.
fn note_account(names: &mut HashMap<i64, String>, (Json(a), name): AccountRow) -> Record {
    if let Some(id) = record::id(&a, "id") {
        match name {
            Some(name) => names.insert(id, name),
            None => names.remove(&id),
        };
    }
    a
}

/// For each lead of `leads` (its index in the batch and its custom
/// fields), the oldest record whose unique custom field holds the lead's
/// mapped value, trying the unique fields in their stable order: one
/// statement per field, for the leads no earlier field matched.
async fn by_unique<R>(
    conn: &mut PgConnection,
    table: &'static str,
    columns: &'static str,
    keys: &[UniqueKey],
    leads: &[(usize, serde_json::Map<String, Value>)],
) -> sqlx::Result<HashMap<usize, (String, R)>>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let alias = table.rsplit(' ').next().unwrap_or(table);
    let mut found: HashMap<usize, (String, R)> = HashMap::new();
    for k in keys {
        let (mut who, mut values) = (Vec::new(), Vec::new());
        for (i, custom) in leads {
            if found.contains_key(i) {
                continue;
            }
            if let Some(v) = custom.get(&k.lead_field).filter(|v| !record::is_empty(Some(v))) {
                who.push(*i);
                values.push(Json(v.clone()));
            }
        }
        if who.is_empty() {
            continue;
        }
        // `@>` with a one-key object uses the jsonb_path_ops GIN index for
        // whichever field is unique, without an index per field.
        let rows = sqlx::query(&format!(
            "SELECT DISTINCT ON (v.ord) {columns}, v.ord AS batch_ord
             FROM unnest($2::jsonb[]) WITH ORDINALITY AS v(value, ord)
             JOIN {table} ON {alias}.custom_fields @> jsonb_build_object($1::text, v.value)
             ORDER BY v.ord, {alias}.created_at, {alias}.id"
        ))
        .bind(&k.target_field)
        .bind(&values)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            let (i, r) = in_batch::<R>(&row, &who)?;
            found.insert(i, (k.target_field.clone(), r));
        }
    }
    Ok(found)
}

/// A row of a statement over `unnest(...) WITH ORDINALITY`: the record, and
/// the batch index of the lead it was found for (`batch_ord` counts from 1
/// over `who`).
fn in_batch<R>(row: &sqlx::postgres::PgRow, who: &[usize]) -> sqlx::Result<(usize, R)>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    use sqlx::Row;
    let ord: i64 = row.try_get("batch_ord")?;
    let i = usize::try_from(ord - 1).ok().and_then(|o| who.get(o)).copied();
    let i = i.ok_or_else(|| sqlx::Error::Protocol(format!("batch_ord {ord} out of range")))?;
    Ok((i, R::from_row(row)?))
}

/// For each user, the chain of managers above them, nearest first. The depth
/// bound keeps a cycle in `manager_id` (bad data) from looping forever.
pub async fn managers_above(conn: &mut PgConnection, users: &[i64]) -> sqlx::Result<HashMap<i64, Vec<i64>>> {
    let rows = sqlx::query!(
        r#"WITH RECURSIVE up(user_id, manager_id, depth) AS (
             SELECT id, manager_id, 1 FROM users WHERE id = ANY($1) AND manager_id IS NOT NULL
             UNION ALL
             SELECT up.user_id, u.manager_id, up.depth + 1
             FROM up JOIN users u ON u.id = up.manager_id
             WHERE u.manager_id IS NOT NULL AND up.depth < 64
         )
         SELECT user_id AS "user_id!", manager_id AS "manager_id!" FROM up ORDER BY user_id, depth"#,
        users
    )
    .fetch_all(conn)
    .await?;
    let mut out: HashMap<i64, Vec<i64>> = HashMap::new();
    for (user, manager) in rows.into_iter().map(|r| (r.user_id, r.manager_id)) {
        out.entry(user).or_default().push(manager);
    }
    Ok(out)
}
