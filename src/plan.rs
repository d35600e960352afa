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
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub lead_id: i64,
    /// `None`: the lead was deleted since the job was created.
    pub lead: Option<Record>,
    pub acting_is_admin: bool,
    /// The first contact matched by a unique custom field: (field, contact).
    pub contact_by_unique: Option<(String, Record)>,
    /// The oldest contact with the lead's e-mail.
    pub contact_by_email: Option<Record>,
    /// The first account matched by a unique custom field: (field, account).
    pub account_by_unique: Option<(String, Record)>,
    /// The oldest account named like the lead's company.
    pub account_by_company: Option<Record>,
    /// Accounts the candidate contacts belong to.
    pub contact_accounts: Vec<Record>,
    /// Candidate contacts and accounts that already have a won deal.
    pub won_contacts: Vec<i64>,
    pub won_accounts: Vec<i64>,
    /// The managers above each user concerned (acting user, lead owner,
    /// owners of candidate records), nearest first.
    pub managers_above: HashMap<i64, Vec<i64>>,
    /// Dry run only: the contact an earlier lead of the same run creates
    /// with this lead's e-mail, and the account one creates with its
    /// company: (that lead, the record as it would be). A conversion finds
    /// such records in the database instead; a dry run writes nothing, so
    /// without these it would plan a second contact for every shared e-mail.
    pub contact_planned: Option<Planned>,
    pub account_planned: Option<Planned>,
}

/// Dry run only: a record an earlier lead of the run creates.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// The lead whose conversion creates it.
    pub lead_id: i64,
    /// Its values as they would be at this point of the run.
    pub record: Record,
    /// For a contact: the account it is linked to, and how that account was
    /// found, so a later lead merging into the contact gets it too.
    pub account: Option<(MatchRule, Record)>,
}

impl Facts {
    /// True when `upper` stands above `lower` in the `manager_id` hierarchy.
    pub fn is_above(&self, upper: i64, lower: i64) -> bool {
        self.managers_above.get(&lower).is_some_and(|m| m.contains(&upper))
    }
}

