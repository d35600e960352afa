//! Carrying out a [`Conversion`] inside the conversion's transaction.
//!
//! Records are written from their JSON values with `jsonb_populate_record`,
//! so one insert and one update serve every module. Column names come only
//! from the whitelists below, never from input.

use std::collections::HashMap;

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

/// A column's default: table, column, value.
pub type Default = (&'static str, &'static str, fn() -> Value);

/// The schema's defaults of the writable columns that have one (migration
/// 0001). A batch inserts every writable column of every new record in one
/// statement, so a value the plan leaves out is given here, as the column
/// default would; `tests/batch.rs` checks these against the schema.
pub const DEFAULTS: &[Default] = &[
    ("accounts", "custom_fields", || Value::Object(serde_json::Map::new())),
    ("accounts", "tags", || Value::Array(Vec::new())),
    ("contacts", "custom_fields", || Value::Object(serde_json::Map::new())),
    ("contacts", "tags", || Value::Array(Vec::new())),
    ("deals", "pipeline", || Value::String("Standard".into())),
    ("deals", "is_repeat", || Value::Bool(false)),
    ("deals", "is_repeat_inquiry", || Value::Bool(false)),
    ("deals", "custom_fields", || Value::Object(serde_json::Map::new())),
    ("deals", "tags", || Value::Array(Vec::new())),
];

