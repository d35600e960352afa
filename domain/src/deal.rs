//! The deal created with a conversion: its name template and closing date.
//!
//! Both are checked when a job is created (an unknown placeholder or an
//! unreadable date refuses the job) so that no lead ever fails for a reason
//! that was visible up front.

use chrono::{Days, Months, NaiveDate};
use serde_json::Value;

use crate::error::{ErrorCode, Refusal};
use crate::mapping::FieldMapping;
use crate::record::{self, Record};

/// Lead fields a deal name may use, besides `full_name` and `custom.<api_name>`.
pub const NAME_FIELDS: &[&str] = &[
    "salutation",
    "first_name",
    "last_name",
    "company",
    "title",
    "email",
    "phone",
    "mobile",
    "fax",
    "skype_id",
    "website",
    "lead_source",
    "industry",
    "annual_revenue",
    "no_of_employees",
    "rating",
    "street",
    "city",
    "state",
    "zip_code",
    "country",
    "lead_status",
    "description",
];

pub const DEFAULT_NAME: &str = "{{company}}";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(String),
    FullName,
    Custom(String),
}

/// A parsed deal name template such as `{{company}} – {{last_name}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTemplate {
    source: String,
    pieces: Vec<Piece>,
}

impl NameTemplate {
    /// Parses `source`, refusing unknown placeholders. `custom.<api_name>`
    /// must name a lead custom field that exists.
    pub fn parse(source: &str, fields: &FieldMapping) -> Result<NameTemplate, Refusal> {
        let refuse = |code, msg: String| Refusal::new(code, "deal.name", msg);
        let mut pieces = Vec::new();
        let mut rest = source;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| refuse(ErrorCode::InvalidOption, format!("unclosed placeholder in {source:?}")))?;
            let name = after[..end].trim();
            let piece = if name == "full_name" {
                Piece::FullName
            } else if let Some(api) = name.strip_prefix("custom.") {
                if !fields.has_lead_field(api) {
                    return Err(refuse(
                        ErrorCode::UnknownPlaceholder,
                        format!("{{{{{name}}}}}: no lead custom field {api:?} exists"),
                    ));
                }
                Piece::Custom(api.to_owned())
            } else if NAME_FIELDS.contains(&name) {
                Piece::Field(name.to_owned())
            } else {
                return Err(refuse(
                    ErrorCode::UnknownPlaceholder,
                    format!(
                        "{{{{{name}}}}} is not a lead field (use full_name, custom.<api_name> or one of: {})",
                        NAME_FIELDS.join(", ")
                    ),
                ));
            };
            pieces.push(piece);
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        if pieces.is_empty() {
            return Err(refuse(ErrorCode::MissingMandatoryField, "the deal name template is empty".into()));
        }
        Ok(NameTemplate { source: source.to_owned(), pieces })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The deal name for `lead`. When the template yields nothing (say, the
    /// default `{{company}}` on a lead without company) the lead's full name
    /// stands in, so that a deal always has a name.
    pub fn render(&self, lead: &Record) -> String {
        let mut out = String::new();
        let custom = record::custom_fields(lead);
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(f) => out.push_str(&display(lead.get(f))),
                Piece::FullName => out.push_str(&record::full_name(lead)),
                Piece::Custom(api) => out.push_str(&display(custom.get(api))),
            }
        }
        let name = out.split_whitespace().collect::<Vec<_>>().join(" ");
        if has_letters_or_digits(&name) {
            name
        } else {
            record::full_name(lead)
        }
    }
}

fn has_letters_or_digits(s: &str) -> bool {
    s.chars().any(char::is_alphanumeric)
}

fn display(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.trim().to_owned(),
        Some(other) => other.to_string(),
    }
}

/// A closing date: fixed, or relative to the day of conversion so that a
/// job scheduled every night keeps producing dates in the future.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosingDate {
    On(NaiveDate),
    DaysAfter(u32),
    WeeksAfter(u32),
    MonthsAfter(u32),
}

