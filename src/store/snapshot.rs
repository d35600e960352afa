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
    "to_jsonb(c), leadconv_norm_email(c.email), leadconv_norm(c.first_name), leadconv_norm(c.last_name)";
/// An account as read: the row and its normalised name.
const ACCOUNT: &str = "to_jsonb(a), leadconv_norm_company(a.account_name)";

type ContactRow = (Json<Record>, Option<String>, Option<String>, Option<String>);
type AccountRow = (Json<Record>, Option<String>);
/// The lead and its keys: e-mail, company, first and last name.
type LeadRow = (Json<Record>, Option<String>, Option<String>, Option<String>, Option<String>);

/// The advisory locks of a lead, taken in one statement in the order of
/// their 64-bit keys, so every transaction takes them in one global order
/// and two conversions cannot deadlock on them. The keys come from the same
/// SQL functions as the lookups (`leadconv_lock_key` over `leadconv_norm*`).
/// Unique values are compared as jsonb (numbers by value), as `@>` does.
const LOCK_KEYS: &str = "
    SELECT pg_advisory_xact_lock(k) FROM (
        SELECT DISTINCT k FROM unnest(
            ARRAY[leadconv_lock_key('email', leadconv_norm_email($1)),
                  leadconv_lock_key('company', leadconv_norm_company($2))]
            || ARRAY(SELECT leadconv_lock_key('unique:' || f,
                                              CASE jsonb_typeof(v) WHEN 'number' THEN trim_scale(v::numeric)::text
                                                                   ELSE v::text END)
                     FROM unnest($3::text[], $4::jsonb[]) AS u(f, v))
        ) AS k WHERE k IS NOT NULL ORDER BY k
    ) AS sorted";

/// The unique values of a lead: `module.field` and the lead's value, for
/// the unique custom fields some lead field maps into.
fn unique_values(lead: &Record, settings: &Settings) -> (Vec<String>, Vec<Json<Value>>) {
    let custom = record::custom_fields(lead);
    let mut fields = Vec::new();
    let mut values = Vec::new();
    for module in [Module::Contact, Module::Account] {
        for k in settings.fields.unique_keys(module) {
            if let Some(v) = custom.get(&k.lead_field).filter(|v| !record::is_empty(Some(v))) {
                fields.push(format!("{}.{}", module.as_str(), k.target_field));
                values.push(Json(v.clone()));
            }
        }
    }
    (fields, values)
}

/// Takes the advisory locks of `lead` (see [`LOCK_KEYS`]).
pub async fn lock(conn: &mut PgConnection, lead: &Record, settings: &Settings) -> sqlx::Result<()> {
    let (fields, values) = unique_values(lead, settings);
    sqlx::query(LOCK_KEYS)
        .bind(lead.get("email").and_then(Value::as_str))
        .bind(lead.get("company").and_then(Value::as_str))
        .bind(&fields)
        .bind(&values)
        .execute(conn)
        .await?;
    Ok(())
}

/// The lock keys [`lock`] takes for `lead`, sorted: for tests that check
/// that the locks and the matching agree on what is "the same".
pub async fn lock_keys(conn: &mut PgConnection, lead: &Record, settings: &Settings) -> sqlx::Result<Vec<i64>> {
    let (fields, values) = unique_values(lead, settings);
    let sql = LOCK_KEYS.replacen("SELECT pg_advisory_xact_lock(k) FROM", "SELECT k FROM", 1);
    sqlx::query_scalar(&sql)
        .bind(lead.get("email").and_then(Value::as_str))
        .bind(lead.get("company").and_then(Value::as_str))
        .bind(&fields)
        .bind(&values)
        .fetch_all(conn)
        .await
}

