//! Compiling checked criteria (parsed by [`leadconv_domain::criteria`]) into
//! parameterised SQL over `leads l`. Every value is bound; field names come
//! only from the domain's catalogue, custom field names are bound too.

use chrono::NaiveDate;
use sqlx::{Postgres, QueryBuilder};

pub use leadconv_domain::criteria::*;

/// Appends the SQL condition over `leads l` (without the
/// "not converted" part, which the caller always adds).
pub fn push_sql(criteria: &Criteria, qb: &mut QueryBuilder<'_, Postgres>) {
    match criteria {
        Criteria::AllLeads => {
            qb.push("TRUE");
        }
        Criteria::Ids(ids) => {
            qb.push("l.id = ANY(").push_bind(ids.clone()).push(")");
        }
        Criteria::Filter(Filter(n)) => push_node(qb, n),
    }
}

fn push_node(qb: &mut QueryBuilder<'_, Postgres>, n: &Node) {
    match n {
        Node::All(items) | Node::Any(items) => {
            let joiner = if matches!(n, Node::All(_)) { " AND " } else { " OR " };
            qb.push("(");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    qb.push(joiner);
                }
                push_node(qb, item);
            }
            qb.push(")");
        }
        Node::Condition(c) => push_condition(qb, c),
    }
}

/// The column expression, typed so comparisons use the right semantics.
fn push_column(qb: &mut QueryBuilder<'_, Postgres>, c: &Condition) {
    match &c.column {
        Column::Standard(name) => {
            qb.push("l.").push(*name);
        }
        Column::Custom(api) => {
            let (open, close) = match c.kind {
                Kind::Number => ("leadconv_try_numeric(l.custom_fields->>", ")"),
                Kind::Date => ("leadconv_try_date(l.custom_fields->>", ")"),
                Kind::Bool => ("leadconv_try_bool(l.custom_fields->>", ")"),
                _ => ("(l.custom_fields->>", ")"),
            };
            qb.push(open).push_bind(api.clone()).push("::text").push(close);
        }
    }
}

fn push_value(qb: &mut QueryBuilder<'_, Postgres>, v: &Scalar) {
    match v {
        Scalar::Text(s) => qb.push_bind(s.clone()).push("::text"),
        Scalar::Number(n) => qb.push_bind(n.clone()).push("::numeric"),
        Scalar::Integer(i) => qb.push_bind(*i).push("::bigint"),
        Scalar::Bool(b) => qb.push_bind(*b).push("::boolean"),
        Scalar::Day(d) => qb.push_bind(*d).push("::date"),
        Scalar::Instant(t) => qb.push_bind(*t).push("::timestamptz"),
    };
}

/// The values of an `in` list as typed arrays, one per kind present (a
/// numeric field's list may mix integers and decimals).
enum Values {
    Text(Vec<String>),
    Number(Vec<String>),
    Integer(Vec<i64>),
    Bool(Vec<bool>),
    Day(Vec<NaiveDate>),
    Instant(Vec<chrono::DateTime<chrono::Utc>>),
}

fn list_by_kind(values: &[Scalar]) -> Vec<Values> {
    let (mut text, mut number, mut integer, mut boolean, mut day, mut instant) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for v in values {
        match v {
            Scalar::Text(s) => text.push(s.clone()),
            Scalar::Number(n) => number.push(n.clone()),
            Scalar::Integer(i) => integer.push(*i),
            Scalar::Bool(b) => boolean.push(*b),
            Scalar::Day(d) => day.push(*d),
            Scalar::Instant(t) => instant.push(*t),
        }
    }
    let mut out = Vec::new();
    if !text.is_empty() {
        out.push(Values::Text(text));
    }
    if !number.is_empty() {
        out.push(Values::Number(number));
    }
    if !integer.is_empty() {
        out.push(Values::Integer(integer));
    }
    if !boolean.is_empty() {
        out.push(Values::Bool(boolean));
    }
    if !day.is_empty() {
        out.push(Values::Day(day));
    }
    if !instant.is_empty() {
        out.push(Values::Instant(instant));
    }
    out
}

fn push_array(qb: &mut QueryBuilder<'_, Postgres>, values: Values) {
    match values {
        Values::Text(v) => qb.push_bind(v).push("::text[]"),
        Values::Number(v) => qb.push_bind(v).push("::numeric[]"),
        Values::Integer(v) => qb.push_bind(v).push("::bigint[]"),
        Values::Bool(v) => qb.push_bind(v).push("::boolean[]"),
        Values::Day(v) => qb.push_bind(v).push("::date[]"),
        Values::Instant(v) => qb.push_bind(v).push("::timestamptz[]"),
    };
}

/// For timestamps, a day value means the whole day (UTC): `eq 2026-06-30`
/// matches any time that day, `between [a, b]` includes all of day b.
fn day_start(qb: &mut QueryBuilder<'_, Postgres>, d: &NaiveDate, next: bool) {
    let d = if next { d.succ_opt().unwrap_or(*d) } else { *d };
    qb.push("(").push_bind(d).push("::date::timestamp AT TIME ZONE 'UTC')");
}