impl ClosingDate {
    pub fn parse(s: &str) -> Result<ClosingDate, Refusal> {
        let s = s.trim();
        let refuse = || {
            Refusal::new(
                ErrorCode::InvalidClosingDate,
                "deal.closing_date",
                format!("{s:?} is neither an ISO date (2026-12-31) nor a relative date (+30d, +2w, +1m)"),
            )
        };
        if let Some(rel) = s.strip_prefix('+') {
            let unit = rel.chars().last().ok_or_else(refuse)?;
            let n: u32 = rel[..rel.len() - unit.len_utf8()].parse().map_err(|_| refuse())?;
            if n > 3650 {
                return Err(refuse());
            }
            return match unit {
                'd' => Ok(ClosingDate::DaysAfter(n)),
                'w' => Ok(ClosingDate::WeeksAfter(n)),
                'm' => Ok(ClosingDate::MonthsAfter(n)),
                _ => Err(refuse()),
            };
        }
        NaiveDate::parse_from_str(s, "%Y-%m-%d").map(ClosingDate::On).map_err(|_| refuse())
    }

    /// The date for a conversion on `today`. `+1m` on 31 January is the last
    /// day of February, as a calendar would have it.
    pub fn resolve(self, today: NaiveDate) -> NaiveDate {
        let far = NaiveDate::MAX;
        match self {
            ClosingDate::On(d) => d,
            ClosingDate::DaysAfter(n) => today.checked_add_days(Days::new(n.into())).unwrap_or(far),
            ClosingDate::WeeksAfter(n) => today.checked_add_days(Days::new(u64::from(n) * 7)).unwrap_or(far),
            ClosingDate::MonthsAfter(n) => today.checked_add_months(Months::new(n)).unwrap_or(far),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lead(v: Value) -> Record {
        v.as_object().unwrap().clone()
    }

    fn fields_with_region() -> FieldMapping {
        FieldMapping {
            custom: vec![],
            defs: vec![crate::mapping::CustomFieldDef {
                module: "lead".into(),
                api_name: "region".into(),
                data_type: "text".into(),
                max_length: None,
                is_unique: false,
            }],
        }
    }

    #[test]
    fn renders_fields_full_name_and_custom() {
        let t = NameTemplate::parse(
            "{{company}} – {{last_name}} / {{full_name}} / {{custom.region}}",
            &fields_with_region(),
        )
        .unwrap();
        let l = lead(
            json!({"company": "Acme", "first_name": "Anna", "last_name": "Nowak", "custom_fields": {"region": "EMEA"}}),
        );
        assert_eq!(t.render(&l), "Acme – Nowak / Anna Nowak / EMEA");
    }

    #[test]
    fn falls_back_to_full_name_when_company_is_empty() {
        let t = NameTemplate::parse(DEFAULT_NAME, &FieldMapping::default()).unwrap();
        let l = lead(json!({"company": "  ", "first_name": "Nguyễn", "last_name": "Văn An"}));
        assert_eq!(t.render(&l), "Nguyễn Văn An");
    }

    #[test]
    fn refuses_unknown_placeholders() {
        let e = NameTemplate::parse("{{compnay}}", &FieldMapping::default()).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownPlaceholder);
        assert_eq!(e.field, "deal.name");
        let e = NameTemplate::parse("{{custom.nope}}", &fields_with_region()).unwrap_err();
        assert_eq!(e.code, ErrorCode::UnknownPlaceholder);
        assert!(NameTemplate::parse("{{company", &FieldMapping::default()).is_err());
    }

    #[test]
    fn closing_dates() {
        let today = NaiveDate::from_ymd_opt(2026, 1, 31).unwrap();
        let at = |s: &str| ClosingDate::parse(s).unwrap().resolve(today).to_string();
        assert_eq!(at("+30d"), "2026-03-02");
        assert_eq!(at("+2w"), "2026-02-14");
        assert_eq!(at("+1m"), "2026-02-28");
        assert_eq!(at("2026-12-31"), "2026-12-31");
        for bad in ["", "+", "+3y", "30d", "2026-13-01", "+-1d", "tomorrow"] {
            assert_eq!(ClosingDate::parse(bad).unwrap_err().code, ErrorCode::InvalidClosingDate, "{bad}");
        }
    }
}
