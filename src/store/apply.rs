//! Carrying out a [`Conversion`] inside the conversion's transaction.
//!
//! Records are written from their JSON values with `jsonb_populate_record`,
//! so one insert and one update serve every module. Column names come only
//! from the whitelists below, never from input.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::Value;
use sqlx::types::Json;
use sqlx::PgConnection;

use crate::journal::{self, Entry, Filled, Moved, NoteCopy, Related as RelatedTable};
use crate::plan::{Action, Conversion, Target};
use crate::record::{Module, Record};

/// The ids a conversion ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Converted {
    /// `None`: the job makes no contact.
    pub contact_id: Option<i64>,
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

/// How a writable column stores a JSON value (Postgres' type of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    /// `bigint`, `integer`.
    Integer,
    Numeric,
    Boolean,
    Date,
    /// `jsonb`.
    Json,
    /// `text[]`.
    TextArray,
}

/// The kind of writable column `column` (the same name has the same type
/// in every module; `tests/batch.rs` checks this against the schema).
pub fn kind(column: &str) -> Kind {
    match column {
        "owner_id" | "account_id" | "contact_id" | "no_of_employees" => Kind::Integer,
        "annual_revenue" | "amount" => Kind::Numeric,
        "email_opt_out" | "is_repeat" | "is_repeat_inquiry" => Kind::Boolean,
        "closing_date" => Kind::Date,
        "custom_fields" => Kind::Json,
        "tags" => Kind::TextArray,
        _ => Kind::Text,
    }
}

/// Whether `value`, written into a column of `kind` by
/// `jsonb_populate_recordset`, reads back (`row_to_json`) as the same JSON
/// value: a value of the column's own JSON type, a date as `YYYY-MM-DD`.
/// Anything else is converted on the way in (a number into text, `"5"`
/// into an integer, `"2027-1-6"` into `"2027-01-06"`). Numbers go through
/// `numeric` digit for digit, so they parse back equal.
pub fn reads_back(kind: Kind, value: &Value) -> bool {
    match (kind, value) {
        (_, Value::Null) | (Kind::Json, _) => true,
        (Kind::Text, Value::String(_)) | (Kind::Numeric, Value::Number(_)) | (Kind::Boolean, Value::Bool(_)) => true,
        (Kind::Integer, Value::Number(n)) => n.is_i64() || n.is_u64(),
        (Kind::Date, Value::String(s)) => {
            chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok_and(|d| d.format("%Y-%m-%d").to_string() == *s)
        }
        (Kind::TextArray, Value::Array(items)) => items.iter().all(Value::is_string),
        _ => false,
    }
}

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

    /// Writes the batch's rows of `module`. Returns what the journal needs,
    /// as the database has it: each created row as stored, and each filled
    /// row as it was before the fill and as it is after. `only_ours`: the
    /// table has no columns or triggers but leadconv's.
    async fn write(self, conn: &mut PgConnection, module: Module, only_ours: bool) -> sqlx::Result<Written> {
        let (table, cols) = table(module);
        let mut written = Written::default();
        if !self.inserts.is_empty() {
            let list = cols.join(", ");
            let insert = format!(
                "INSERT INTO {table} (id, {list}) OVERRIDING SYSTEM VALUE
                 SELECT id, {list} FROM jsonb_populate_recordset(NULL::{table}, $1)"
            );
            // Rows whose every value reads back as written, in a table of
            // leadconv's columns and trigger only, are what is stored: they
            // are not read back. Parsing every created row returned was most of
            // this function's 16 % of the worker's CPU (perf, 100,000
            // leads), and building it in Postgres about a fifth of the
            // insert. A batch with any other value reads its rows back.
            let as_written = only_ours
                && self.inserts.iter().all(|row| row.iter().all(|(c, v)| c == "id" || reads_back(kind(c), v)));
            if as_written {
                sqlx::query(&insert).bind(Json(&self.inserts)).execute(&mut *conn).await?;
                written.created = self
                    .inserts
                    .into_iter()
                    .map(|row| (crate::record::id(&row, "id").expect("a new row has its id"), row))
                    .collect();
            } else {
                let rows: Vec<(i64, Json<Record>)> =
                    sqlx::query_as(&format!("{insert} RETURNING id, row_to_json({table}.*)"))
                        .bind(Json(&self.inserts))
                        .fetch_all(&mut *conn)
                        .await?;
                written.created = rows.into_iter().map(|(id, row)| (id, as_kept(row.0))).collect();
            }
        }
        if !self.updates.is_empty() {
            // A fill never writes null (it copies non-empty values), so a
            // column a row leaves out keeps its value. `prev` reads the rows
            // as the statement found them (locked since the batch's facts):
            // the journal's exact values before, `''` and white space kept.
            // The ids are bound as an array as well: `id = ANY($2)` reads
            // the rows by primary key whatever the planner's statistics say
            // (a semi-join with the recordset became a hash join over a
            // scan of the whole table once it held a few thousand rows).
            let set: Vec<String> = cols.iter().map(|c| format!("{c} = coalesce(p.{c}, t.{c})")).collect();
            let rows: Vec<(i64, Json<Record>, Json<Record>)> = sqlx::query_as(&format!(
                "WITH p AS (SELECT * FROM jsonb_populate_recordset(NULL::{table}, $1)),
                      prev AS (SELECT * FROM {table} WHERE id = ANY($2))
                 UPDATE {table} t SET {} FROM p, prev WHERE t.id = ANY($2) AND t.id = p.id AND prev.id = p.id
                 RETURNING t.id, row_to_json(prev.*), row_to_json(t.*)",
                set.join(", ")
            ))
            .bind(Json(&self.updates))
            .bind(self.updated.keys().copied().collect::<Vec<i64>>())
            .fetch_all(&mut *conn)
            .await?;
            written.filled =
                rows.into_iter().map(|(id, before, after)| (id, (as_kept(before.0), as_kept(after.0)))).collect();
        }
        Ok(written)
    }
}

