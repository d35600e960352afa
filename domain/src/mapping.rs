//! Which lead field lands in which account, contact and deal field.
//!
//! The standard mapping is SPEC §3.10's table, as data. Custom fields follow
//! `conversion_mappings`; their validity (same data type, text only into text
//! at least as long) is enforced by a trigger when a mapping is saved, so no
//! writer can store one that would corrupt data at conversion time (see
//! `leadconv::mapping::save`).

use crate::record::{self, Module, Record};
use serde_json::{Map, Value};

/// One row of the standard mapping table.
pub struct StandardField {
    pub lead: &'static str,
    pub account: Option<&'static str>,
    pub contact: Option<&'static str>,
    pub deal: Option<&'static str>,
}

const fn row(
    lead: &'static str,
    account: Option<&'static str>,
    contact: Option<&'static str>,
    deal: Option<&'static str>,
) -> StandardField {
    StandardField { lead, account, contact, deal }
}

/// SPEC §3.10. The owner row is not here: owners follow the owner rule
/// (override or the lead's owner), not a copy.
pub const STANDARD: &[StandardField] = &[
    row("salutation", None, Some("salutation"), None),
    row("first_name", None, Some("first_name"), None),
    row("last_name", None, Some("last_name"), None),
    row("title", None, Some("title"), None),
    row("email", None, Some("email"), None),
    row("mobile", None, Some("mobile"), None),
    row("skype_id", None, Some("skype_id"), None),
    row("email_opt_out", None, Some("email_opt_out"), None),
    row("company", Some("account_name"), None, None),
    row("lead_source", None, Some("lead_source"), Some("lead_source")),
    row("industry", Some("industry"), None, None),
    row("annual_revenue", Some("annual_revenue"), None, None),
    row("no_of_employees", Some("no_of_employees"), None, None),
    row("website", Some("website"), None, None),
    row("phone", Some("phone"), Some("phone"), None),
    row("fax", Some("fax"), Some("fax"), None),
    row("street", Some("street"), Some("street"), None),
    row("city", Some("city"), Some("city"), None),
    row("state", Some("state"), Some("state"), None),
    row("zip_code", Some("zip_code"), Some("zip_code"), None),
    row("country", Some("country"), Some("country"), None),
    row("rating", None, None, Some("rating")),
];

impl StandardField {
    fn target(&self, module: Module) -> Option<&'static str> {
        match module {
            Module::Account => self.account,
            Module::Contact => self.contact,
            Module::Deal => self.deal,
            Module::Lead => Some(self.lead),
        }
    }
}

/// A custom field definition (`custom_field_defs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomFieldDef {
    pub module: String,
    pub api_name: String,
    pub data_type: String,
    pub max_length: Option<i32>,
    pub is_unique: bool,
}

/// A saved `conversion_mappings` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomMapping {
    pub lead_field: String,
    pub target_module: String,
    pub target_field: String,
}

/// Everything about fields that a conversion needs, read once per job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldMapping {
    pub custom: Vec<CustomMapping>,
    pub defs: Vec<CustomFieldDef>,
}

/// A contact custom field (and its mapping) that
/// [`FieldMapping::contact_fields_to_create`] makes for an unmapped lead
/// field; `exists`: the contact field is there already, only the mapping
/// is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewContactField {
    pub api_name: String,
    pub data_type: String,
    pub max_length: Option<i32>,
    pub exists: bool,
}

fn length(l: Option<i32>) -> String {
    l.map(|l| format!(" {l}")).unwrap_or_default()
}

/// A unique target field with the lead field that feeds it: how the unique
/// field matching rule (SPEC §3.3.1) finds an existing record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueKey {
    pub lead_field: String,
    pub target_field: String,
}

impl FieldMapping {
    pub fn has_lead_field(&self, api_name: &str) -> bool {
        self.defs.iter().any(|d| d.module == "lead" && d.api_name == api_name)
    }

    /// The unique custom fields of `module` that some lead field maps into,
    /// in a stable order so that the first hit is always the same one.
    pub fn unique_keys(&self, module: Module) -> Vec<UniqueKey> {
        self.custom
            .iter()
            .filter(|m| m.target_module == module.as_str())
            .filter(|m| {
                self.defs.iter().any(|d| d.module == m.target_module && d.api_name == m.target_field && d.is_unique)
            })
            .map(|m| UniqueKey { lead_field: m.lead_field.clone(), target_field: m.target_field.clone() })
            .collect()
    }

    /// The lead custom fields that no `conversion_mappings` row carries:
    /// their values stay on the lead (what `unmapped_custom_fields` is
    /// about; a dry run lists them).
    pub fn unmapped_lead_fields(&self) -> Vec<&CustomFieldDef> {
        self.defs
            .iter()
            .filter(|d| d.module == "lead" && !self.custom.iter().any(|m| m.lead_field == d.api_name))
            .collect()
    }

