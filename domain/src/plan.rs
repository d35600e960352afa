//! What converting one lead will do, decided by the rules of SPEC §3.
//!
//! [`decide`] is plain Rust over [`Facts`] gathered beforehand (see
//! `snapshot`): it knows nothing of the database or the queue, and the same
//! plan serves the dry run (printed) and the conversion (applied by `apply`).

use std::collections::HashMap;

use chrono::NaiveDate;
use serde::Serialize;
use serde_json::{Number, Value};

use crate::error::ErrorCode;
use crate::merge::{fill_empty, union_tags};
use crate::options::Settings;
use crate::record::{self, Module, Record};

/// Everything the rules look at for one lead.
///
/// A record that an earlier lead of the same run creates (the dry run, see
/// `run`) has the id `-lead_id` of that lead: the rules treat it like any
/// other record, and [`Target`] reports it as `created_by_lead`.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub lead_id: i64,
    /// `None`: the lead was deleted since the job was created.
    pub lead: Option<Record>,
    /// The lead's e-mail, company and names, normalised by Postgres.
    pub keys: LeadKeys,
    pub acting_is_admin: bool,
    /// The first contact matched by a unique custom field: (field, contact).
    pub contact_by_unique: Option<(String, Record)>,
    /// The oldest contact with the lead's e-mail.
    pub contact_by_email: Option<Record>,
    /// For a lead without e-mail: the oldest contact of the account matched
    /// by unique field or company with the lead's first and last name.
    pub contact_by_name: Option<Record>,
    /// The first account matched by a unique custom field: (field, account).
    pub account_by_unique: Option<(String, Record)>,
    /// The oldest account named like the lead's company.
    pub account_by_company: Option<Record>,
    /// The contact and account the conversion names (`contact_id`,
    /// `account_id`), as they are; `None` when none is named or the named
    /// one no longer exists.
    pub named_contact: Option<Record>,
    pub named_account: Option<Record>,
    /// Accounts the candidate contacts belong to.
    pub contact_accounts: Vec<Record>,
    /// The keys of every contact above, by id, normalised by Postgres.
    pub contact_keys: HashMap<i64, ContactKeys>,
    /// The normalised name of every account above, by id.
    pub account_names: HashMap<i64, String>,
    /// Candidate contacts and accounts that already have a won deal.
    pub won_contacts: Vec<i64>,
    pub won_accounts: Vec<i64>,
    /// The managers above each user concerned (acting user, lead owner,
    /// owners of candidate records), nearest first.
    pub managers_above: HashMap<i64, Vec<i64>>,
}

/// A lead's matching keys: `leadconv_norm_email(email)`,
/// `leadconv_norm_company(company)`, `leadconv_norm(first_name)` and
/// `leadconv_norm(last_name)`, computed by Postgres (migration 0009).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeadKeys {
    pub email: Option<String>,
    pub company: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

/// A contact's matching keys, as [`LeadKeys`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContactKeys {
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
}

impl Facts {
    /// True when `upper` stands above `lower` in the `manager_id` hierarchy.
    pub fn is_above(&self, upper: i64, lower: i64) -> bool {
        self.managers_above.get(&lower).is_some_and(|m| m.contains(&upper))
    }

    /// Every contact the rules may pick.
    pub fn candidate_contacts(&self) -> impl Iterator<Item = &Record> {
        self.contact_by_unique
            .iter()
            .map(|(_, c)| c)
            .chain(self.contact_by_email.iter())
            .chain(self.contact_by_name.iter())
            .chain(self.named_contact.iter())
    }

    /// Every account the rules may pick.
    pub fn candidate_accounts(&self) -> impl Iterator<Item = &Record> {
        self.account_by_unique
            .iter()
            .map(|(_, a)| a)
            .chain(self.account_by_company.iter())
            .chain(self.named_account.iter())
            .chain(self.contact_accounts.iter())
    }
}

