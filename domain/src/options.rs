//! Conversion options (SPEC §6) and their validation into [`Settings`].
//!
//! Everything that can be known before the first lead is checked here, when
//! the job is created, against [`OptionFacts`] the caller read: the acting user's rights, the owner override, the
//! deal's mandatory fields, its template, date, pipeline and stage. A job
//! that passes cannot fail a lead for one of these reasons later.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::deal::{ClosingDate, NameTemplate, DEFAULT_NAME};
use crate::error::{ErrorCode, Refusal};
use crate::mapping::FieldMapping;
use crate::record::Module;

/// The options as written by callers. Unknown keys are refused: a typo such
/// as `create_deals` must not silently convert without deals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversionOptions {
    #[serde(default)]
    pub create_deal: bool,
    #[serde(default)]
    pub deal: Option<DealOptions>,
    #[serde(default)]
    pub owner_id: Option<i64>,
    #[serde(default)]
    pub move_attachments_to: Option<Module>,
    #[serde(default)]
    pub carry_over_tags: Option<bool>,
    /// Which records a lead becomes (seed 001: a contact, an account, a
    /// deal, or any non-empty combination); both default to true.
    #[serde(default)]
    pub create_contact: Option<bool>,
    #[serde(default)]
    pub create_account: Option<bool>,
    /// A one-lead conversion (convert-now) may name the existing contact
    /// and account to convert into, instead of matching (Zoho's convert
    /// page, Salesforce's `convertLead`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<i64>,
    /// What happens to a lead custom field no mapping carries (seed 001).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmapped_custom_fields: Option<UnmappedCustomFields>,
}

/// `unmapped_custom_fields`: a lead custom field that no
/// `conversion_mappings` row carries stays on the lead (the default), or
/// gets a contact custom field of the same type and length and a mapping,
/// made once when the job is created, so its values are not left behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnmappedCustomFields {
    #[default]
    KeepOnLead,
    Create,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DealOptions {
    pub name: Option<String>,
    pub closing_date: Option<String>,
    pub stage: Option<String>,
    pub pipeline: Option<String>,
    pub amount: Option<serde_json::Number>,
    pub contact_role: Option<String>,
    pub campaign_source: Option<String>,
}

impl ConversionOptions {
    /// Reads options from JSON, naming the path of the offending key.
    pub fn from_json(v: &Value) -> Result<ConversionOptions, Refusal> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "options".to_owned() } else { path };
            Refusal::new(ErrorCode::InvalidOption, field, e.into_inner().to_string())
        })
    }
}

/// The deal part of validated options.
#[derive(Debug, Clone, PartialEq)]
pub struct DealSettings {
    pub name: NameTemplate,
    pub closing_date: ClosingDate,
    pub stage: String,
    pub pipeline: String,
    pub amount: Option<serde_json::Number>,
    pub contact_role: Option<String>,
    pub campaign_source: Option<String>,
    /// The stage counts as won: a deal the job creates then makes later
    /// leads' deals with the same contact or account repeats (seed 002).
    pub stage_is_won: bool,
}

/// Validated options plus what the engine reads once per job. Equal
/// settings convert leads alike: convert-now leads with equal settings may
/// share a transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The user who converts: the job's `requested_by`.
    pub acting_user: i64,
    pub owner_override: Option<i64>,
    pub deal: Option<DealSettings>,
    pub attachments_to: Module,
    pub carry_over_tags: bool,
    /// Whether the lead becomes a contact and an account (SPEC §4
    /// options); a deal is `deal`.
    pub create_contact: bool,
    pub create_account: bool,
    /// The existing contact and account named to convert into.
    pub into_contact: Option<i64>,
    pub into_account: Option<i64>,
    pub unmapped_custom_fields: UnmappedCustomFields,
    pub fields: FieldMapping,
}