/// A CRM row as the journal keeps it and an undo compares it: without
/// `created_at`/`updated_at`, which any write changes.
///
/// Rows are read as `row_to_json` (json text, as Postgres has the row),
/// not `to_jsonb`: the same values once parsed, at about half the cost to
/// build (measured on 200 leads: 1.3 against 2.3 ms, and 3.1 with the two
/// keys removed in SQL), and conversions read and write thousands a second.
pub(crate) fn as_kept(mut row: Record) -> Record {
    row.remove("created_at");
    row.remove("updated_at");
    row
}

/// What a module's statements returned: created rows as stored; filled
/// rows before and after.
#[derive(Default)]
struct Written {
    created: HashMap<i64, Record>,
    filled: HashMap<i64, (Record, Record)>,
}

/// Writes the `conversions` of a batch (lead id and plan, in batch order)
/// with a fixed number of multi-row statements, whatever the batch's size.
/// A later lead may merge into a record an earlier one creates
/// ([`Target::created_by_lead`]). Runs inside the caller's transaction: if
/// any statement fails, nothing of the batch stays. `before` holds each
/// lead's [`journal::LEAD_MARKS`] as the batch read its row (locked since).
/// Returns each lead's ids and journal entry (SPEC §4a: what it wrote), in
/// the same order.
pub async fn apply_batch(
    conn: &mut PgConnection,
    conversions: &[(i64, &Conversion)],
    before: &HashMap<i64, Record>,
) -> sqlx::Result<Vec<(Converted, Entry)>> {
    if conversions.is_empty() {
        return Ok(Vec::new());
    }
    // Ids of new records come from their sequences up front, so that every
    // link (contact → account, deal → both, notes → their new parent) is
    // known before anything is written.
    let count = |f: fn(&Conversion) -> bool| conversions.iter().filter(|(_, c)| f(c)).count() as i32;
    let (n_accounts, n_contacts, n_deals) = (
        count(|c| c.account.as_ref().is_some_and(|a| a.action == Action::Created)),
        count(|c| c.contact.as_ref().is_some_and(|t| t.action == Action::Created)),
        count(|c| c.deal.is_some()),
    );
    // With them, whether each table is leadconv's alone: its columns
    // (`id`, `created_at`, `updated_at` and the writable ones) and no
    // trigger but the one stamping `updated_at`. One with another system's
    // column (with a default, say) or trigger (which may change a row as
    // it goes in) has its new rows read back, so that the journal holds
    // them as stored (see `Writes::write`). The tables are named in the
    // statement, so it holds their locks (no column or trigger is added)
    // until the commit.
    // New ids of accounts, contacts, deals; columns and others' triggers
    // of each table.
    type Drawn = (Vec<i64>, Vec<i64>, Vec<i64>, Vec<i32>, Vec<i32>);
    let (accounts, contacts, deals, columns, triggers): Drawn = sqlx::query_as(
        "SELECT ARRAY(SELECT nextval(pg_get_serial_sequence('accounts', 'id')) FROM generate_series(1, $1)),
                    ARRAY(SELECT nextval(pg_get_serial_sequence('contacts', 'id')) FROM generate_series(1, $2)),
                    ARRAY(SELECT nextval(pg_get_serial_sequence('deals', 'id')) FROM generate_series(1, $3)),
                    ARRAY(SELECT (SELECT count(*) FROM pg_attribute a
                                  WHERE a.attrelid = t.rel AND a.attnum > 0 AND NOT a.attisdropped)::int
                          FROM unnest($4::regclass[]) WITH ORDINALITY AS t(rel, ord) ORDER BY ord),
                    ARRAY(SELECT (SELECT count(*) FROM pg_trigger g
                                  WHERE g.tgrelid = t.rel AND NOT g.tgisinternal
                                    AND g.tgfoid <> 'leadconv_touch_updated_at'::regproc)::int
                          FROM unnest($4::regclass[]) WITH ORDINALITY AS t(rel, ord) ORDER BY ord)
             WHERE NOT EXISTS (SELECT FROM accounts WHERE false) AND NOT EXISTS (SELECT FROM contacts WHERE false)
               AND NOT EXISTS (SELECT FROM deals WHERE false)",
    )
    .bind(n_accounts)
    .bind(n_contacts)
    .bind(n_deals)
    .bind(&["accounts", "contacts", "deals"][..])
    .fetch_one(&mut *conn)
    .await?;
    let only_ours = |i: usize, m: Module| {
        columns.get(i).is_some_and(|&n| n as usize == table(m).1.len() + 3) && triggers.get(i) == Some(&0)
    };
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
    // Each lead's writes, in batch order, for its journal entry: the
    // records it created (module, id, the plan's values: the row is built
    // from them again only where the journal needs it) and the fills it
    // made (module, id, values).
    let mut creates: Vec<Vec<(Module, i64, Cow<Record>)>> = Vec::with_capacity(conversions.len());
    let mut fills: Vec<Vec<(Module, i64, Record)>> = Vec::with_capacity(conversions.len());
    for &(lead_id, c) in conversions {
        let (mut made, mut filled) = (Vec::new(), Vec::new());
        let account_id = match &c.account {
            Some(a) if a.action == Action::Created => {
                let id = accounts.next().expect("an id per new account");
                created_account.insert(lead_id, id);
                account_rows.create(Module::Account, id, &a.values);
                made.push((Module::Account, id, Cow::Borrowed(&a.values)));
                Some(id)
            }
            Some(a) => {
                let id = resolve(a, &created_account);
                account_rows.fill(Module::Account, id, &a.values);
                filled.push((Module::Account, id, a.values.clone()));
                Some(id)
            }
            None => None,
        };
        let contact_id = c.contact.as_ref().map(|contact| {
            let mut values = contact.values.clone();
            if let (Some(aid), true) = (account_id, c.link_contact_to_account) {
                values.insert("account_id".into(), aid.into());
            }
            if contact.action == Action::Created {
                let id = contacts.next().expect("an id per new contact");
                created_contact.insert(lead_id, id);
                contact_rows.create(Module::Contact, id, &values);
                made.push((Module::Contact, id, Cow::Owned(values)));
                id
            } else {
                let id = resolve(contact, &created_contact);
                contact_rows.fill(Module::Contact, id, &values);
                filled.push((Module::Contact, id, values));
                id
            }
        });
        let deal_id = c.deal.as_ref().map(|d| {
            let id = deals.next().expect("an id per new deal");
            let mut values = d.values.clone();
            if let Some(cid) = contact_id {
                values.insert("contact_id".into(), cid.into());
            }
            if let Some(aid) = account_id {
                values.insert("account_id".into(), aid.into());
            }
            deal_rows.create(Module::Deal, id, &values);
            made.push((Module::Deal, id, Cow::Owned(values)));
            id
        });
        out.push(Converted { contact_id, account_id, deal_id });
        creates.push(made);
        fills.push(filled);
    }
    let written = [
        (Module::Account, account_rows.write(conn, Module::Account, only_ours(0, Module::Account)).await?),
        (Module::Contact, contact_rows.write(conn, Module::Contact, only_ours(1, Module::Contact)).await?),
        (Module::Deal, deal_rows.write(conn, Module::Deal, only_ours(2, Module::Deal)).await?),
    ];
    let mut entries = journal_records(creates, &fills, written);

    // Related records, each kind in one statement for the whole batch.
    let parent = |ids: &Converted, lead_id: i64, m: Module| match m {
        Module::Deal => ids.deal_id,
        Module::Account => ids.account_id,
        Module::Contact => ids.contact_id,
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
            // The plan names a record this lead has (SPEC §3.11).
            let pid = parent(ids, lead_id, to).expect("related records go to a record the lead has");
            related.push(lead_id, to, pid);
        }
    }
    let index: HashMap<i64, usize> = conversions.iter().enumerate().map(|(i, (lead, _))| (*lead, i)).collect();
    // `parent_id = ANY($1)` besides the join with `v` in the statements
    // below: the lead's notes, attachments and activities are read through
    // `(parent_module, parent_id)` whatever the statistics say (a hash join
    // over a scan of the whole table was chosen once it held a few
    // thousand rows, each batch again).
    // Copies first, then the move: the copies are made from the lead's notes.
    // Their ids are drawn in the statement, so that each copy is known by
    // the lead it was made for.
    if !copies.leads.is_empty() {
        let made = sqlx::query!(
            r#"WITH src AS MATERIALIZED (
                   SELECT nextval(pg_get_serial_sequence('notes', 'id')) AS id, v.lead_id, v.module, v.parent_id,
                          n.title, n.body, n.created_at
                   FROM unnest($1::bigint[], $2::text[], $3::bigint[]) WITH ORDINALITY AS v(lead_id, module, parent_id, ord)
                   JOIN notes n ON n.parent_module = 'lead' AND n.parent_id = v.lead_id AND n.parent_id = ANY($1)
                   ORDER BY v.ord, n.id),
               ins AS (
                   INSERT INTO notes (id, parent_module, parent_id, title, body, created_at) OVERRIDING SYSTEM VALUE
                   SELECT id, module, parent_id, title, body, created_at FROM src)
               SELECT id AS "id!", lead_id AS "lead_id!", module AS "module!", parent_id AS "parent_id!",
                      to_jsonb(title) AS "title!", to_jsonb(body) AS "body!" FROM src"#,
            &copies.leads,
            &copies.modules as &[&str],
            &copies.parents
        )
        .fetch_all(&mut *conn)
        .await?;
        for m in made {
            let module = Module::parse(&m.module).expect("a module this batch named");
            entries[index[&m.lead_id]].copies.push(NoteCopy {
                id: m.id,
                module,
                parent_id: m.parent_id,
                title: m.title,
                body: m.body,
            });
        }
    }
    for (kind, related) in [
        (RelatedTable::Notes, &notes),
        (RelatedTable::Attachments, &attachments),
        (RelatedTable::Activities, &activities),
    ] {
        let table = kind.table();
        let moved: Vec<(i64, i64, String, i64)> = sqlx::query_as(&format!(
            "UPDATE {table} x SET parent_module = v.module, parent_id = v.parent_id
             FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS v(lead_id, module, parent_id)
             WHERE x.parent_module = 'lead' AND x.parent_id = ANY($1) AND x.parent_id = v.lead_id
             RETURNING x.id, v.lead_id, x.parent_module, x.parent_id"
        ))
        .bind(&related.leads)
        .bind(&related.modules)
        .bind(&related.parents)
        .fetch_all(&mut *conn)
        .await?;
        for (id, lead_id, module, to_id) in moved {
            let to_module = Module::parse(&module).expect("a module this batch named");
            entries[index[&lead_id]].moved.push(Moved { table: kind, id, to_module, to_id });
        }
    }

    let leads: Vec<i64> = conversions.iter().map(|(l, _)| *l).collect();
    // The lead's own fields as they were (its row as the batch read it,
    // locked since) and as they are: its journal's `lead` (an undo restores
    // `lead_status` and `is_repeat` exactly). Only `converted_at` (the
    // transaction's time) comes back from the statement.
    let marked: Vec<(i64, Json<Value>)> = sqlx::query_as(
        "UPDATE leads l SET converted_at = now(), converted_account_id = v.account_id,
                converted_contact_id = v.contact_id, converted_deal_id = v.deal_id,
                lead_status = 'Converted', is_repeat = v.is_repeat
         FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bool[])
              AS v(id, account_id, contact_id, deal_id, is_repeat)
         WHERE l.id = v.id AND l.converted_at IS NULL
         RETURNING l.id, to_jsonb(l.converted_at)",
    )
    .bind(&leads)
    .bind(out.iter().map(|i| i.account_id).collect::<Vec<_>>())
    .bind(out.iter().map(|i| i.contact_id).collect::<Vec<_>>())
    .bind(out.iter().map(|i| i.deal_id).collect::<Vec<_>>())
    .bind(conversions.iter().map(|(_, c)| c.lead_is_repeat).collect::<Vec<_>>())
    .fetch_all(&mut *conn)
    .await?;
    // Every lead row is locked since the snapshot and was unconverted then.
    debug_assert_eq!(marked.len(), leads.len());
    for (lead_id, Json(converted_at)) in marked {
        let i = index[&lead_id];
        let (c, ids) = (conversions[i].1, out[i]);
        let before = before.get(&lead_id).cloned().unwrap_or_default();
        let after = journal::lead_marks_converted(
            converted_at,
            c.lead_is_repeat,
            [ids.account_id, ids.contact_id, ids.deal_id],
        );
        entries[i].lead = journal::LeadChange { before, after };
    }
    Ok(out.into_iter().zip(entries).collect())
}