fn push_condition(qb: &mut QueryBuilder<'_, Postgres>, c: &Condition) {
    let whole_day = |v: &Scalar| match (c.kind, v) {
        (Kind::Timestamp, Scalar::Day(d)) => Some(*d),
        _ => None,
    };
    qb.push("(");
    match c.op {
        Op::IsNull => {
            if c.kind == Kind::Tags {
                qb.push(if c.null { "cardinality(l.tags) = 0" } else { "cardinality(l.tags) > 0" });
            } else {
                if c.kind == Kind::Text {
                    qb.push("NULLIF(btrim(");
                    push_column(qb, c);
                    qb.push("), '')");
                } else {
                    push_column(qb, c);
                }
                qb.push(if c.null { " IS NULL" } else { " IS NOT NULL" });
            }
        }
        Op::Contains if c.kind == Kind::Tags => {
            qb.push("l.tags @> ARRAY[");
            push_value(qb, &c.values[0]);
            qb.push("]");
        }
        Op::Contains => {
            // Case-insensitive substring; the pattern's own % and _ are
            // escaped so they match literally.
            let Scalar::Text(s) = &c.values[0] else { unreachable!("text checked at parse") };
            let escaped = s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
            push_column(qb, c);
            qb.push(" ILIKE ").push_bind(format!("%{escaped}%"));
        }
        Op::Eq | Op::Ne => {
            let negate = c.op == Op::Ne;
            if let Some(d) = whole_day(&c.values[0]) {
                if negate {
                    qb.push("NOT COALESCE(");
                }
                push_column(qb, c);
                qb.push(" >= ");
                day_start(qb, &d, false);
                qb.push(" AND ");
                push_column(qb, c);
                qb.push(" < ");
                day_start(qb, &d, true);
                if negate {
                    qb.push(", false)");
                }
            } else {
                push_column(qb, c);
                // `ne` keeps leads where the field is empty: "not Webinar"
                // includes leads with no source.
                qb.push(if negate { " IS DISTINCT FROM " } else { " = " });
                push_value(qb, &c.values[0]);
            }
        }
        Op::In | Op::NotIn => {
            if c.op == Op::NotIn {
                push_column(qb, c);
                qb.push(" IS NULL OR NOT ");
            }
            // One array parameter per kind of value, not one parameter per
            // value: Postgres takes at most 65,535 parameters a statement,
            // and a list may hold 100,000 values.
            qb.push("(");
            for (i, values) in list_by_kind(&c.values).into_iter().enumerate() {
                if i > 0 {
                    qb.push(" OR ");
                }
                push_column(qb, c);
                qb.push(" = ANY(");
                push_array(qb, values);
                qb.push(")");
            }
            qb.push(")");
        }
        Op::Gt | Op::Lt => {
            push_column(qb, c);
            match (c.op, whole_day(&c.values[0])) {
                // After a day: from the next day on. Before a day: before it starts.
                (Op::Gt, Some(d)) => {
                    qb.push(" >= ");
                    day_start(qb, &d, true);
                }
                (Op::Lt, Some(d)) => {
                    qb.push(" < ");
                    day_start(qb, &d, false);
                }
                (op, None) => {
                    qb.push(if op == Op::Gt { " > " } else { " < " });
                    push_value(qb, &c.values[0]);
                }
                _ => unreachable!(),
            }
        }
        Op::Between => {
            push_column(qb, c);
            qb.push(" >= ");
            match whole_day(&c.values[0]) {
                Some(d) => day_start(qb, &d, false),
                None => push_value(qb, &c.values[0]),
            }
            qb.push(" AND ");
            push_column(qb, c);
            match whole_day(&c.values[1]) {
                Some(d) => {
                    qb.push(" < ");
                    day_start(qb, &d, true);
                }
                None => {
                    qb.push(" <= ");
                    push_value(qb, &c.values[1]);
                }
            }
        }
    }
    qb.push(")");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::mapping::CustomFieldDef;
    use serde_json::json;

    // The SPEC §6 example parses (domain) and compiles with every value and
    // custom field name bound, none spliced into the SQL.
    #[test]
    fn values_are_bound_never_spliced() {
        let defs = vec![CustomFieldDef {
            module: "lead".into(),
            api_name: "region".into(),
            data_type: "picklist".into(),
            max_length: None,
            is_unique: false,
        }];
        let c = json!({"all": [
            {"field": "lead_status", "op": "in", "value": ["Qualified", "Contacted"]},
            {"any": [{"field": "lead_source", "op": "eq", "value": "Webinar"},
                     {"field": "tags", "op": "contains", "value": "expo-2026"}]},
            {"field": "created_at", "op": "between", "value": ["2026-01-01", "2026-06-30"]},
            {"field": "custom.region", "op": "eq", "value": "EMEA"}]});
        let parsed = Criteria::parse(&c, &defs).unwrap();
        let mut qb = QueryBuilder::new("");
        push_sql(&parsed, &mut qb);
        let sql = qb.into_sql();
        assert!(
            !sql.contains("Webinar") && !sql.contains("EMEA") && !sql.contains("region"),
            "values are bound: {sql}"
        );
    }
}
