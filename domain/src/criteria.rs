//! Which leads a job converts: criteria (SPEC §4, §6) parsed, checked and
//! compiled into parameterised SQL over `leads`.
//!
//! Parsing does every check (field names, operators, value types, dates)
//! and names the path of the problem, e.g. `criteria.all[1].any[0].value`.
//! Compiling (in `leadconv::criteria`) cannot fail and binds every value;
//! field names in the SQL come only from the catalogue below.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

use crate::error::{ErrorCode, Refusal};
use crate::mapping::CustomFieldDef;

/// How deep `all`/`any` may nest: deeper input is hostile or a bug.
const MAX_DEPTH: usize = 16;
/// Conditions in one job's criteria, all groups together.
const MAX_CONDITIONS: usize = 500;
/// Values in one `in`/`not_in` list or `ids` list.
pub const MAX_LIST: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Number,
    Integer,
    Bool,
    Timestamp,
    Date,
    Tags,
}

/// The lead fields criteria may name.
pub const FIELDS: &[(&str, Kind)] = &[
    ("id", Kind::Integer),
    ("owner_id", Kind::Integer),
    ("salutation", Kind::Text),
    ("first_name", Kind::Text),
    ("last_name", Kind::Text),
    ("company", Kind::Text),
    ("title", Kind::Text),
    ("email", Kind::Text),
    ("phone", Kind::Text),
    ("mobile", Kind::Text),
    ("fax", Kind::Text),
    ("skype_id", Kind::Text),
    ("website", Kind::Text),
    ("lead_source", Kind::Text),
    ("industry", Kind::Text),
    ("annual_revenue", Kind::Number),
    ("no_of_employees", Kind::Integer),
    ("rating", Kind::Text),
    ("email_opt_out", Kind::Bool),
    ("street", Kind::Text),
    ("city", Kind::Text),
    ("state", Kind::Text),
    ("zip_code", Kind::Text),
    ("country", Kind::Text),
    ("lead_status", Kind::Text),
    ("description", Kind::Text),
    ("tags", Kind::Tags),
    ("is_repeat", Kind::Bool),
    ("created_at", Kind::Timestamp),
    ("updated_at", Kind::Timestamp),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    In,
    NotIn,
    Contains,
    Between,
    Gt,
    Lt,
    IsNull,
}

const OPS: &[(&str, Op)] = &[
    ("eq", Op::Eq),
    ("ne", Op::Ne),
    ("in", Op::In),
    ("not_in", Op::NotIn),
    ("contains", Op::Contains),
    ("between", Op::Between),
    ("gt", Op::Gt),
    ("lt", Op::Lt),
    ("is_null", Op::IsNull),
];

fn allowed(kind: Kind) -> &'static [Op] {
    use Op::*;
    match kind {
        Kind::Text => &[Eq, Ne, In, NotIn, Contains, IsNull],
        Kind::Number | Kind::Integer => &[Eq, Ne, In, NotIn, Between, Gt, Lt, IsNull],
        Kind::Bool => &[Eq, Ne, IsNull],
        Kind::Timestamp | Kind::Date => &[Eq, Ne, Between, Gt, Lt, IsNull],
        Kind::Tags => &[Contains, IsNull],
    }
}

