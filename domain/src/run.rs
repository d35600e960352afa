//! What the earlier leads of one run have done, for planning the later
//! ones without writing anything: the dry run's memory.
//!
//! A job converts its leads one after another, and each conversion sees
//! what the earlier ones wrote: the contact a lead created is the one a
//! later lead with the same e-mail merges into, the account it linked that
//! contact to is the one that stands, the fields it filled are no longer
//! empty, the won deal it made marks later deals as repeats. A dry run
//! writes nothing, so it keeps those effects here and lays them over the
//! facts read from the database before each lead is planned
//! ([`Run::overlay`]), then notes the lead's plan ([`Run::note`]).
//!
//! Records an earlier lead creates get the id `-lead_id` (see
//! [`crate::plan::Facts`]). Matching compares the keys Postgres computed
//! (`leadconv_norm*`), never text: the dry run and the conversion cannot
//! disagree on what is "the same".

use std::collections::{BTreeMap, HashSet};

use serde_json::Value;

use crate::options::Settings;
use crate::plan::{Action, ContactKeys, Conversion, Facts, LeadKeys, Plan, Target, Verdict};
use crate::record::{self, Record};

#[derive(Debug, Clone)]
struct Contact {
    record: Record,
    keys: ContactKeys,
}

#[derive(Debug, Clone)]
struct Account {
    record: Record,
    name: Option<String>,
}

/// The dry run's memory of one run.
#[derive(Debug, Default)]
pub struct Run {
    /// Every contact an earlier lead created (negative id) or changed, as it
    /// is now.
    contacts: BTreeMap<i64, Contact>,
    accounts: BTreeMap<i64, Account>,
    won_contacts: HashSet<i64>,
    won_accounts: HashSet<i64>,
    /// Whether the job's deals are created at a won stage: then every
    /// contact and account that gets one has a won deal for later leads.
    deals_are_won: bool,
}

/// The order in which the database returns the oldest of several matches
/// (`ORDER BY created_at, id`): records that existed before the run, then
/// the ones the run creates, in lead order.
fn age(r: &Record) -> (bool, String, i64) {
    let id = record::id(r, "id").unwrap_or(0);
    let created_at = r.get("created_at").and_then(Value::as_str).unwrap_or("").to_owned();
    (id < 0, created_at, id.abs())
}

fn oldest<'a>(candidates: impl Iterator<Item = &'a Record>) -> Option<&'a Record> {
    candidates.min_by_key(|r| age(r))
}

fn has_unique(r: &Record, field: &str, value: &Value) -> bool {
    record::custom_fields(r).get(field) == Some(value)
}

impl Run {
    /// An empty run of a job with `settings`.
    pub fn new(settings: &Settings) -> Run {
        Run { deals_are_won: settings.deal.as_ref().is_some_and(|d| d.stage_is_won), ..Run::default() }
    }

    fn contact_now(&self, r: Record) -> Record {
        match record::id(&r, "id").and_then(|id| self.contacts.get(&id)) {
            Some(c) => c.record.clone(),
            None => r,
        }
    }

    fn account_now(&self, r: Record) -> Record {
        match record::id(&r, "id").and_then(|id| self.accounts.get(&id)) {
            Some(a) => a.record.clone(),
            None => r,
        }
    }

    /// The oldest of the database's match and the run's matches.
    fn pick_contact(&self, found: Option<Record>, run: impl Fn(&Contact) -> bool) -> Option<Record> {
        let found = found.map(|c| self.contact_now(c));
        let ours = self.contacts.values().filter(|c| run(c)).map(|c| &c.record);
        oldest(found.iter().chain(ours)).cloned()
    }

    fn pick_account(&self, found: Option<Record>, run: impl Fn(&Account) -> bool) -> Option<Record> {
        let found = found.map(|a| self.account_now(a));
        let ours = self.accounts.values().filter(|a| run(a)).map(|a| &a.record);
        oldest(found.iter().chain(ours)).cloned()
    }

