//! Carrying out a [`Conversion`] inside the conversion's transaction.
//!
//! Records are written from their JSON values with `jsonb_populate_record`,
//! so one insert and one update serve every module. Column names come only
//! from the whitelists below, never from input.

use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgConnection;

use crate::plan::{Action, Conversion, Target};
use crate::record::{Module, Record};

/// The ids a conversion ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Converted {
    pub contact_id: i64,
    pub account_id: Option<i64>,
    pub deal_id: Option<i64>,
}

const ACCOUNT_COLUMNS: &[&str] = &[
    "owner_id",
    "account_name",
    "phone",
    "fax",
    "website",
    "industry",
    "annual_revenue",
    "no_of_employees",
    "street",
    "city",
    "state",
    "zip_code",
    "country",
    "custom_fields",
    "tags",
];
const CONTACT_COLUMNS: &[&str] = &[
    "owner_id",
    "account_id",
    "salutation",
    "first_name",
    "last_name",
    "title",
    "email",
    "phone",
    "mobile",
    "fax",
    "skype_id",
    "lead_source",
    "email_opt_out",
    "street",
    "city",
    "state",
    "zip_code",
    "country",
    "custom_fields",
    "tags",
];
const DEAL_COLUMNS: &[&str] = &[
    "owner_id",
    "account_id",
    "contact_id",
    "deal_name",
    "closing_date",
    "stage",
    "pipeline",
    "amount",
    "lead_source",
    "contact_role",
    "campaign_source",
    "rating",
    "is_repeat",
    "is_repeat_inquiry",
    "custom_fields",
    "tags",
];

fn table(module: Module) -> (&'static str, &'static [&'static str]) {
    match module {
        Module::Account => ("accounts", ACCOUNT_COLUMNS),
        Module::Contact => ("contacts", CONTACT_COLUMNS),
        Module::Deal => ("deals", DEAL_COLUMNS),
        Module::Lead => unreachable!("leads are marked, never written as records"),
    }
}

fn columns(module: Module, values: &Record) -> (&'static str, Vec<&str>) {
    let (name, allowed) = table(module);
    let cols: Vec<&str> = values.keys().map(String::as_str).collect();
    for c in &cols {
        // A column outside the whitelist is a bug in the mapping tables, not
        // bad input: the mapping only ever produces these names.
        assert!(allowed.contains(c), "column {c} is not writable on {name}");
    }
    (name, cols)
}

async fn insert(conn: &mut PgConnection, module: Module, values: &Record) -> sqlx::Result<i64> {
    let (table, cols) = columns(module, values);
    let list = cols.join(", ");
    sqlx::query_scalar(&format!(
        "INSERT INTO {table} ({list}) SELECT {list} FROM jsonb_populate_record(NULL::{table}, $1) RETURNING id"
    ))
    .bind(Json(values))
    .fetch_one(conn)
    .await
}

async fn update(conn: &mut PgConnection, module: Module, id: i64, values: &Record) -> sqlx::Result<()> {
    if values.is_empty() {
        return Ok(());
    }
    let (table, cols) = columns(module, values);
    let list = cols.join(", ");
    sqlx::query(&format!(
        "UPDATE {table} SET ({list}) = (SELECT {list} FROM jsonb_populate_record(NULL::{table}, $1)) WHERE id = $2"
    ))
    .bind(Json(values))
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Inserts a new record or fills the matched one; returns its id.
async fn write_target(
    conn: &mut PgConnection,
    module: Module,
    target: &Target,
    extra: &[(&str, Value)],
) -> sqlx::Result<i64> {
    let mut values = target.values.clone();
    for (k, v) in extra {
        values.insert((*k).to_owned(), v.clone());
    }
    match (target.action, target.id) {
        (Action::Created, _) => insert(conn, module, &values).await,
        (_, Some(id)) => {
            update(conn, module, id, &values).await?;
            Ok(id)
        }
        (_, None) => unreachable!("a matched record always has an id"),
    }
}

/// Writes `conversion` for `lead_id`. Runs inside the caller's transaction:
/// if any statement fails, nothing of it stays.
pub async fn apply(conn: &mut PgConnection, lead_id: i64, conversion: &Conversion) -> sqlx::Result<Converted> {
    let account_id = match &conversion.account {
        Some(a) => Some(write_target(conn, Module::Account, a, &[]).await?),
        None => None,
    };
    let link: Vec<(&str, Value)> = match account_id {
        Some(aid) if conversion.link_contact_to_account => vec![("account_id", aid.into())],
        _ => vec![],
    };
    let contact_id = write_target(conn, Module::Contact, &conversion.contact, &link).await?;
    let deal_id = match &conversion.deal {
        Some(d) => {
            let mut values = d.values.clone();
            values.insert("contact_id".into(), contact_id.into());
            if let Some(aid) = account_id {
                values.insert("account_id".into(), aid.into());
            }
            Some(insert(conn, Module::Deal, &values).await?)
        }
        None => None,
    };
    let ids = Converted { contact_id, account_id, deal_id };
    let parent = |m: Module| match m {
        Module::Deal => deal_id,
        Module::Account => account_id,
        Module::Contact => Some(contact_id),
        Module::Lead => Some(lead_id),
    };

    // Copies first, then the move: the copies are made from the lead's notes.
    for &m in &conversion.note_copies_to {
        if let Some(pid) = parent(m) {
            sqlx::query!(
                "INSERT INTO notes (parent_module, parent_id, title, body, created_at)
                 SELECT $2, $3, title, body, created_at FROM notes
                 WHERE parent_module = 'lead' AND parent_id = $1 ORDER BY id",
                lead_id,
                m.as_str(),
                pid
            )
            .execute(&mut *conn)
            .await?;
        }
    }
    for (table, to) in [
        ("notes", conversion.notes_to),
        ("attachments", conversion.attachments_to),
        ("activities", conversion.activities_to),
    ] {
        let pid = parent(to).unwrap_or(contact_id);
        let module = if parent(to).is_some() { to } else { Module::Contact };
        sqlx::query(&format!(
            "UPDATE {table} SET parent_module = $2, parent_id = $3 WHERE parent_module = 'lead' AND parent_id = $1"
        ))
        .bind(lead_id)
        .bind(module.as_str())
        .bind(pid)
        .execute(&mut *conn)
        .await?;
    }

    let marked = sqlx::query!(
        "UPDATE leads SET converted_at = now(), converted_account_id = $2, converted_contact_id = $3,
                converted_deal_id = $4, lead_status = 'Converted', is_repeat = $5
         WHERE id = $1 AND converted_at IS NULL",
        lead_id,
        account_id,
        contact_id,
        deal_id,
        conversion.lead_is_repeat
    )
    .execute(&mut *conn)
    .await?;
    // The lead row is locked since the snapshot and was unconverted then.
    debug_assert_eq!(marked.rows_affected(), 1);
    Ok(ids)
}