/// The records part of each lead's journal entry: what it created, as
/// stored, and what it filled, each field's exact value before and the
/// value written. Leads of a batch that fill the same record are replayed
/// in batch order over the row as the database had it, so each one's
/// "before" is what the one before it left.
fn journal_records(
    creates: Vec<Vec<(Module, i64, Cow<Record>)>>,
    fills: &[Vec<(Module, i64, Record)>],
    written: [(Module, Written); 3],
) -> Vec<Entry> {
    let mut written: HashMap<Module, Written> = written.into_iter().collect();
    // The records the batch creates, by the plan's values of the lead that
    // creates each.
    let planned: HashMap<(Module, i64), &Record> =
        creates.iter().flatten().map(|(module, id, values)| ((*module, *id), values.as_ref())).collect();
    // The row each fill is laid over: an existing record as it was, or a
    // record of the batch as its creating lead planned it (built when a
    // later lead fills it, which few do).
    let mut rows: HashMap<(Module, i64), Record> = HashMap::new();
    let mut entries: Vec<Entry> = Vec::with_capacity(creates.len());
    for filled in fills {
        let mut e = Entry::default();
        for (module, id, values) in filled {
            let row = rows.entry((*module, *id)).or_insert_with(|| match planned.get(&(*module, *id)) {
                Some(values) => new_row(*module, *id, values),
                None => written[module].filled.get(id).map(|(before, _)| before.clone()).unwrap_or_default(),
            });
            e.filled.extend(journal::fill(*module, *id, row, values));
        }
        entries.push(e);
    }
    // What was written, as the database stores it: a field's value after
    // the batch is the last fill's; a created record's values are as
    // stored, but for the fields later leads of the batch filled, which
    // held what the creating lead planned.
    let mut last: HashMap<(Module, i64, String), (usize, usize)> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        for (j, f) in e.filled.iter().enumerate() {
            last.insert((f.module, f.id, f.field.clone()), (i, j));
        }
    }
    let stored = |m: Module, id: i64| -> Option<&Record> {
        let w = &written[&m];
        w.created.get(&id).or_else(|| w.filled.get(&id).map(|(_, after)| after))
    };
    for ((module, id, field), (i, j)) in &last {
        if let Some(row) = stored(*module, *id) {
            let value = match field.strip_prefix(journal::CUSTOM_PREFIX) {
                Some(key) => crate::record::custom_fields(row).get(key).cloned(),
                None => row.get(field).cloned(),
            };
            if let Some(v) = value {
                entries[*i].filled[*j].after = v;
            }
        }
    }
    for (i, made) in creates.iter().enumerate() {
        for (module, id, planned) in made {
            // Each created row is taken once, as stored.
            let stored = written.get_mut(module).and_then(|w| w.created.remove(id));
            let mut values = stored.unwrap_or_else(|| new_row(*module, *id, planned));
            let later: Vec<&Filled> =
                entries.iter().flat_map(|e| &e.filled).filter(|f| f.module == *module && f.id == *id).collect();
            for f in later.into_iter().rev() {
                // Put back from the last fill: the first one's "before" stays.
                journal::set_field(&mut values, &f.field, f.before.clone());
            }
            // Empty columns are left out: a column missing from the entry
            // reads as null wherever it is compared or shown, and a created
            // record's row is mostly empty columns (a fifth of the journal).
            values.retain(|_, v| !v.is_null());
            entries[i].created.push(journal::Created { module: *module, id: *id, values });
        }
    }
    entries
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_value_of_the_columns_own_type_reads_back_as_written_and_no_other() {
        let yes = [
            (Kind::Text, json!("  Łódź\u{a0}")),
            (Kind::Text, json!(null)),
            (Kind::Integer, json!(42)),
            (Kind::Numeric, json!(3898675.5)),
            (Kind::Numeric, json!(7)),
            (Kind::Boolean, json!(false)),
            (Kind::Date, json!("2027-01-06")),
            (Kind::Json, json!({"region": "EMEA", "n": 1.5})),
            (Kind::TextArray, json!(["vip", "İstanbul"])),
        ];
        for (kind, v) in &yes {
            assert!(reads_back(*kind, v), "{kind:?} {v}");
        }
        let no = [
            (Kind::Text, json!(5)),
            (Kind::Text, json!(true)),
            (Kind::Integer, json!("5")),
            (Kind::Integer, json!(5.0)),
            (Kind::Numeric, json!("12.50")),
            (Kind::Boolean, json!("true")),
            (Kind::Date, json!("2027-1-6")),
            (Kind::Date, json!("2027-01-06T10:00:00")),
            (Kind::Date, json!("2027-02-30")),
            (Kind::TextArray, json!(["vip", 1])),
            (Kind::TextArray, json!("vip")),
        ];
        for (kind, v) in &no {
            assert!(!reads_back(*kind, v), "{kind:?} {v}");
        }
    }
}