/// The writable columns of each module, for tests that compare them with
/// the schema.
pub fn writable_columns(module: Module) -> (&'static str, &'static [&'static str]) {
    table(module)
}

/// A new record's row: every writable column, the plan's value or the
/// column's default (null when it has none).
fn new_row(module: Module, id: i64, values: &Record) -> Record {
    let (name, allowed) = table(module);
    let mut row = Record::new();
    for c in allowed {
        let default = DEFAULTS.iter().find(|(t, col, _)| *t == name && col == c).map_or(Value::Null, |(_, _, f)| f());
        row.insert((*c).to_owned(), default);
    }
    fill(module, &mut row, values);
    row.insert("id".into(), id.into());
    row
}

/// Lays `values` over `row`; later leads' fills come after earlier ones'.
fn fill(module: Module, row: &mut Record, values: &Record) {
    let (name, allowed) = table(module);
    for (k, v) in values {
        // A column outside the whitelist is a bug in the mapping tables, not
        // bad input: the mapping only ever produces these names.
        assert!(allowed.contains(&k.as_str()), "column {k} is not writable on {name}");
        row.insert(k.clone(), v.clone());
    }
}

/// The rows one batch writes to one module: new records, and fills of
/// existing ones (one row per record, the fills of every lead merged in
/// batch order: each lead was planned over what the earlier ones fill).
#[derive(Default)]
struct Writes {
    inserts: Vec<Record>,
    /// Index in `inserts` of a record the batch creates, by id.
    created: HashMap<i64, usize>,
    updates: Vec<Record>,
    updated: HashMap<i64, usize>,
}

impl Writes {
    fn create(&mut self, module: Module, id: i64, values: &Record) {
        self.created.insert(id, self.inserts.len());
        self.inserts.push(new_row(module, id, values));
    }

    /// Fills the record `id` with `values`: folded into its insert when
    /// the batch creates it, else into its one update.
    fn fill(&mut self, module: Module, id: i64, values: &Record) {
        if values.is_empty() {
            return;
        }
        if let Some(&i) = self.created.get(&id) {
            return fill(module, &mut self.inserts[i], values);
        }
        let i = *self.updated.entry(id).or_insert_with(|| {
            self.updates.push(Record::from_iter([("id".to_owned(), Value::from(id))]));
            self.updates.len() - 1
        });
        fill(module, &mut self.updates[i], values);
    }

    async fn write(&self, conn: &mut PgConnection, module: Module) -> sqlx::Result<()> {
        let (table, cols) = table(module);
        if !self.inserts.is_empty() {
            let list = cols.join(", ");
            sqlx::query(&format!(
                "INSERT INTO {table} (id, {list}) OVERRIDING SYSTEM VALUE
                 SELECT id, {list} FROM jsonb_populate_recordset(NULL::{table}, $1)"
            ))
            .bind(Json(&self.inserts))
            .execute(&mut *conn)
            .await?;
        }
        if !self.updates.is_empty() {
            // A fill never writes null (it copies non-empty values), so a
            // column a row leaves out keeps its value.
            let set: Vec<String> = cols.iter().map(|c| format!("{c} = coalesce(p.{c}, t.{c})")).collect();
            sqlx::query(&format!(
                "UPDATE {table} t SET {} FROM jsonb_populate_recordset(NULL::{table}, $1) p WHERE t.id = p.id",
                set.join(", ")
            ))
            .bind(Json(&self.updates))
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

/// Writes the `conversions` of a batch (lead id and plan, in batch order)
/// with a fixed number of multi-row statements, whatever the batch's size.
/// A later lead may merge into a record an earlier one creates
/// ([`Target::created_by_lead`]). Runs inside the caller's transaction: if
/// any statement fails, nothing of the batch stays. Returns each lead's
/// ids, in the same order.
pub async fn apply_batch(conn: &mut PgConnection, conversions: &[(i64, &Conversion)]) -> sqlx::Result<Vec<Converted>> {
    if conversions.is_empty() {
        return Ok(Vec::new());
    }
    // Ids of new records come from their sequences up front, so that every
    // link (contact → account, deal → both, notes → their new parent) is
    // known before anything is written.
    let count = |f: fn(&Conversion) -> bool| conversions.iter().filter(|(_, c)| f(c)).count() as i32;
    let (n_accounts, n_contacts, n_deals) = (
        count(|c| c.account.as_ref().is_some_and(|a| a.action == Action::Created)),
        count(|c| c.contact.action == Action::Created),
        count(|c| c.deal.is_some()),
    );
    let (accounts, contacts, deals): (Vec<i64>, Vec<i64>, Vec<i64>) = sqlx::query_as(
        "SELECT ARRAY(SELECT nextval(pg_get_serial_sequence('accounts', 'id')) FROM generate_series(1, $1)),
                ARRAY(SELECT nextval(pg_get_serial_sequence('contacts', 'id')) FROM generate_series(1, $2)),
                ARRAY(SELECT nextval(pg_get_serial_sequence('deals', 'id')) FROM generate_series(1, $3))",
    )
    .bind(n_accounts)
    .bind(n_contacts)
    .bind(n_deals)
    .fetch_one(&mut *conn)
    .await?;
    let (mut accounts, mut contacts, mut deals) = (accounts.into_iter(), contacts.into_iter(), deals.into_iter());

    let (mut account_rows, mut contact_rows, mut deal_rows) = (Writes::default(), Writes::default(), Writes::default());
    // The records each lead of the batch creates, for the later leads that
    // merge into them.
    let mut created_account: HashMap<i64, i64> = HashMap::new();
    let mut created_contact: HashMap<i64, i64> = HashMap::new();
    let resolve = |t: &Target, created: &HashMap<i64, i64>| match (t.id, t.created_by_lead) {
        (Some(id), _) => id,
        (None, Some(lead)) => *created.get(&lead).expect("an earlier lead of the batch creates it"),
        (None, None) => unreachable!("a matched record is existing or created by an earlier lead"),
    };
    let mut out = Vec::with_capacity(conversions.len());
    for &(lead_id, c) in conversions {
        let account_id = match &c.account {
            Some(a) if a.action == Action::Created => {
                let id = accounts.next().expect("an id per new account");
                created_account.insert(lead_id, id);
                account_rows.create(Module::Account, id, &a.values);
                Some(id)
            }
            Some(a) => {
                let id = resolve(a, &created_account);
                account_rows.fill(Module::Account, id, &a.values);
                Some(id)
            }
            None => None,
        };
        let mut values = c.contact.values.clone();
        if let (Some(aid), true) = (account_id, c.link_contact_to_account) {
            values.insert("account_id".into(), aid.into());
        }
        let contact_id = if c.contact.action == Action::Created {
            let id = contacts.next().expect("an id per new contact");
            created_contact.insert(lead_id, id);
            contact_rows.create(Module::Contact, id, &values);
            id
        } else {
            let id = resolve(&c.contact, &created_contact);
            contact_rows.fill(Module::Contact, id, &values);
            id
        };
        let deal_id = c.deal.as_ref().map(|d| {
            let id = deals.next().expect("an id per new deal");
            let mut values = d.values.clone();
            values.insert("contact_id".into(), contact_id.into());
            if let Some(aid) = account_id {
                values.insert("account_id".into(), aid.into());
            }
            deal_rows.create(Module::Deal, id, &values);
            id
        });
        out.push(Converted { contact_id, account_id, deal_id });
    }
    account_rows.write(conn, Module::Account).await?;
    contact_rows.write(conn, Module::Contact).await?;
    deal_rows.write(conn, Module::Deal).await?;

    // Related records, each kind in one statement for the whole batch.
    let parent = |ids: &Converted, lead_id: i64, m: Module| match m {
        Module::Deal => ids.deal_id,
        Module::Account => ids.account_id,
        Module::Contact => Some(ids.contact_id),
        Module::Lead => Some(lead_id),
    };
    let mut copies = Related::default();
    let (mut notes, mut attachments, mut activities) = (Related::default(), Related::default(), Related::default());
    for (&(lead_id, c), ids) in conversions.iter().zip(&out) {
        for &m in &c.note_copies_to {
            if let Some(pid) = parent(ids, lead_id, m) {
                copies.push(lead_id, m, pid);
            }
        }
        for (related, to) in
            [(&mut notes, c.notes_to), (&mut attachments, c.attachments_to), (&mut activities, c.activities_to)]
        {
            match parent(ids, lead_id, to) {
                Some(pid) => related.push(lead_id, to, pid),
                None => related.push(lead_id, Module::Contact, ids.contact_id),
            }
        }
    }
    // Copies first, then the move: the copies are made from the lead's notes.
    if !copies.leads.is_empty() {
        sqlx::query!(
            "INSERT INTO notes (parent_module, parent_id, title, body, created_at)
             SELECT v.module, v.parent_id, n.title, n.body, n.created_at
             FROM unnest($1::bigint[], $2::text[], $3::bigint[]) WITH ORDINALITY AS v(lead_id, module, parent_id, ord)
             JOIN notes n ON n.parent_module = 'lead' AND n.parent_id = v.lead_id
             ORDER BY v.ord, n.id",
            &copies.leads,
            &copies.modules as &[&str],
            &copies.parents
        )
        .execute(&mut *conn)
        .await?;
    }
    for (table, related) in [("notes", &notes), ("attachments", &attachments), ("activities", &activities)] {
        sqlx::query(&format!(
            "UPDATE {table} x SET parent_module = v.module, parent_id = v.parent_id
             FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS v(lead_id, module, parent_id)
             WHERE x.parent_module = 'lead' AND x.parent_id = v.lead_id"
        ))
        .bind(&related.leads)
        .bind(&related.modules)
        .bind(&related.parents)
        .execute(&mut *conn)
        .await?;
    }

    let leads: Vec<i64> = conversions.iter().map(|(l, _)| *l).collect();
    let marked = sqlx::query(
        "UPDATE leads l SET converted_at = now(), converted_account_id = v.account_id,
                converted_contact_id = v.contact_id, converted_deal_id = v.deal_id,
                lead_status = 'Converted', is_repeat = v.is_repeat
         FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bool[])
              AS v(id, account_id, contact_id, deal_id, is_repeat)
         WHERE l.id = v.id AND l.converted_at IS NULL",
    )
    .bind(&leads)
    .bind(out.iter().map(|i| i.account_id).collect::<Vec<_>>())
    .bind(out.iter().map(|i| i.contact_id).collect::<Vec<_>>())
    .bind(out.iter().map(|i| i.deal_id).collect::<Vec<_>>())
    .bind(conversions.iter().map(|(_, c)| c.lead_is_repeat).collect::<Vec<_>>())
    .execute(&mut *conn)
    .await?;
    // Every lead row is locked since the snapshot and was unconverted then.
    debug_assert_eq!(marked.rows_affected(), leads.len() as u64);
    Ok(out)
}

/// Related records to move (or copy): from which lead, to which parent.
#[derive(Default)]
struct Related {
    leads: Vec<i64>,
    modules: Vec<&'static str>,
    parents: Vec<i64>,
}

impl Related {
    fn push(&mut self, lead_id: i64, module: Module, parent_id: i64) {
        self.leads.push(lead_id);
        self.modules.push(module.as_str());
        self.parents.push(parent_id);
    }
}