    /// Lays what the earlier leads did over `facts`, read from the database
    /// before the run. Returns the owners of records the run brought in,
    /// whose managers the caller must add to `facts.managers_above`.
    pub fn overlay(&self, facts: &mut Facts, settings: &Settings) -> Vec<i64> {
        let Some(lead) = facts.lead.clone() else { return Vec::new() };
        let keys = facts.keys.clone();
        let custom = record::custom_fields(&lead);
        let unique_value = |lead_field: &str| custom.get(lead_field).filter(|v| !record::is_empty(Some(v))).cloned();

        // Unique fields, in their order: the first field with a match wins.
        let db_contact_by_unique = facts.contact_by_unique.take();
        let mut contact_by_unique = None;
        for k in settings.fields.unique_keys(crate::record::Module::Contact) {
            let Some(v) = unique_value(&k.lead_field) else { continue };
            let found = db_contact_by_unique.clone().filter(|(f, _)| *f == k.target_field).map(|(_, c)| c);
            if let Some(c) = self.pick_contact(found, |c| has_unique(&c.record, &k.target_field, &v)) {
                contact_by_unique = Some((k.target_field.clone(), c));
                break;
            }
        }
        facts.contact_by_unique = contact_by_unique;
        facts.contact_by_email = match &keys.email {
            Some(email) => self.pick_contact(facts.contact_by_email.take(), |c| c.keys.email.as_ref() == Some(email)),
            None => None,
        };
        let db_account_by_unique = facts.account_by_unique.take();
        let mut account_by_unique = None;
        for k in settings.fields.unique_keys(crate::record::Module::Account) {
            let Some(v) = unique_value(&k.lead_field) else { continue };
            let found = db_account_by_unique.clone().filter(|(f, _)| *f == k.target_field).map(|(_, a)| a);
            if let Some(a) = self.pick_account(found, |a| has_unique(&a.record, &k.target_field, &v)) {
                account_by_unique = Some((k.target_field.clone(), a));
                break;
            }
        }
        facts.account_by_unique = account_by_unique;
        facts.account_by_company = match &keys.company {
            Some(company) => self.pick_account(facts.account_by_company.take(), |a| a.name.as_ref() == Some(company)),
            None => None,
        };
        facts.named_contact = facts.named_contact.take().map(|c| self.contact_now(c));
        facts.named_account = facts.named_account.take().map(|a| self.account_now(a));
        let db_by_name = facts.contact_by_name.take();
        let account_id = facts
            .account_by_unique
            .as_ref()
            .map(|(_, a)| a)
            .or(facts.account_by_company.as_ref())
            .and_then(|a| record::id(a, "id"));
        if let (None, None, Some(account_id), Some(_)) =
            (&keys.email, &facts.contact_by_unique, account_id, &keys.last_name)
        {
            // The database searched the account as it was before the run.
            let found =
                db_by_name.map(|c| self.contact_now(c)).filter(|c| record::id(c, "account_id") == Some(account_id));
            facts.contact_by_name = self.pick_contact(found, |c| {
                record::id(&c.record, "account_id") == Some(account_id)
                    && c.keys.last_name == keys.last_name
                    && c.keys.first_name == keys.first_name
            });
        }

        // The accounts of the candidate contacts, as they are now.
        let mut contact_accounts: Vec<Record> = Vec::new();
        for aid in facts.candidate_contacts().filter_map(|c| record::id(c, "account_id")) {
            let account = self
                .accounts
                .get(&aid)
                .map(|a| a.record.clone())
                .or_else(|| facts.contact_accounts.iter().find(|a| record::id(a, "id") == Some(aid)).cloned());
            contact_accounts.extend(account);
        }
        facts.contact_accounts = contact_accounts;

        // Keys and won deals of the records the run knows.
        for c in facts.candidate_contacts().filter_map(|c| record::id(c, "id")).collect::<Vec<_>>() {
            if let Some(ours) = self.contacts.get(&c) {
                facts.contact_keys.insert(c, ours.keys.clone());
            }
            if self.won_contacts.contains(&c) {
                facts.won_contacts.push(c);
            }
        }
        for a in facts.candidate_accounts().filter_map(|a| record::id(a, "id")).collect::<Vec<_>>() {
            if let Some(name) = self.accounts.get(&a).and_then(|a| a.name.clone()) {
                facts.account_names.insert(a, name);
            }
            if self.won_accounts.contains(&a) {
                facts.won_accounts.push(a);
            }
        }
        facts
            .candidate_contacts()
            .chain(facts.candidate_accounts())
            .filter_map(|r| record::id(r, "owner_id"))
            .filter(|o| !facts.managers_above.contains_key(o))
            .collect()
    }

