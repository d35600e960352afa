//! Who may do what (SPEC §5 "Who may do what"), as a CRM's role hierarchy
//! has it: a caller's *reach* in the `manager_id` hierarchy, and the one
//! decision ([`decide`]) every API call, console page and form asks.
//!
//! Plain data in, a verdict out: the HTTP edge reads the caller (its user
//! and token) and the hierarchy, asks [`decide`], and turns the verdict into
//! a status. No handler decides permissions on its own.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

/// What a token may be used for, chosen when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Everything its user may do.
    #[default]
    Full,
    /// Only reading (GETs, and a console session that only reads): a
    /// dashboard's token.
    Read,
    /// Converting one lead now, and reading what the user may see; no
    /// console session: a workflow integration's token.
    Convert,
}

impl Scope {
    pub const ALL: &'static [Scope] = &[Scope::Full, Scope::Read, Scope::Convert];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Full => "full",
            Scope::Read => "read",
            Scope::Convert => "convert",
        }
    }

    pub fn parse(raw: &str) -> Option<Scope> {
        Scope::ALL.iter().copied().find(|s| s.as_str() == raw)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who is asking: the token's (or console session's) user and the token's
/// scope. A revoked or expired token never gets this far (401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: i64,
    pub active: bool,
    pub can_convert: bool,
    pub is_admin: bool,
    pub scope: Scope,
}

/// The users whose jobs, rules and schedules a caller sees and steers:
/// themselves and everyone below them in `manager_id`; an admin reaches
/// everyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    Everyone,
    Users(BTreeSet<i64>),
}

impl Reach {
    /// The reach of `caller` over the hierarchy given as (user, manager)
    /// pairs of every user who has a manager. A cycle in `manager_id` (bad
    /// data the schema cannot forbid) ends the walk where it closes: every
    /// user is visited once.
    pub fn of(caller: &Caller, managed: impl IntoIterator<Item = (i64, i64)>) -> Reach {
        if caller.is_admin {
            return Reach::Everyone;
        }
        let mut reports: HashMap<i64, Vec<i64>> = HashMap::new();
        for (user, manager) in managed {
            reports.entry(manager).or_default().push(user);
        }
        let mut reached = BTreeSet::from([caller.user_id]);
        let mut next = vec![caller.user_id];
        while let Some(manager) = next.pop() {
            for &user in reports.get(&manager).map(Vec::as_slice).unwrap_or_default() {
                if reached.insert(user) {
                    next.push(user);
                }
            }
        }
        Reach::Users(reached)
    }

    pub fn holds(&self, user: i64) -> bool {
        match self {
            Reach::Everyone => true,
            Reach::Users(users) => users.contains(&user),
        }
    }

    /// The users reached, for a list's SQL filter; `None` means everyone.
    pub fn users(&self) -> Option<Vec<i64>> {
        match self {
            Reach::Everyone => None,
            Reach::Users(users) => Some(users.iter().copied().collect()),
        }
    }
}

/// What a caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// List jobs (filtered by reach afterwards, in SQL).
    ListJobs,
    /// Read a job, its results, its CSV export, its history.
    ReadJob { requested_by: i64 },
    /// Create a bulk job or preview one (a dry run).
    CreateJob,
    /// Convert one lead now.
    ConvertNow,
    /// Cancel, retry or undo a job.
    SteerJob { requested_by: i64 },
    /// List rules or schedules (filtered by reach afterwards).
    ListAutomations,
    /// Read a rule or schedule.
    ReadAutomation { acting_user: i64 },
    /// Create a rule or schedule.
    CreateAutomation,
    /// Enable, disable, change or delete a rule or schedule.
    ChangeAutomation { acting_user: i64 },
    /// Open a console session.
    SignIn,
}

impl Act {
    /// The user whose object this is, when the act is about one: the
    /// caller must reach them, or the object does not exist for them.
    pub fn owner(self) -> Option<i64> {
        match self {
            Act::ReadJob { requested_by } | Act::SteerJob { requested_by } => Some(requested_by),
            Act::ReadAutomation { acting_user } | Act::ChangeAutomation { acting_user } => Some(acting_user),
            _ => None,
        }
    }

    /// Only reads: what a `read` token and a user without `can_convert`
    /// may do.
    fn only_reads(self) -> bool {
        matches!(
            self,
            Act::ListJobs | Act::ReadJob { .. } | Act::ListAutomations | Act::ReadAutomation { .. } | Act::SignIn
        )
    }
}

/// Why a caller who sees the object (or asks for no object) may not act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The user is inactive: nothing at all.
    Inactive,
    /// The user has no `can_convert`: the read-only (dashboard) role.
    ReadOnlyUser,
    /// The token was created with a narrower scope.
    TokenScope(Scope),
    /// Rules and schedules act unattended on every lead: admins only.
    NotAdmin,
}