/// By which rule an existing record was matched (SPEC §3.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchRule {
    UniqueField(String),
    Email,
    /// The matched contact's own account.
    ContactAccount,
    Company,
    /// Dry run: the contact created by this earlier lead of the run.
    EmailOfEarlierLead(i64),
    /// Dry run: the account created by this earlier lead of the run.
    CompanyOfEarlierLead(i64),
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
    /// The existing record's id; `None` for one to create.
    pub id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched_by: Option<MatchRule>,
    /// Whether the acting user may write the matched record (SPEC §3.6).
    pub writable: bool,
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
    pub contact: Target,
    /// `None`: no company and nothing matched, so no account.
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
    let acting = settings.acting_user;

    // 7. Hierarchy block: a subordinate may not convert their superior's
    // lead into someone's existing contact.
    let email_duplicate = match (&facts.contact_by_email, &facts.contact_planned) {
        (Some(dup), _) => Some(format!("contact {}", dup["id"])),
        (None, Some(planned)) => Some(format!("the contact lead {} creates", planned.lead_id)),
        (None, None) => None,
    };
    if let (Some(owner), Some(dup)) = (record::id(lead, "owner_id"), email_duplicate) {
        if owner != acting && facts.is_above(owner, acting) {
            return Verdict::Failed {
                code: ErrorCode::BlockedByHierarchy,
                message: format!(
                    "lead owner {owner} is above acting user {acting} in the hierarchy and {dup} has the same e-mail"
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

    // 3–4. Contact: unique field, then e-mail; else a new one.
    let matched_contact = facts
        .contact_by_unique
        .as_ref()
        .map(|(f, c)| (MatchRule::UniqueField(f.clone()), c))
        .or_else(|| facts.contact_by_email.as_ref().map(|c| (MatchRule::Email, c)))
        .or_else(|| facts.contact_planned.as_ref().map(|p| (MatchRule::EmailOfEarlierLead(p.lead_id), &p.record)));
    let contact_values = fields.values_for(lead, Module::Contact);
    let existing_contact = matched_contact.as_ref().map(|(_, c)| *c);
    let contact = match matched_contact {
        Some((rule, existing)) => {
            merge_target(Action::Merged, rule, existing, &contact_values, &lead_tags, may_write(existing))
        }
        None => create_target(contact_values, owner, &lead_tags),
    };

    // 3, 5. Account: unique field, the contact's own account, company; a new
    // one only when the lead names a company.
    let contact_account = match &contact.matched_by {
        Some(MatchRule::EmailOfEarlierLead(_)) => {
            facts.contact_planned.as_ref().and_then(|p| p.account.as_ref()).map(|(rule, a)| (rule.clone(), a))
        }
        _ => existing_contact
            .and_then(|c| record::id(c, "account_id"))
            .and_then(|aid| facts.contact_accounts.iter().find(|a| record::id(a, "id") == Some(aid)))
            .map(|a| (MatchRule::ContactAccount, a)),
    };
    let matched_account = facts
        .account_by_unique
        .as_ref()
        .map(|(f, a)| (MatchRule::UniqueField(f.clone()), a))
        .or(contact_account)
        .or_else(|| facts.account_by_company.as_ref().map(|a| (MatchRule::Company, a)))
        .or_else(|| facts.account_planned.as_ref().map(|p| (MatchRule::CompanyOfEarlierLead(p.lead_id), &p.record)));
    let account_values = fields.values_for(lead, Module::Account);
    let account = match matched_account {
        Some((rule, existing)) => {
            Some(merge_target(Action::Matched, rule, existing, &account_values, &lead_tags, may_write(existing)))
        }
        None if account_values.contains_key("account_name") => Some(create_target(account_values, owner, &lead_tags)),
        None => None,
    };

    let link_contact_to_account = account.is_some()
        && match existing_contact {
            None => true,
            Some(c) => contact.writable && record::id(c, "account_id").is_none(),
        };
    let merged = contact.action == Action::Merged || account.as_ref().is_some_and(|a| a.action == Action::Matched);

    // 8. Deal, with the repeat marks of seed 002.
    let deal = settings.deal.as_ref().map(|d| {
        let won_before = contact.id.is_some_and(|id| facts.won_contacts.contains(&id))
            || account.as_ref().and_then(|a| a.id).is_some_and(|id| facts.won_accounts.contains(&id));
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
        values.insert("is_repeat_inquiry".into(), (!won_before && merged).into());
        set_owner_and_tags(&mut values, owner, &lead_tags);
        DealPlan {
            deal_name,
            closing_date,
            stage: d.stage.clone(),
            pipeline: d.pipeline.clone(),
            amount: d.amount.clone(),
            is_repeat: won_before,
            is_repeat_inquiry: !won_before && merged,
            values,
        }
    });

    // 11. Related records.
    let (notes_to, note_copies_to) = if deal.is_some() {
        let mut copies = vec![Module::Contact];
        if account.is_some() {
            copies.push(Module::Account);
        }
        (Module::Deal, copies)
    } else {
        (Module::Contact, Vec::new())
    };
    let attachments_to = match settings.attachments_to {
        Module::Account if account.is_none() => Module::Contact,
        m => m,
    };
    let activities_to = if deal.is_some() { Module::Deal } else { Module::Contact };

    Verdict::Convert(Box::new(Conversion {
        contact,
        account,
        deal,
        link_contact_to_account,
        lead_is_repeat: merged,
        notes_to,
        note_copies_to,
        attachments_to,
        activities_to,
    }))
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
    Target { action: Action::Created, id: None, matched_by: None, writable: true, values }
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
    Target { action, id: record::id(existing, "id"), matched_by: Some(rule), writable, values }
}