/// What the CRM says about the users and the pipeline that options name,
/// read by the caller before [`Settings::check`] (nothing here reads it).
#[derive(Debug, Clone, Default)]
pub struct OptionFacts {
    /// The requesting user's `active` and `can_convert`; `None`: no such user.
    pub requester: Option<(bool, bool)>,
    /// The owner override's `active`; `None`: no such user (or no override).
    pub owner_active: Option<bool>,
    pub fields: FieldMapping,
    /// The stages of [`ConversionOptions::pipeline`]; `None`: no such
    /// pipeline (or no deal asked for).
    pub pipeline_stages: Option<Vec<Stage>>,
}

/// A stage of a pipeline, as `deal_stages` has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub stage: String,
    pub is_won: bool,
}

impl ConversionOptions {
    /// The pipeline whose stages [`Settings::check`] needs: the deal's, or
    /// `Standard`; `None` when no deal is asked for.
    pub fn pipeline(&self) -> Option<String> {
        match (&self.deal, self.create_deal) {
            (Some(d), true) => Some(d.pipeline.as_deref().map(str::trim).unwrap_or("Standard").to_owned()),
            _ => None,
        }
    }
}

/// What the CRM holds of the records a conversion names (read by the
/// caller): for the named contact, `Some(its account)`, `None` when there
/// is no such contact; whether the named account exists.
#[derive(Debug, Clone, Copy, Default)]
pub struct NamedFacts {
    pub contact: Option<Option<i64>>,
    pub account_exists: bool,
}

impl Settings {
    /// Checks the records `self` names to convert into against `named`,
    /// before the job is created: each must exist, and a named contact
    /// that belongs to an account must belong to the named one.
    pub fn check_named(&self, named: NamedFacts) -> Result<(), Refusal> {
        if let Some(id) = self.into_contact {
            let Some(account) = named.contact else {
                return Err(Refusal::new(ErrorCode::RecordNotFound, "contact_id", format!("no contact {id}")));
            };
            if let (Some(in_account), Some(named_account)) = (account, self.into_account) {
                if in_account != named_account {
                    return Err(Refusal::new(
                        ErrorCode::ContactInOtherAccount,
                        "contact_id",
                        format!(
                            "contact {id} belongs to account {in_account}, not to account {named_account}: name \
                             its own account, or another contact"
                        ),
                    ));
                }
            }
        }
        if let (Some(id), false) = (self.into_account, named.account_exists) {
            return Err(Refusal::new(ErrorCode::RecordNotFound, "account_id", format!("no account {id}")));
        }
        Ok(())
    }

    /// The contact custom fields and mappings this job makes when it is
    /// created (`unmapped_custom_fields: "create"`; none otherwise). It
    /// changes the CRM's schema, so only an admin's job may ask for it.
    pub fn custom_fields_to_create(
        &self,
        requester_is_admin: bool,
    ) -> Result<Vec<crate::mapping::NewContactField>, Refusal> {
        if self.unmapped_custom_fields != UnmappedCustomFields::Create {
            return Ok(Vec::new());
        }
        if !requester_is_admin {
            return Err(Refusal::new(
                ErrorCode::AdminOnly,
                "unmapped_custom_fields",
                format!(
                    "\"create\" adds custom fields to the CRM's contacts, which only an admin may; user {} is not \
                     one: ask an admin, or leave unmapped_custom_fields at \"keep_on_lead\"",
                    self.acting_user
                ),
            ));
        }
        self.fields.contact_fields_to_create()
    }

