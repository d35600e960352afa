//! Gathering the [`Facts`] about one lead from Postgres.
//!
//! In a conversion the facts are read under locks that make them stay true
//! until commit: the lead row (so a lead is converted once), advisory locks
//! on its normalised e-mail, company and unique values (so two concurrent
//! conversions never both decide to create the same contact or account),
//! then the candidate records themselves. A dry run reads without locks.

use std::collections::HashMap;

use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgConnection;

use crate::mapping::UniqueKey;
use crate::options::Settings;
use crate::plan::Facts;
use crate::record::{self, Module, Record};

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

/// The keys serialising conversions that could create the same record.
/// Sorted, so that every transaction takes them in one global order and two
/// conversions cannot deadlock on them.
pub fn lock_keys(lead: &Record, settings: &Settings) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(email) = record::text(lead, "email") {
        keys.push(format!("email:{}", normalize_email(email)));
    }
    if let Some(company) = record::text(lead, "company") {
        keys.push(format!("company:{}", normalize_company(company)));
    }
    let custom = record::custom_fields(lead);
    for module in [Module::Contact, Module::Account] {
        for k in settings.fields.unique_keys(module) {
            if let Some(v) = custom.get(&k.lead_field).filter(|v| !record::is_empty(Some(v))) {
                keys.push(format!("unique:{}:{}:{}", module.as_str(), k.target_field, v));
            }
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Mirrors SQL `leadconv_norm_email`: trimmed, lower-case.
pub fn normalize_email(s: &str) -> String {
    s.trim().to_lowercase()
}

/// Mirrors SQL `leadconv_norm_company`: trimmed, lower-case, inner white
/// space collapsed to one space.
pub fn normalize_company(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

pub async fn load(conn: &mut PgConnection, settings: &Settings, lead_id: i64, locking: Locking) -> sqlx::Result<Facts> {
    let lock = locking.clause();
    let mut facts = Facts { lead_id, ..Facts::default() };
    let lead: Option<Json<Record>> =
        sqlx::query_scalar(&format!("SELECT to_jsonb(l) FROM leads l WHERE id = $1{lock}"))
            .bind(lead_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(Json(lead)) = lead else { return Ok(facts) };
    if !record::is_empty(lead.get("converted_at")) {
        facts.lead = Some(lead);
        return Ok(facts);
    }

    if locking == Locking::ForUpdate {
        let keys = lock_keys(&lead, settings);
        if !keys.is_empty() {
            // unnest yields the keys in array order, so locks are taken in
            // the sorted order of `keys`.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM unnest($1::text[]) AS k")
                .bind(&keys)
                .execute(&mut *conn)
                .await?;
        }
    }

    let custom = record::custom_fields(&lead);
    facts.contact_by_unique =
        by_unique(conn, "contacts", &settings.fields.unique_keys(Module::Contact), &custom, lock).await?;
    if let Some(email) = record::text(&lead, "email") {
        facts.contact_by_email = one(
            conn,
            &format!(
                "SELECT to_jsonb(c) FROM contacts c WHERE leadconv_norm_email(email) = leadconv_norm_email($1)
                 ORDER BY created_at, id LIMIT 1{lock}"
            ),
            email,
        )
        .await?;
    }
    facts.account_by_unique =
        by_unique(conn, "accounts", &settings.fields.unique_keys(Module::Account), &custom, lock).await?;
    if let Some(company) = record::text(&lead, "company") {
        facts.account_by_company = one(
            conn,
            &format!(
                "SELECT to_jsonb(a) FROM accounts a WHERE leadconv_norm_company(account_name) = leadconv_norm_company($1)
                 ORDER BY created_at, id LIMIT 1{lock}"
            ),
            company,
        )
        .await?;
    }

    let contacts: Vec<&Record> =
        facts.contact_by_unique.iter().map(|(_, c)| c).chain(facts.contact_by_email.iter()).collect();
    let contact_ids: Vec<i64> = contacts.iter().filter_map(|c| record::id(c, "id")).collect();
    let account_ids_of_contacts: Vec<i64> = contacts.iter().filter_map(|c| record::id(c, "account_id")).collect();
    if !account_ids_of_contacts.is_empty() {
        facts.contact_accounts = sqlx::query_scalar::<_, Json<Record>>(&format!(
            "SELECT to_jsonb(a) FROM accounts a WHERE id = ANY($1) ORDER BY id{lock}"
        ))
        .bind(&account_ids_of_contacts)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|j| j.0)
        .collect();
    }
    let account_ids: Vec<i64> = facts
        .account_by_unique
        .iter()
        .map(|(_, a)| a)
        .chain(facts.account_by_company.iter())
        .chain(facts.contact_accounts.iter())
        .filter_map(|a| record::id(a, "id"))
        .collect();

    if !contact_ids.is_empty() || !account_ids.is_empty() {
        let won: Vec<(Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT d.contact_id, d.account_id FROM deals d
             JOIN deal_stages s ON s.pipeline = d.pipeline AND s.stage = d.stage
             WHERE s.is_won AND (d.contact_id = ANY($1) OR d.account_id = ANY($2))",
        )
        .bind(&contact_ids)
        .bind(&account_ids)
        .fetch_all(&mut *conn)
        .await?;
        facts.won_contacts = won.iter().filter_map(|(c, _)| *c).filter(|c| contact_ids.contains(c)).collect();
        facts.won_accounts = won.iter().filter_map(|(_, a)| *a).filter(|a| account_ids.contains(a)).collect();
    }

    let mut users: Vec<i64> = vec![settings.acting_user];
    users.extend(record::id(&lead, "owner_id"));
    for r in contacts
        .iter()
        .copied()
        .chain(facts.account_by_unique.iter().map(|(_, a)| a))
        .chain(facts.account_by_company.iter())
        .chain(facts.contact_accounts.iter())
    {
        users.extend(record::id(r, "owner_id"));
    }
    users.sort_unstable();
    users.dedup();
    facts.managers_above = managers_above(conn, &users).await?;
    facts.acting_is_admin = sqlx::query_scalar("SELECT is_admin FROM users WHERE id = $1")
        .bind(settings.acting_user)
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(false);
    facts.lead = Some(lead);
    Ok(facts)
}

async fn one(conn: &mut PgConnection, sql: &str, arg: &str) -> sqlx::Result<Option<Record>> {
    let r: Option<Json<Record>> = sqlx::query_scalar(sql).bind(arg).fetch_optional(conn).await?;
    Ok(r.map(|j| j.0))
}

/// The oldest record whose unique custom field holds the lead's mapped
/// value, trying the unique fields in their stable order.
async fn by_unique(
    conn: &mut PgConnection,
    table: &'static str,
    keys: &[UniqueKey],
    lead_custom: &serde_json::Map<String, Value>,
    lock: &str,
) -> sqlx::Result<Option<(String, Record)>> {
    for k in keys {
        let Some(v) = lead_custom.get(&k.lead_field).filter(|v| !record::is_empty(Some(v))) else { continue };
        // `@>` with a one-key object uses the jsonb_path_ops GIN index for
        // whichever field is unique, without an index per field.
        let found: Option<Json<Record>> = sqlx::query_scalar(&format!(
            "SELECT to_jsonb(t) FROM {table} t WHERE custom_fields @> jsonb_build_object($1::text, $2::jsonb)
             ORDER BY created_at, id LIMIT 1{lock}"
        ))
        .bind(&k.target_field)
        .bind(Json(v))
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(Json(r)) = found {
            return Ok(Some((k.target_field.clone(), r)));
        }
    }
    Ok(None)
}

/// For each user, the chain of managers above them, nearest first. The depth
/// bound keeps a cycle in `manager_id` (bad data) from looping forever.
async fn managers_above(conn: &mut PgConnection, users: &[i64]) -> sqlx::Result<HashMap<i64, Vec<i64>>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "WITH RECURSIVE up(user_id, manager_id, depth) AS (
             SELECT id, manager_id, 1 FROM users WHERE id = ANY($1) AND manager_id IS NOT NULL
             UNION ALL
             SELECT up.user_id, u.manager_id, up.depth + 1
             FROM up JOIN users u ON u.id = up.manager_id
             WHERE u.manager_id IS NOT NULL AND up.depth < 64
         )
         SELECT user_id, manager_id FROM up ORDER BY user_id, depth",
    )
    .bind(users)
    .fetch_all(conn)
    .await?;
    let mut out: HashMap<i64, Vec<i64>> = HashMap::new();
    for (user, manager) in rows {
        out.entry(user).or_default().push(manager);
    }
    Ok(out)
}