    /// What `unmapped_custom_fields: "create"` makes (seed 001): for each
    /// unmapped lead field, a contact custom field of the same name, data
    /// type and length (not unique), and a mapping into it. A contact field
    /// of that name that exists is mapped into when a mapping may join them
    /// (same type; text into text as long or longer), else the job is
    /// refused, naming the field.
    pub fn contact_fields_to_create(&self) -> Result<Vec<NewContactField>, crate::error::Refusal> {
        let mut out = Vec::new();
        for lead in self.unmapped_lead_fields() {
            let existing = self.defs.iter().find(|d| d.module == "contact" && d.api_name == lead.api_name);
            if let Some(c) = existing {
                let fits = c.data_type == lead.data_type
                    && (c.data_type != "text"
                        || match (lead.max_length, c.max_length) {
                            (_, None) => true,
                            (Some(l), Some(c)) => c >= l,
                            (None, Some(_)) => false,
                        });
                if !fits {
                    return Err(crate::error::Refusal::new(
                        crate::error::ErrorCode::InvalidMapping,
                        "unmapped_custom_fields",
                        format!(
                            "lead field {name} ({}{}) cannot be carried into the contact field {name} that exists \
                             ({}{}): map it by hand, or rename one of them",
                            lead.data_type,
                            length(lead.max_length),
                            c.data_type,
                            length(c.max_length),
                            name = lead.api_name,
                        ),
                    ));
                }
            }
            out.push(NewContactField {
                api_name: lead.api_name.clone(),
                data_type: lead.data_type.clone(),
                max_length: lead.max_length,
                exists: existing.is_some(),
            });
        }
        Ok(out)
    }

    /// The values a lead gives a new record of `module`: standard fields by
    /// the table, custom fields by `conversion_mappings`. Empty values are
    /// left out so that they never count as "something to fill"; text is
    /// trimmed of white space (SPEC §3: values written to new records are
    /// trimmed), so " 北京科技有限公司 " names its account "北京科技有限公司".
    pub fn values_for(&self, lead: &Record, module: Module) -> Record {
        let mut out = Record::new();
        for f in STANDARD {
            if let Some(target) = f.target(module) {
                let v = lead.get(f.lead);
                if let Some(v) = v.filter(|v| !record::is_empty(Some(v))) {
                    out.insert(target.to_owned(), record::trimmed(v));
                }
            }
        }
        let lead_custom = record::custom_fields(lead);
        let mut custom = Map::new();
        for m in self.custom.iter().filter(|m| m.target_module == module.as_str()) {
            let v = lead_custom.get(&m.lead_field);
            if let Some(v) = v.filter(|v| !record::is_empty(Some(v))) {
                custom.insert(m.target_field.clone(), record::trimmed(v));
            }
        }
        if !custom.is_empty() {
            out.insert("custom_fields".into(), Value::Object(custom));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(module: &str, api_name: &str, data_type: &str, max_length: Option<i32>) -> CustomFieldDef {
        CustomFieldDef {
            module: module.into(),
            api_name: api_name.into(),
            data_type: data_type.into(),
            max_length,
            is_unique: false,
        }
    }

    #[test]
    fn unmapped_lead_fields_get_a_contact_field_of_their_type_or_refuse_a_clash() {
        let mut fields = FieldMapping {
            custom: vec![CustomMapping {
                lead_field: "region".into(),
                target_module: "account".into(),
                target_field: "region".into(),
            }],
            defs: vec![
                def("lead", "region", "text", Some(20)),
                def("lead", "budget", "number", None),
                def("lead", "note", "text", Some(80)),
                def("contact", "note", "text", Some(200)),
            ],
        };
        let names: Vec<&str> = fields.unmapped_lead_fields().iter().map(|d| d.api_name.as_str()).collect();
        assert_eq!(names, ["budget", "note"], "a mapped field is not listed");
        let made = fields.contact_fields_to_create().unwrap();
        assert_eq!(
            made[0],
            NewContactField { api_name: "budget".into(), data_type: "number".into(), max_length: None, exists: false }
        );
        assert!(made[1].exists, "a contact field of the same name and a fitting type is mapped into");

        fields.defs.push(def("contact", "budget", "text", Some(10)));
        let r = fields.contact_fields_to_create().unwrap_err();
        assert_eq!(r.field, "unmapped_custom_fields");
        assert!(r.message.contains("budget") && r.message.contains("number"), "{}", r.message);
        fields.defs.pop();
        fields.defs[3].max_length = Some(40);
        assert!(fields.contact_fields_to_create().is_err(), "text into shorter text is refused");
    }
}