    /// Checks `options` for a job requested by `requested_by`, against what
    /// the CRM says (`facts`). The first problem found is the refusal.
    pub fn check(options: &ConversionOptions, requested_by: i64, facts: OptionFacts) -> Result<Settings, Refusal> {
        match facts.requester {
            None => {
                return Err(Refusal::new(
                    ErrorCode::RequesterNotFound,
                    "requested_by",
                    format!("user {requested_by} does not exist"),
                ))
            }
            Some((false, _)) => {
                return Err(Refusal::new(
                    ErrorCode::RequesterCannotConvert,
                    "requested_by",
                    format!("user {requested_by} is inactive"),
                ))
            }
            Some((true, false)) => {
                return Err(Refusal::new(
                    ErrorCode::RequesterCannotConvert,
                    "requested_by",
                    format!("user {requested_by} lacks the permission to convert leads (can_convert)"),
                ))
            }
            Some((true, true)) => {}
        }

        if let Some(owner) = options.owner_id {
            match facts.owner_active {
                None => {
                    return Err(Refusal::new(
                        ErrorCode::OwnerNotFound,
                        "owner_id",
                        format!("user {owner} does not exist"),
                    ))
                }
                Some(false) => {
                    return Err(Refusal::new(ErrorCode::OwnerInactive, "owner_id", format!("user {owner} is inactive")))
                }
                Some(true) => {}
            }
        }

        let fields = facts.fields;
        let deal = match (&options.deal, options.create_deal) {
            (Some(d), true) => Some(Self::check_deal(d, &fields, facts.pipeline_stages)?),
            (None, true) => {
                return Err(Refusal::new(
                    ErrorCode::MissingMandatoryField,
                    "deal",
                    "create_deal is true: deal.closing_date and deal.stage are required",
                ))
            }
            (_, false) => None,
        };

        let (create_contact, create_account) =
            (options.create_contact.unwrap_or(true), options.create_account.unwrap_or(true));
        if !create_contact && !create_account && deal.is_none() {
            return Err(Refusal::new(
                ErrorCode::InvalidOption,
                "options",
                "create_contact, create_account and create_deal are all false: a conversion makes at least one \
                 of a contact, an account or a deal; set one of them to true",
            ));
        }
        for (named, made, field, option) in [
            (options.contact_id, create_contact, "contact_id", "create_contact"),
            (options.account_id, create_account, "account_id", "create_account"),
        ] {
            if let (Some(id), false) = (named, made) {
                return Err(Refusal::new(
                    ErrorCode::InvalidOption,
                    field,
                    format!("{field} {id} names a record to convert into, and {option} is false: drop one of them"),
                ));
            }
        }
        let unmapped_custom_fields = options.unmapped_custom_fields.unwrap_or_default();
        if unmapped_custom_fields == UnmappedCustomFields::Create && !create_contact {
            return Err(Refusal::new(
                ErrorCode::InvalidOption,
                "unmapped_custom_fields",
                "\"create\" makes contact custom fields, and create_contact is false: set create_contact to true \
                 or unmapped_custom_fields to \"keep_on_lead\"",
            ));
        }
        let attachments_to = options.move_attachments_to.unwrap_or(Module::Contact);
        let not_made = |what: &str, option: &str| {
            Err(Refusal::new(
                ErrorCode::InvalidOption,
                "move_attachments_to",
                format!("attachments cannot move to the {what}: {option} is false; name a record the job makes"),
            ))
        };
        match attachments_to {
            Module::Contact if options.move_attachments_to.is_some() && !create_contact => {
                return not_made("contact", "create_contact")
            }
            Module::Account if !create_account => return not_made("account", "create_account"),
            Module::Lead => {
                return Err(Refusal::new(
                    ErrorCode::InvalidOption,
                    "move_attachments_to",
                    "must be one of contact, account, deal",
                ))
            }
            Module::Deal if deal.is_none() => {
                return Err(Refusal::new(
                    ErrorCode::AttachmentsNeedDeal,
                    "move_attachments_to",
                    "attachments can move to the deal only when create_deal is true",
                ))
            }
            _ => {}
        }

        Ok(Settings {
            acting_user: requested_by,
            owner_override: options.owner_id,
            deal,
            attachments_to,
            carry_over_tags: options.carry_over_tags.unwrap_or(true),
            create_contact,
            create_account,
            into_contact: options.contact_id,
            into_account: options.account_id,
            unmapped_custom_fields,
            fields,
        })
    }

