//! A CRM record as the engine sees it: a JSON object keyed by column name.
//!
//! Leads, contacts and accounts are read with `to_jsonb(row)` and written back
//! with `jsonb_populate_record`, so the conversion rules can be plain Rust over
//! maps and the field mapping can stay a table of names (SPEC §3.10) rather
//! than hand-written code per column.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub type Record = Map<String, Value>;

/// The CRM modules that records and related items belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Module {
    Lead,
    Account,
    Contact,
    Deal,
}

impl Module {
    pub fn as_str(self) -> &'static str {
        match self {
            Module::Lead => "lead",
            Module::Account => "account",
            Module::Contact => "contact",
            Module::Deal => "deal",
        }
    }

    pub fn parse(s: &str) -> Option<Module> {
        match s {
            "lead" => Some(Module::Lead),
            "account" => Some(Module::Account),
            "contact" => Some(Module::Contact),
            "deal" => Some(Module::Deal),
            _ => None,
        }
    }
}

/// Empty means "nothing there to keep": SQL NULL, or text that is blank.
/// A merge may fill an empty field; it never touches a non-empty one.
pub fn is_empty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.trim().is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(_) => false,
    }
}

/// `v` with text trimmed of white space at both ends (Unicode White_Space:
/// NBSP, tabs and new lines too); other values as they are.
pub fn trimmed(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(s.trim().to_owned()),
        other => other.clone(),
    }
}

pub fn text<'a>(r: &'a Record, field: &str) -> Option<&'a str> {
    r.get(field).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty())
}

pub fn id(r: &Record, field: &str) -> Option<i64> {
    r.get(field).and_then(Value::as_i64)
}

pub fn custom_fields(r: &Record) -> Map<String, Value> {
    match r.get("custom_fields") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    }
}

pub fn tags(r: &Record) -> Vec<String> {
    match r.get("tags") {
        Some(Value::Array(a)) => a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    }
}

/// "First Last" (salutation left out), as the CRM shows a person's name.
pub fn full_name(lead: &Record) -> String {
    [text(lead, "first_name"), text(lead, "last_name")].into_iter().flatten().collect::<Vec<_>>().join(" ")
}