/// The lead whose conversion creates the record `id`, when it is one an
/// earlier lead of the run creates (see [`Facts`]).
pub fn created_by_lead(id: i64) -> Option<i64> {
    (id < 0).then_some(-id)
}

/// By which rule an existing record was matched (SPEC §3.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchRule {
    UniqueField(String),
    Email,
    /// A contact of the matched account with the lead's first and last name.
    Name,
    /// The matched contact's own account, which the lead's company does not
    /// name: linked, never filled.
    ContactAccount,
    Company,
    /// The record the conversion names (`contact_id`, `account_id`).
    Named,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Created,
    Merged,
    Matched,
}

/// The contact or account a lead becomes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    pub action: Action,
    /// The existing record's id; `None` for one to create, or one that an
    /// earlier lead of the run creates.
    pub id: Option<i64>,
    /// Dry run: the earlier lead of the run whose conversion creates the
    /// matched record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by_lead: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_by: Option<MatchRule>,
    /// Whether the acting user may write the matched record (SPEC §3.6).
    pub writable: bool,
    /// The lead's e-mail opt-out switched the matched contact's on (SPEC
    /// §3.4: an opt-out is never lost, even in a read-only merge).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub email_opt_out_applied: bool,
    /// For a new record, all its values; for a matched one, the empty
    /// fields to fill (nothing when it is read-only).
    pub values: Record,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DealPlan {
    pub deal_name: String,
    pub closing_date: NaiveDate,
    pub stage: String,
    pub pipeline: String,
    pub amount: Option<Number>,
    pub is_repeat: bool,
    pub is_repeat_inquiry: bool,
    /// Every column of the new deal but its account and contact links.
    pub values: Record,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conversion {
    /// `None`: the job makes no contact (`create_contact: false`).
    pub contact: Option<Target>,
    /// `None`: no company and nothing matched, or the job makes no account
    /// (`create_account: false`).
    pub account: Option<Target>,
    pub deal: Option<DealPlan>,
    /// Set the contact's account (a new contact, or a writable matched one
    /// that has none).
    pub link_contact_to_account: bool,
    pub lead_is_repeat: bool,
    pub notes_to: Module,
    pub note_copies_to: Vec<Module>,
    pub attachments_to: Module,
    pub activities_to: Module,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Verdict {
    Convert(Box<Conversion>),
    Skipped { code: ErrorCode, message: String },
    Failed { code: ErrorCode, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub lead_id: i64,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// Decides what converting the lead of `facts` does, on `today`.
pub fn decide(facts: &Facts, settings: &Settings, today: NaiveDate) -> Plan {
    let verdict = verdict(facts, settings, today);
    Plan { lead_id: facts.lead_id, verdict }
}

fn verdict(facts: &Facts, settings: &Settings, today: NaiveDate) -> Verdict {
    // 1. Guard.
    let Some(lead) = &facts.lead else {
        return Verdict::Skipped {
            code: ErrorCode::NotFound,
            message: format!("lead {} no longer exists", facts.lead_id),
        };
    };
    if !record::is_empty(lead.get("converted_at")) {
        return Verdict::Skipped {
            code: ErrorCode::AlreadyConverted,
            message: format!("lead {} was converted at {}", facts.lead_id, lead["converted_at"]),
        };
    }
    // 12. The contact's one mandatory field, checked before anything is
    // written (the database would refuse it with a message of its own).
    if settings.create_contact && record::text(lead, "last_name").is_none() {
        return Verdict::Failed {
            code: ErrorCode::MissingMandatoryField,
            message: format!(
                "lead {} has an empty last_name, which a contact needs: fill it in and convert the lead again",
                facts.lead_id
            ),
        };
    }
    let acting = settings.acting_user;

    // Records named to convert into: checked when the job was created, and
    // again here, as they are now.
    for (named, found, what) in [
        (settings.into_contact, &facts.named_contact, "contact"),
        (settings.into_account, &facts.named_account, "account"),
    ] {
        if let (Some(id), None) = (named, found) {
            return Verdict::Failed {
                code: ErrorCode::RecordNotFound,
                message: format!("{what} {id}, named to convert lead {} into, no longer exists", facts.lead_id),
            };
        }
    }

    // 7. Hierarchy block: a subordinate may not convert their superior's
    // lead into someone's existing contact (without a contact there is no
    // merge into one).
    // A named contact is the one merged into, so it is the duplicate.
    let dup = facts.named_contact.as_ref().or(facts.contact_by_email.as_ref()).filter(|_| settings.create_contact);
    if let (Some(owner), Some(dup)) = (record::id(lead, "owner_id"), dup) {
        if owner != acting && facts.is_above(owner, acting) {
            return Verdict::Failed {
                code: ErrorCode::BlockedByHierarchy,
                message: format!(
                    "lead owner {owner} is above acting user {acting} in the hierarchy and {} has the same e-mail",
                    describe_contact(dup)
                ),
            };
        }
    }

    let may_write = |r: &Record| match record::id(r, "owner_id") {
        _ if facts.acting_is_admin => true,
        None => true,
        Some(owner) => owner == acting || facts.is_above(acting, owner),
    };
    let owner = settings.owner_override.or_else(|| record::id(lead, "owner_id"));
    let lead_tags = if settings.carry_over_tags { record::tags(lead) } else { Vec::new() };
    let fields = &settings.fields;

    // 3–4. Contact: unique field, then e-mail, then (no e-mail) the name
    // within the matched account; else a new one.
    let matched_contact = if !settings.create_contact {
        None
    } else if let Some(named) = &facts.named_contact {
        Some((MatchRule::Named, named))
    } else {
        facts
            .contact_by_unique
            .as_ref()
            .map(|(f, c)| (MatchRule::UniqueField(f.clone()), c))
            .or_else(|| facts.contact_by_email.as_ref().map(|c| (MatchRule::Email, c)))
            .or_else(|| facts.contact_by_name.as_ref().map(|c| (MatchRule::Name, c)))
    };
    let contact_values = fields.values_for(lead, Module::Contact);
    let existing_contact = matched_contact.as_ref().map(|(_, c)| *c);
    let contact = match matched_contact {
        _ if !settings.create_contact => None,
        Some((rule, existing)) => {
            let mut t = merge_target(Action::Merged, rule, existing, &contact_values, &lead_tags, may_write(existing));
            // 4. An opt-out is never lost, not even in a read-only merge.
            if lead.get("email_opt_out") == Some(&Value::Bool(true))
                && existing.get("email_opt_out") != Some(&Value::Bool(true))
            {
                t.values.insert("email_opt_out".into(), true.into());
                t.email_opt_out_applied = true;
            }
            Some(t)
        }
        None => Some(create_target(contact_values, owner, &lead_tags)),
    };

    // 3, 5. Account. The matched contact's own account stands, so that a
    // contact never sits in one company while its deal points to another;
    // it is filled only when the lead names it (by unique field or company).
    // Otherwise unique field, then company; a new one only when the lead
    // names a company.
    let contact_account = existing_contact
        .and_then(|c| record::id(c, "account_id"))
        .and_then(|aid| facts.contact_accounts.iter().find(|a| record::id(a, "id") == Some(aid)));
    let same = |a: &Record, b: Option<&Record>| b.is_some_and(|b| record::id(a, "id") == record::id(b, "id"));
    let matched_account = match (contact_account, &facts.named_account) {
        _ if !settings.create_account => None,
        // A contact never sits in one company while its deal points to
        // another: the named account and the contact's own must agree.
        (Some(own), Some(named)) if record::id(own, "id") != record::id(named, "id") => {
            return Verdict::Failed {
                code: ErrorCode::ContactInOtherAccount,
                message: format!(
                    "{} belongs to account {}, not to account {} named to convert lead {} into",
                    describe_contact(existing_contact.expect("a contact's account")),
                    record::id(own, "id").unwrap_or_default(),
                    record::id(named, "id").unwrap_or_default(),
                    facts.lead_id
                ),
            };
        }
        (_, Some(named)) => Some((MatchRule::Named, named)),
        (contact_account, None) => match contact_account {
            Some(a) => {
                let rule = match &facts.account_by_unique {
                    Some((f, u)) if same(a, Some(u)) => MatchRule::UniqueField(f.clone()),
                    _ if same(a, facts.account_by_company.as_ref())
                        || (facts.keys.company.is_some()
                            && record::id(a, "id").and_then(|id| facts.account_names.get(&id))
                                == facts.keys.company.as_ref()) =>
                    {
                        MatchRule::Company
                    }
                    _ => MatchRule::ContactAccount,
                };
                Some((rule, a))
            }
            None => facts
                .account_by_unique
                .as_ref()
                .map(|(f, a)| (MatchRule::UniqueField(f.clone()), a))
                .or_else(|| facts.account_by_company.as_ref().map(|a| (MatchRule::Company, a))),
        },
    };
    let account_values = fields.values_for(lead, Module::Account);
    let matched_account_id = matched_account.as_ref().and_then(|(_, a)| record::id(a, "id"));
    let account = match matched_account {
        Some((MatchRule::ContactAccount, existing)) => {
            // Another company than the lead's: linked, never filled.
            let writable = may_write(existing);
            Some(merge_target(Action::Matched, MatchRule::ContactAccount, existing, &Record::new(), &[], writable))
        }
        Some((rule, existing)) => {
            Some(merge_target(Action::Matched, rule, existing, &account_values, &lead_tags, may_write(existing)))
        }
        None if !settings.create_account => None,
        None if account_values.contains_key("account_name") => Some(create_target(account_values, owner, &lead_tags)),
        // An account is what this lead becomes (no contact), and nothing
        // names it: nothing is written.
        None if !settings.create_contact => {
            return Verdict::Failed {
                code: ErrorCode::MissingMandatoryField,
                message: format!(
                    "lead {} has an empty company, which names the account the job makes (create_contact is \
                     false) and no account matched: fill in the company or convert it with a contact",
                    facts.lead_id
                ),
            }
        }
        None => None,
    };
    // 5. The contact is linked to the account when it has none yet: a new
    // contact, or a matched one (also read-only: the link is the
    // conversion's, not a fill of the contact's data).
    let link_contact_to_account = contact.is_some()
        && account.is_some()
        && existing_contact.is_none_or(|c| record::id(c, "account_id").is_none());
    let merged = contact.as_ref().is_some_and(|c| c.action == Action::Merged)
        || account.as_ref().is_some_and(|a| a.action == Action::Matched);
    // The repeat marks (seed 002) look at the contact and account the lead
    // is known by even when the job makes none: the existing contact with
    // its e-mail, the existing account named by its company.
    let known_contact = if settings.create_contact {
        existing_contact
    } else {
        facts.contact_by_email.as_ref().filter(|c| is_existing(c))
    };
    let known_account_id = if settings.create_account {
        matched_account_id
    } else {
        facts.account_by_company.as_ref().filter(|a| is_existing(a)).and_then(|a| record::id(a, "id"))
    };
    let seen_before = merged || known_contact.is_some() || known_account_id.is_some();

    // 8. Deal, with the repeat marks of seed 002.
    let deal = settings.deal.as_ref().map(|d| {
        let won_before =
            known_contact.and_then(|c| record::id(c, "id")).is_some_and(|id| facts.won_contacts.contains(&id))
                || known_account_id.is_some_and(|id| facts.won_accounts.contains(&id));
        let deal_name = d.name.render(lead);
        let closing_date = d.closing_date.resolve(today);
        let mut values = fields.values_for(lead, Module::Deal);
        values.insert("deal_name".into(), deal_name.clone().into());
        values.insert("closing_date".into(), closing_date.to_string().into());
        values.insert("stage".into(), d.stage.clone().into());
        values.insert("pipeline".into(), d.pipeline.clone().into());
        if let Some(a) = &d.amount {
            values.insert("amount".into(), Value::Number(a.clone()));
        }
        if let Some(r) = &d.contact_role {
            values.insert("contact_role".into(), r.clone().into());
        }
        if let Some(c) = &d.campaign_source {
            values.insert("campaign_source".into(), c.clone().into());
        }
        values.insert("is_repeat".into(), won_before.into());
        values.insert("is_repeat_inquiry".into(), (!won_before && seen_before).into());
        set_owner_and_tags(&mut values, owner, &lead_tags);
        DealPlan {
            deal_name,
            closing_date,
            stage: d.stage.clone(),
            pipeline: d.pipeline.clone(),
            amount: d.amount.clone(),
            is_repeat: won_before,
            is_repeat_inquiry: !won_before && seen_before,
            values,
        }
    });

    // 11. Related records, among the records this lead has: a target it
    // does not have gives way to the contact, else the deal, else the
    // account (with the options checked, one of them exists).
    let has = |m: Module| match m {
        Module::Contact => contact.is_some(),
        Module::Account => account.is_some(),
        Module::Deal => deal.is_some(),
        Module::Lead => false,
    };
    let to = |preferred: Module| {
        [preferred, Module::Contact, Module::Deal, Module::Account]
            .into_iter()
            .find(|&m| has(m))
            .expect("a conversion makes a contact, an account or a deal")
    };
    let (notes_to, note_copies_to) = if deal.is_some() {
        (Module::Deal, [Module::Contact, Module::Account].into_iter().filter(|&m| has(m)).collect())
    } else {
        (to(Module::Contact), Vec::new())
    };
    let attachments_to = to(settings.attachments_to);
    let activities_to = to(if deal.is_some() { Module::Deal } else { Module::Contact });

    Verdict::Convert(Box::new(Conversion {
        contact,
        account,
        deal,
        link_contact_to_account,
        // 12. A lead marked repeat by hand (seed 002) stays so.
        lead_is_repeat: seen_before || lead.get("is_repeat") == Some(&Value::Bool(true)),
        notes_to,
        note_copies_to,
        attachments_to,
        activities_to,
    }))
}

/// A record that existed before the run (not one an earlier lead of a dry
/// run creates).
fn is_existing(r: &Record) -> bool {
    record::id(r, "id").is_some_and(|id| id > 0)
}

/// "contact 42", or for a dry run "the contact lead 7 creates".
fn describe_contact(c: &Record) -> String {
    match record::id(c, "id") {
        Some(id) => match created_by_lead(id) {
            Some(lead) => format!("the contact lead {lead} creates"),
            None => format!("contact {id}"),
        },
        None => "a contact".into(),
    }
}

fn set_owner_and_tags(values: &mut Record, owner: Option<i64>, tags: &[String]) {
    if let Some(o) = owner {
        values.insert("owner_id".into(), o.into());
    }
    if !tags.is_empty() {
        values.insert("tags".into(), union_tags(&[], tags).into());
    }
}

fn create_target(mut values: Record, owner: Option<i64>, tags: &[String]) -> Target {
    set_owner_and_tags(&mut values, owner, tags);
    Target {
        action: Action::Created,
        id: None,
        created_by_lead: None,
        matched_by: None,
        writable: true,
        email_opt_out_applied: false,
        values,
    }
}

fn merge_target(
    action: Action,
    rule: MatchRule,
    existing: &Record,
    proposed: &Record,
    tags: &[String],
    writable: bool,
) -> Target {
    let mut values = Record::new();
    if writable {
        values = fill_empty(existing, proposed);
        let existing_tags = record::tags(existing);
        let all = union_tags(&existing_tags, tags);
        if all != existing_tags {
            values.insert("tags".into(), all.into());
        }
    }
    let id = record::id(existing, "id");
    Target {
        action,
        id: id.filter(|&id| id > 0),
        created_by_lead: id.and_then(created_by_lead),
        matched_by: Some(rule),
        writable,
        email_opt_out_applied: false,
        values,
    }
}