    fn check_deal(
        d: &DealOptions,
        fields: &FieldMapping,
        pipeline_stages: Option<Vec<Stage>>,
    ) -> Result<DealSettings, Refusal> {
        let required = |v: &Option<String>, field: &str| -> Result<String, Refusal> {
            match v.as_deref().map(str::trim) {
                Some(s) if !s.is_empty() => Ok(s.to_owned()),
                _ => Err(Refusal::new(
                    ErrorCode::MissingMandatoryField,
                    format!("deal.{field}"),
                    format!("deal.{field} is mandatory when create_deal is true"),
                )),
            }
        };
        let closing_date = ClosingDate::parse(&required(&d.closing_date, "closing_date")?)?;
        let stage = required(&d.stage, "stage")?;
        let name = NameTemplate::parse(d.name.as_deref().unwrap_or(DEFAULT_NAME), fields)?;
        let pipeline = d.pipeline.as_deref().map(str::trim).unwrap_or("Standard").to_owned();
        if let Some(amount) = &d.amount {
            if amount.as_f64().is_none_or(|a| a < 0.0 || !a.is_finite()) {
                return Err(Refusal::new(
                    ErrorCode::InvalidOption,
                    "deal.amount",
                    format!("{amount} is not a non-negative amount"),
                ));
            }
        }
        let Some(stages) = pipeline_stages else {
            return Err(Refusal::new(
                ErrorCode::UnknownPipeline,
                "deal.pipeline",
                format!("pipeline {pipeline:?} does not exist"),
            ));
        };
        let Some(stage_is_won) = stages.iter().find(|s| s.stage == stage).map(|s| s.is_won) else {
            let names: Vec<&str> = stages.iter().map(|s| s.stage.as_str()).collect();
            return Err(Refusal::new(
                ErrorCode::StageNotInPipeline,
                "deal.stage",
                format!("stage {stage:?} is not in pipeline {pipeline:?} (stages: {})", names.join(", ")),
            ));
        };
        Ok(DealSettings {
            name,
            closing_date,
            stage,
            pipeline,
            amount: d.amount.clone(),
            contact_role: d.contact_role.clone().filter(|s| !s.trim().is_empty()),
            campaign_source: d.campaign_source.clone().filter(|s| !s.trim().is_empty()),
            stage_is_won,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(contact: Option<i64>, account: Option<i64>) -> Settings {
        let options = ConversionOptions { contact_id: contact, account_id: account, ..Default::default() };
        let facts = OptionFacts { requester: Some((true, true)), ..Default::default() };
        Settings::check(&options, 1, facts).expect("valid options")
    }

    #[test]
    fn named_records_must_exist_and_a_named_contact_sit_in_the_named_account() {
        let named = |contact, account_exists| NamedFacts { contact, account_exists };
        let code = |r: Result<(), Refusal>| r.map_err(|e| (e.code, e.field));
        assert_eq!(code(settings(Some(5), Some(9)).check_named(named(Some(Some(9)), true))), Ok(()));
        assert_eq!(code(settings(Some(5), Some(9)).check_named(named(Some(None), true))), Ok(()), "linked later");
        assert_eq!(
            code(settings(Some(5), Some(9)).check_named(named(Some(Some(8)), true))),
            Err((ErrorCode::ContactInOtherAccount, "contact_id".into()))
        );
        assert_eq!(
            code(settings(Some(5), None).check_named(named(None, false))),
            Err((ErrorCode::RecordNotFound, "contact_id".into()))
        );
        assert_eq!(
            code(settings(None, Some(9)).check_named(named(None, false))),
            Err((ErrorCode::RecordNotFound, "account_id".into()))
        );
    }

    #[test]
    fn a_named_record_the_job_does_not_make_is_refused() {
        let facts = || OptionFacts { requester: Some((true, true)), ..Default::default() };
        let options = ConversionOptions {
            contact_id: Some(5),
            create_contact: Some(false),
            create_account: Some(true),
            ..Default::default()
        };
        let r = Settings::check(&options, 1, facts()).unwrap_err();
        assert_eq!((r.code, r.field.as_str()), (ErrorCode::InvalidOption, "contact_id"));
        let options = ConversionOptions { account_id: Some(9), create_account: Some(false), ..Default::default() };
        let r = Settings::check(&options, 1, facts()).unwrap_err();
        assert_eq!((r.code, r.field.as_str()), (ErrorCode::InvalidOption, "account_id"));
        let none = ConversionOptions { create_contact: Some(false), create_account: Some(false), ..Default::default() };
        assert_eq!(Settings::check(&none, 1, facts()).unwrap_err().field, "options");
    }
}