impl Denied {
    /// The message a 403 carries: what is missing and how to get it.
    pub fn message(self) -> &'static str {
        match self {
            Denied::Inactive => "this user is inactive: an admin must reactivate them",
            Denied::ReadOnlyUser => "this user may only read (no can_convert): an admin can grant can_convert",
            Denied::TokenScope(Scope::Read) => "this token may only read: use a token created with --scope full",
            Denied::TokenScope(_) => {
                "this token may only convert leads now and read: use a token created with --scope full"
            }
            Denied::NotAdmin => "only admins create, change, enable, disable or delete rules and schedules",
        }
    }
}

/// The answer to "may this caller do that?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// The object is outside the caller's reach: answered exactly as a
    /// missing one, never a hint that it exists.
    NotFound,
    /// The caller sees the object (or asked for none) but may not do this.
    Forbidden(Denied),
}

/// Decides whether `caller` may do `act`. `reach` is the caller's reach
/// ([`Reach::of`]); it is only looked at for an act about an object.
///
/// In order: an inactive user may do nothing (403); an object outside the
/// reach does not exist for the caller (404, before any other reason, so a
/// denial never confirms it exists); a token's scope; the read-only role;
/// admin-only acts.
pub fn decide(caller: &Caller, reach: &Reach, act: Act) -> Verdict {
    if !caller.active {
        return Verdict::Forbidden(Denied::Inactive);
    }
    if act.owner().is_some_and(|owner| !reach.holds(owner)) {
        return Verdict::NotFound;
    }
    let scope_allows = match caller.scope {
        Scope::Full => true,
        Scope::Read => act.only_reads(),
        Scope::Convert => (act.only_reads() && act != Act::SignIn) || act == Act::ConvertNow,
    };
    if !scope_allows {
        return Verdict::Forbidden(Denied::TokenScope(caller.scope));
    }
    if !act.only_reads() && !caller.can_convert {
        return Verdict::Forbidden(Denied::ReadOnlyUser);
    }
    if matches!(act, Act::CreateAutomation | Act::ChangeAutomation { .. }) && !caller.is_admin {
        return Verdict::Forbidden(Denied::NotAdmin);
    }
    Verdict::Allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    // The organisation of the examples: a director over a manager over
    // two reps; an admin outside the tree.
    const DIRECTOR: i64 = 1;
    const MANAGER: i64 = 2;
    const REP: i64 = 3;
    const PEER: i64 = 4;
    const ADMIN: i64 = 9;
    const TREE: [(i64, i64); 3] = [(MANAGER, DIRECTOR), (REP, MANAGER), (PEER, MANAGER)];

    fn caller(user_id: i64) -> Caller {
        Caller { user_id, active: true, can_convert: true, is_admin: user_id == ADMIN, scope: Scope::Full }
    }

    fn verdict(c: &Caller, act: Act) -> Verdict {
        decide(c, &Reach::of(c, TREE), act)
    }

    #[test]
    fn reach_is_oneself_and_everyone_below() {
        let users = |u| Reach::of(&caller(u), TREE).users().unwrap().into_iter().collect::<Vec<_>>();
        assert_eq!(users(DIRECTOR), vec![DIRECTOR, MANAGER, REP, PEER]);
        assert_eq!(users(MANAGER), vec![MANAGER, REP, PEER]);
        assert_eq!(users(REP), vec![REP]);
        assert_eq!(Reach::of(&caller(ADMIN), TREE), Reach::Everyone);
        assert!(Reach::Everyone.holds(12345));
    }

    #[test]
    fn a_cycle_in_the_hierarchy_ends_the_walk() {
        // 1 → 2 → 3 → 1, and 4 below 3: everyone in the loop reaches the
        // loop and what hangs below it, once.
        let cycle = [(2, 1), (3, 2), (1, 3), (4, 3)];
        let r = Reach::of(&caller(2), cycle);
        assert_eq!(r.users().unwrap(), vec![1, 2, 3, 4]);
        // A user managing themselves (the schema forbids it; data may not).
        assert_eq!(Reach::of(&caller(5), [(5, 5)]).users().unwrap(), vec![5]);
    }

    #[test]
    fn a_job_is_seen_and_steered_by_its_requester_those_above_and_admins() {
        for (who, sees) in [(REP, true), (MANAGER, true), (DIRECTOR, true), (ADMIN, true), (PEER, false)] {
            let c = caller(who);
            let expected = if sees { Verdict::Allowed } else { Verdict::NotFound };
            assert_eq!(verdict(&c, Act::ReadJob { requested_by: REP }), expected, "user {who} reading");
            assert_eq!(verdict(&c, Act::SteerJob { requested_by: REP }), expected, "user {who} steering");
        }
        // Below does not see above.
        assert_eq!(verdict(&caller(REP), Act::ReadJob { requested_by: MANAGER }), Verdict::NotFound);
    }

    #[test]
    fn the_read_only_role_reads_and_nothing_more() {
        let viewer = Caller { can_convert: false, ..caller(MANAGER) };
        assert_eq!(verdict(&viewer, Act::ListJobs), Verdict::Allowed);
        assert_eq!(verdict(&viewer, Act::ReadJob { requested_by: REP }), Verdict::Allowed);
        assert_eq!(verdict(&viewer, Act::SignIn), Verdict::Allowed);
        for act in [Act::CreateJob, Act::ConvertNow, Act::SteerJob { requested_by: REP }] {
            assert_eq!(verdict(&viewer, act), Verdict::Forbidden(Denied::ReadOnlyUser), "{act:?}");
        }
        // Outside its reach it still learns nothing.
        assert_eq!(verdict(&viewer, Act::SteerJob { requested_by: DIRECTOR }), Verdict::NotFound);
        // A read-only admin reads everything and changes nothing.
        let auditor = Caller { can_convert: false, ..caller(ADMIN) };
        assert_eq!(verdict(&auditor, Act::ReadJob { requested_by: REP }), Verdict::Allowed);
        assert_eq!(verdict(&auditor, Act::CreateAutomation), Verdict::Forbidden(Denied::ReadOnlyUser));
    }

    #[test]
    fn an_inactive_user_may_do_nothing() {
        let gone = Caller { active: false, ..caller(ADMIN) };
        for act in [Act::ListJobs, Act::ReadJob { requested_by: ADMIN }, Act::ConvertNow, Act::SignIn] {
            assert_eq!(verdict(&gone, act), Verdict::Forbidden(Denied::Inactive), "{act:?}");
        }
    }

    #[test]
    fn scoped_tokens_do_only_what_their_scope_says() {
        let read = Caller { scope: Scope::Read, ..caller(MANAGER) };
        assert_eq!(verdict(&read, Act::ReadJob { requested_by: REP }), Verdict::Allowed);
        assert_eq!(verdict(&read, Act::SignIn), Verdict::Allowed);
        for act in [Act::CreateJob, Act::ConvertNow, Act::SteerJob { requested_by: REP }] {
            assert_eq!(verdict(&read, act), Verdict::Forbidden(Denied::TokenScope(Scope::Read)), "{act:?}");
        }
        let convert = Caller { scope: Scope::Convert, ..caller(MANAGER) };
        assert_eq!(verdict(&convert, Act::ConvertNow), Verdict::Allowed);
        assert_eq!(verdict(&convert, Act::ListJobs), Verdict::Allowed);
        assert_eq!(verdict(&convert, Act::ReadJob { requested_by: REP }), Verdict::Allowed);
        for act in [Act::CreateJob, Act::SignIn, Act::SteerJob { requested_by: REP }] {
            assert_eq!(verdict(&convert, act), Verdict::Forbidden(Denied::TokenScope(Scope::Convert)), "{act:?}");
        }
        // Scope never turns a hidden object into a visible one.
        assert_eq!(verdict(&convert, Act::SteerJob { requested_by: DIRECTOR }), Verdict::NotFound);
    }

    #[test]
    fn only_admins_change_rules_and_schedules() {
        assert_eq!(verdict(&caller(ADMIN), Act::CreateAutomation), Verdict::Allowed);
        assert_eq!(verdict(&caller(ADMIN), Act::ChangeAutomation { acting_user: REP }), Verdict::Allowed);
        assert_eq!(verdict(&caller(DIRECTOR), Act::CreateAutomation), Verdict::Forbidden(Denied::NotAdmin));
        // A director sees the rules acting as their reports, may not change them.
        assert_eq!(verdict(&caller(DIRECTOR), Act::ReadAutomation { acting_user: REP }), Verdict::Allowed);
        assert_eq!(
            verdict(&caller(DIRECTOR), Act::ChangeAutomation { acting_user: REP }),
            Verdict::Forbidden(Denied::NotAdmin)
        );
        // A rep does not see a rule acting as the admin.
        assert_eq!(verdict(&caller(REP), Act::ReadAutomation { acting_user: ADMIN }), Verdict::NotFound);
        assert_eq!(verdict(&caller(REP), Act::ChangeAutomation { acting_user: ADMIN }), Verdict::NotFound);
    }

    #[test]
    fn converting_is_open_to_every_user_who_may_convert() {
        for who in [REP, PEER, MANAGER, DIRECTOR, ADMIN] {
            assert_eq!(verdict(&caller(who), Act::CreateJob), Verdict::Allowed);
            assert_eq!(verdict(&caller(who), Act::ConvertNow), Verdict::Allowed);
        }
    }
}