/// A checked value, typed for binding.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Text(String),
    /// Kept as its decimal text and cast in SQL, so nothing is rounded.
    Number(String),
    Integer(i64),
    Bool(bool),
    /// A whole day (`2026-06-30`) or an instant.
    Day(NaiveDate),
    Instant(DateTime<Utc>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    Standard(&'static str),
    Custom(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub column: Column,
    pub kind: Kind,
    pub op: Op,
    pub values: Vec<Scalar>,
    /// For `is_null`: true matches empty, false matches non-empty.
    pub null: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    All(Vec<Node>),
    Any(Vec<Node>),
    Condition(Condition),
}

/// Parsed, checked criteria.
#[derive(Debug, Clone, PartialEq)]
pub enum Criteria {
    Ids(Vec<i64>),
    AllLeads,
    Filter(Filter),
}

/// The root of a filter: build it with [`Criteria::parse`], which checks
/// everything; `leadconv::criteria` compiles it to SQL.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter(pub Node);

fn refuse(path: &str, message: impl Into<String>) -> Refusal {
    Refusal::new(ErrorCode::InvalidCriteria, path, message)
}

impl Criteria {
    /// Parses `v`. `lead_custom_fields` are the lead custom field
    /// definitions, for `custom.<api_name>`.
    pub fn parse(v: &Value, lead_custom_fields: &[CustomFieldDef]) -> Result<Criteria, Refusal> {
        let path = "criteria";
        let obj = v.as_object().ok_or_else(|| refuse(path, "must be a JSON object"))?;
        if obj.is_empty() {
            return Err(refuse(
                path,
                "empty criteria would match every lead; write {\"all_leads\": true} if that is meant",
            ));
        }
        if let Some(all_leads) = obj.get("all_leads") {
            if obj.len() > 1 {
                return Err(refuse(path, "all_leads cannot be combined with other keys"));
            }
            return match all_leads {
                Value::Bool(true) => Ok(Criteria::AllLeads),
                _ => Err(refuse("criteria.all_leads", "must be true (or leave it out and give conditions)")),
            };
        }
        if let Some(ids) = obj.get("ids") {
            if obj.len() > 1 {
                return Err(refuse(path, "ids cannot be combined with other keys"));
            }
            let list = ids.as_array().ok_or_else(|| refuse("criteria.ids", "must be an array of lead ids"))?;
            if list.is_empty() {
                return Err(refuse("criteria.ids", "is empty"));
            }
            if list.len() > MAX_LIST {
                return Err(refuse("criteria.ids", format!("has more than {MAX_LIST} ids; use conditions instead")));
            }
            let mut out = Vec::with_capacity(list.len());
            for (i, id) in list.iter().enumerate() {
                match id.as_i64() {
                    Some(n) if n > 0 => out.push(n),
                    _ => {
                        return Err(refuse(
                            &format!("criteria.ids[{i}]"),
                            format!("{id} is not a lead id (a positive integer)"),
                        ))
                    }
                }
            }
            out.sort_unstable();
            out.dedup();
            return Ok(Criteria::Ids(out));
        }
        let mut budget = MAX_CONDITIONS;
        let node = parse_node(v, path, 0, lead_custom_fields, &mut budget)?;
        Ok(Criteria::Filter(Filter(node)))
    }
}

fn parse_node(
    v: &Value,
    path: &str,
    depth: usize,
    defs: &[CustomFieldDef],
    budget: &mut usize,
) -> Result<Node, Refusal> {
    if depth > MAX_DEPTH {
        return Err(refuse(path, format!("groups nest deeper than {MAX_DEPTH} levels")));
    }
    let obj = v.as_object().ok_or_else(|| refuse(path, "must be an object: a condition or an all/any group"))?;
    for group in ["all", "any"] {
        if let Some(items) = obj.get(group) {
            if obj.len() > 1 {
                return Err(refuse(path, format!("a {group} group has no other keys")));
            }
            let items = items.as_array().ok_or_else(|| refuse(&format!("{path}.{group}"), "must be an array"))?;
            if items.is_empty() {
                return Err(refuse(&format!("{path}.{group}"), "is empty"));
            }
            let nodes = items
                .iter()
                .enumerate()
                .map(|(i, item)| parse_node(item, &format!("{path}.{group}[{i}]"), depth + 1, defs, budget))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(if group == "all" { Node::All(nodes) } else { Node::Any(nodes) });
        }
    }
    if *budget == 0 {
        return Err(refuse(path, format!("more than {MAX_CONDITIONS} conditions")));
    }
    *budget -= 1;
    parse_condition(obj, path, defs).map(Node::Condition)
}

fn parse_condition(
    obj: &serde_json::Map<String, Value>,
    path: &str,
    defs: &[CustomFieldDef],
) -> Result<Condition, Refusal> {
    if let Some(k) = obj.keys().find(|k| !["field", "op", "value"].contains(&k.as_str())) {
        return Err(refuse(path, format!("unknown key {k:?} (a condition has field, op, value)")));
    }
    let field = obj
        .get("field")
        .and_then(Value::as_str)
        .ok_or_else(|| refuse(&format!("{path}.field"), "is missing (a condition needs a field name)"))?;
    let (column, kind) = if let Some(api) = field.strip_prefix("custom.") {
        let def = defs.iter().find(|d| d.module == "lead" && d.api_name == api).ok_or_else(|| {
            refuse(&format!("{path}.field"), format!("{field:?}: no lead custom field {api:?} exists"))
        })?;
        let kind = match def.data_type.as_str() {
            "number" => Kind::Number,
            "date" => Kind::Date,
            "boolean" => Kind::Bool,
            _ => Kind::Text,
        };
        (Column::Custom(api.to_owned()), kind)
    } else {
        let (name, kind) = FIELDS.iter().find(|(n, _)| *n == field).ok_or_else(|| {
            refuse(
                &format!("{path}.field"),
                format!("{field:?} is not a lead field (custom fields are custom.<api_name>)"),
            )
        })?;
        (Column::Standard(name), *kind)
    };
    let op_name = obj.get("op").and_then(Value::as_str).ok_or_else(|| refuse(&format!("{path}.op"), "is missing"))?;
    let op = OPS.iter().find(|(n, _)| *n == op_name).map(|(_, o)| *o).ok_or_else(|| {
        refuse(
            &format!("{path}.op"),
            format!("{op_name:?} is not an operator (eq, ne, in, not_in, contains, between, gt, lt, is_null)"),
        )
    })?;
    if !allowed(kind).contains(&op) {
        return Err(refuse(
            &format!("{path}.op"),
            format!("{op_name} does not apply to {field} ({kind:?})").to_lowercase(),
        ));
    }
    let vpath = format!("{path}.value");
    let value = obj.get("value");
    let mut cond = Condition { column, kind, op, values: Vec::new(), null: true };
    match op {
        Op::IsNull => match value {
            None | Some(Value::Bool(true)) => cond.null = true,
            Some(Value::Bool(false)) => cond.null = false,
            Some(_) => return Err(refuse(&vpath, "is_null takes true, false or no value")),
        },
        Op::In | Op::NotIn | Op::Between => {
            let list =
                value.and_then(Value::as_array).ok_or_else(|| refuse(&vpath, format!("{op_name} needs an array")))?;
            if op == Op::Between && list.len() != 2 {
                return Err(refuse(&vpath, "between needs exactly two values [from, to]"));
            }
            if list.is_empty() || list.len() > MAX_LIST {
                return Err(refuse(&vpath, format!("{op_name} needs between 1 and {MAX_LIST} values")));
            }
            for (i, item) in list.iter().enumerate() {
                cond.values.push(scalar(kind, item, &format!("{vpath}[{i}]"))?);
            }
        }
        Op::Contains if kind == Kind::Tags => match value {
            Some(Value::String(s)) if !s.trim().is_empty() => cond.values.push(Scalar::Text(s.trim().to_owned())),
            _ => return Err(refuse(&vpath, "contains on tags needs a tag (a non-empty string)")),
        },
        _ => {
            let v = value.ok_or_else(|| refuse(&vpath, format!("{op_name} needs a value")))?;
            cond.values.push(scalar(kind, v, &vpath)?);
        }
    }
    Ok(cond)
}

fn scalar(kind: Kind, v: &Value, path: &str) -> Result<Scalar, Refusal> {
    let wrong = |what: &str| refuse(path, format!("{v} is not {what}"));
    match kind {
        Kind::Text | Kind::Tags => v.as_str().map(|s| Scalar::Text(s.to_owned())).ok_or_else(|| wrong("a string")),
        Kind::Integer => v.as_i64().map(Scalar::Integer).ok_or_else(|| wrong("an integer")),
        Kind::Number => match v {
            Value::Number(n) => {
                let text = n.to_string();
                // serde_json (arbitrary_precision) accepts any JSON number;
                // refuse what Postgres numeric cannot hold.
                if text.len() > 100 || !n.as_f64().is_some_and(f64::is_finite) {
                    return Err(wrong("a number in range"));
                }
                Ok(Scalar::Number(text))
            }
            _ => Err(wrong("a number")),
        },
        Kind::Bool => v.as_bool().map(Scalar::Bool).ok_or_else(|| wrong("true or false")),
        Kind::Timestamp | Kind::Date => {
            let s = v.as_str().ok_or_else(|| wrong("a date (2026-06-30) or a timestamp (2026-06-30T12:00:00Z)"))?;
            if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
                Ok(Scalar::Day(d))
            } else if let (Kind::Timestamp, Ok(t)) = (kind, DateTime::parse_from_rfc3339(s)) {
                Ok(Scalar::Instant(t.with_timezone(&Utc)))
            } else {
                Err(wrong("a date (2026-06-30) or a timestamp (2026-06-30T12:00:00Z)"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defs() -> Vec<CustomFieldDef> {
        vec![CustomFieldDef {
            module: "lead".into(),
            api_name: "region".into(),
            data_type: "picklist".into(),
            max_length: None,
            is_unique: false,
        }]
    }

    fn err(v: Value) -> Refusal {
        Criteria::parse(&v, &defs()).unwrap_err()
    }

    #[test]
    fn refusals_name_the_path() {
        assert_eq!(err(json!({})).field, "criteria");
        assert_eq!(err(json!({"all_leads": false})).field, "criteria.all_leads");
        assert_eq!(err(json!({"all": [{"field": "nope", "op": "eq", "value": 1}]})).field, "criteria.all[0].field");
        assert_eq!(err(json!({"any": [{"field": "city", "op": "like", "value": "x"}]})).field, "criteria.any[0].op");
        assert_eq!(err(json!({"field": "annual_revenue", "op": "gt", "value": "lots"})).field, "criteria.value");
        assert_eq!(err(json!({"field": "created_at", "op": "gt", "value": "2026-02-30"})).field, "criteria.value");
        assert_eq!(err(json!({"field": "tags", "op": "eq", "value": "x"})).field, "criteria.op");
        assert_eq!(err(json!({"field": "custom.nope", "op": "eq", "value": "x"})).field, "criteria.field");
        assert_eq!(err(json!({"ids": []})).field, "criteria.ids");
        assert_eq!(err(json!({"ids": [1, "2"]})).field, "criteria.ids[1]");
        assert_eq!(err(json!({"field": "city", "op": "between", "value": ["a"]})).field, "criteria.op");
        assert_eq!(err(json!({"field": "id", "op": "between", "value": [1]})).field, "criteria.value");
        assert_eq!(err(json!({"field": "city", "op": "eq", "value": "x", "extra": 1})).field, "criteria");
        assert!(err(json!({"all": []})).message.contains("empty"));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut v = json!({"field": "city", "op": "eq", "value": "x"});
        for _ in 0..40 {
            v = json!({"all": [v]});
        }
        assert!(err(v).message.contains("deeper"));
    }
}