    /// Notes what `plan` (made over `facts`, after [`Run::overlay`]) does.
    pub fn note(&mut self, facts: &Facts, plan: &Plan) {
        let Verdict::Convert(c) = &plan.verdict else { return };
        let lead_id = plan.lead_id;
        let account_id = c.account.as_ref().map(|a| raw_id(a, lead_id));
        self.note_account(facts, c, lead_id);
        self.note_contact(facts, c, lead_id, account_id);
        if c.deal.is_some() && self.deals_are_won {
            self.won_contacts.extend(c.contact.as_ref().map(|t| raw_id(t, lead_id)));
            self.won_accounts.extend(account_id);
        }
    }

    fn note_account(&mut self, facts: &Facts, c: &Conversion, lead_id: i64) {
        let Some(a) = &c.account else { return };
        let id = raw_id(a, lead_id);
        let (mut record, name) = match a.action {
            Action::Created => (Record::new(), facts.keys.company.clone()),
            _ => {
                let existing = facts.candidate_accounts().find(|r| record::id(r, "id") == Some(id)).cloned();
                (existing.unwrap_or_default(), facts.account_names.get(&id).cloned())
            }
        };
        record.extend(a.values.clone());
        record.insert("id".into(), id.into());
        if facts.won_accounts.contains(&id) {
            self.won_accounts.insert(id);
        }
        self.accounts.insert(id, Account { record, name });
    }

    fn note_contact(&mut self, facts: &Facts, c: &Conversion, lead_id: i64, account_id: Option<i64>) {
        let Some(t) = &c.contact else { return };
        let id = raw_id(t, lead_id);
        let lead_keys = &facts.keys;
        let (mut record, mut keys) = match t.action {
            Action::Created => (Record::new(), ContactKeys::default()),
            _ => {
                let existing = facts.candidate_contacts().find(|r| record::id(r, "id") == Some(id)).cloned();
                (existing.unwrap_or_default(), facts.contact_keys.get(&id).cloned().unwrap_or_default())
            }
        };
        // A field the conversion writes now has the lead's value, and so the
        // lead's key.
        let LeadKeys { email, first_name, last_name, .. } = lead_keys;
        for (field, key, lead_key) in [
            ("email", &mut keys.email, email),
            ("first_name", &mut keys.first_name, first_name),
            ("last_name", &mut keys.last_name, last_name),
        ] {
            if t.values.contains_key(field) {
                key.clone_from(lead_key);
            }
        }
        record.extend(t.values.clone());
        record.insert("id".into(), id.into());
        if facts.won_contacts.contains(&id) {
            self.won_contacts.insert(id);
        }
        if let (true, Some(aid)) = (c.link_contact_to_account, account_id) {
            record.insert("account_id".into(), aid.into());
        }
        self.contacts.insert(id, Contact { record, keys });
    }
}

/// The id of a plan's contact or account in the run: the existing record's,
/// or `-lead` for one a lead of the run creates.
fn raw_id(t: &Target, lead_id: i64) -> i64 {
    match (t.action, t.id, t.created_by_lead) {
        (Action::Created, _, _) => -lead_id,
        (_, Some(id), _) => id,
        (_, None, Some(lead)) => -lead,
        (_, None, None) => unreachable!("a matched record is existing or created by an earlier lead"),
    }
}