pub async fn load(conn: &mut PgConnection, settings: &Settings, lead_id: i64, locking: Locking) -> sqlx::Result<Facts> {
    let lock = locking.clause();
    let mut facts = Facts { lead_id, ..Facts::default() };
    let lead: Option<LeadRow> = sqlx::query_as(&format!(
        "SELECT to_jsonb(l), leadconv_norm_email(l.email), leadconv_norm_company(l.company),
                    leadconv_norm(l.first_name), leadconv_norm(l.last_name)
             FROM leads l WHERE id = $1{lock}"
    ))
    .bind(lead_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((Json(lead), email, company, first_name, last_name)) = lead else { return Ok(facts) };
    facts.keys = LeadKeys { email, company, first_name, last_name };
    if !record::is_empty(lead.get("converted_at")) {
        facts.lead = Some(lead);
        return Ok(facts);
    }

    if locking == Locking::ForUpdate {
        self::lock(conn, &lead, settings).await?;
    }

    let custom = record::custom_fields(&lead);
    let contact_by_unique = by_unique::<ContactRow>(
        conn,
        "contacts c",
        CONTACT,
        &settings.fields.unique_keys(Module::Contact),
        &custom,
        lock,
    )
    .await?;
    facts.contact_by_unique = contact_by_unique.map(|(f, row)| (f, note_contact(&mut facts, row)));
    if let Some(email) = &facts.keys.email {
        let row: Option<ContactRow> = sqlx::query_as(&format!(
            "SELECT {CONTACT} FROM contacts c WHERE leadconv_norm_email(email) = $1 ORDER BY created_at, id LIMIT 1{lock}"
        ))
        .bind(email)
        .fetch_optional(&mut *conn)
        .await?;
        facts.contact_by_email = row.map(|r| note_contact(&mut facts, r));
    }
    let account_by_unique = by_unique::<AccountRow>(
        conn,
        "accounts a",
        ACCOUNT,
        &settings.fields.unique_keys(Module::Account),
        &custom,
        lock,
    )
    .await?;
    facts.account_by_unique = account_by_unique.map(|(f, row)| (f, note_account(&mut facts, row)));
    if let Some(company) = &facts.keys.company {
        let row: Option<AccountRow> = sqlx::query_as(&format!(
            "SELECT {ACCOUNT} FROM accounts a WHERE leadconv_norm_company(account_name) = $1
             ORDER BY created_at, id LIMIT 1{lock}"
        ))
        .bind(company)
        .fetch_optional(&mut *conn)
        .await?;
        facts.account_by_company = row.map(|r| note_account(&mut facts, r));
    }
    // SPEC §3.4 (seed 000): a lead without e-mail whose account was matched
    // merges into the contact of that account with its first and last name.
    if facts.keys.email.is_none() && facts.contact_by_unique.is_none() {
        let account = facts.account_by_unique.as_ref().map(|(_, a)| a).or(facts.account_by_company.as_ref());
        if let (Some(account_id), Some(last)) = (account.and_then(|a| record::id(a, "id")), &facts.keys.last_name) {
            let row: Option<ContactRow> = sqlx::query_as(&format!(
                "SELECT {CONTACT} FROM contacts c
                 WHERE account_id = $1 AND leadconv_norm(last_name) = $2
                   AND leadconv_norm(first_name) IS NOT DISTINCT FROM $3
                 ORDER BY created_at, id LIMIT 1{lock}"
            ))
            .bind(account_id)
            .bind(last)
            .bind(&facts.keys.first_name)
            .fetch_optional(&mut *conn)
            .await?;
            facts.contact_by_name = row.map(|r| note_contact(&mut facts, r));
        }
    }

    let contacts: Vec<&Record> = facts.candidate_contacts().collect();
    let contact_ids: Vec<i64> = contacts.iter().filter_map(|c| record::id(c, "id")).collect();
    let account_ids_of_contacts: Vec<i64> = contacts.iter().filter_map(|c| record::id(c, "account_id")).collect();
    if !account_ids_of_contacts.is_empty() {
        let rows: Vec<AccountRow> =
            sqlx::query_as(&format!("SELECT {ACCOUNT} FROM accounts a WHERE id = ANY($1) ORDER BY id{lock}"))
                .bind(&account_ids_of_contacts)
                .fetch_all(&mut *conn)
                .await?;
        facts.contact_accounts = rows.into_iter().map(|r| note_account(&mut facts, r)).collect();
    }
    let account_ids: Vec<i64> = facts.candidate_accounts().filter_map(|a| record::id(a, "id")).collect();

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
        facts.won_contacts = won.iter().filter_map(|d| d.contact_id).filter(|c| contact_ids.contains(c)).collect();
        facts.won_accounts = won.iter().filter_map(|d| d.account_id).filter(|a| account_ids.contains(a)).collect();
    }

    let mut users: Vec<i64> = vec![settings.acting_user];
    users.extend(record::id(&lead, "owner_id"));
    users
        .extend(facts.candidate_contacts().chain(facts.candidate_accounts()).filter_map(|r| record::id(r, "owner_id")));
    users.sort_unstable();
    users.dedup();
    facts.managers_above = managers_above(conn, &users).await?;
    facts.acting_is_admin = sqlx::query_scalar!("SELECT is_admin FROM users WHERE id = $1", settings.acting_user)
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(false);
    facts.lead = Some(lead);
    Ok(facts)
}

/// Keeps a contact's keys in `facts` and returns the contact.
fn note_contact(facts: &mut Facts, (Json(c), email, first_name, last_name): ContactRow) -> Record {
    if let Some(id) = record::id(&c, "id") {
        facts.contact_keys.insert(id, ContactKeys { email, first_name, last_name });
    }
    c
}

/// Keeps an account's normalised name in `facts` and returns the account.
fn note_account(facts: &mut Facts, (Json(a), name): AccountRow) -> Record {
    if let (Some(id), Some(name)) = (record::id(&a, "id"), name) {
        facts.account_names.insert(id, name);
    }
    a
}

/// The oldest record whose unique custom field holds the lead's mapped
/// value, trying the unique fields in their stable order.
async fn by_unique<R>(
    conn: &mut PgConnection,
    table: &'static str,
    columns: &'static str,
    keys: &[UniqueKey],
    lead_custom: &serde_json::Map<String, Value>,
    lock: &str,
) -> sqlx::Result<Option<(String, R)>>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    let alias = table.rsplit(' ').next().unwrap_or(table);
    for k in keys {
        let Some(v) = lead_custom.get(&k.lead_field).filter(|v| !record::is_empty(Some(v))) else { continue };
        // `@>` with a one-key object uses the jsonb_path_ops GIN index for
        // whichever field is unique, without an index per field.
        let found: Option<R> = sqlx::query_as(&format!(
            "SELECT {columns} FROM {table} WHERE {alias}.custom_fields @> jsonb_build_object($1::text, $2::jsonb)
             ORDER BY {alias}.created_at, {alias}.id LIMIT 1{lock}"
        ))
        .bind(&k.target_field)
        .bind(Json(v))
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(r) = found {
            return Ok(Some((k.target_field.clone(), r)));
        }
    }
    Ok(None)
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
