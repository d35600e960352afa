//! Error codes as data, and refusals.
//!
//! Every way a job can be refused or a lead can fail to convert has a stable
//! snake_case code (stored in `conversion_results.error_code`, returned by the
//! API, printed by the CLI) and a human message naming the field at fault.

use serde::{Deserialize, Serialize};

/// A stable, machine-readable reason. The `Display` form is the code itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // Per lead, discovered at conversion time.
    AlreadyConverted,
    NotFound,
    BlockedByHierarchy,
    Cancelled,
    ConstraintViolation,
    RetriesExhausted,
    PoisonMessage,
    InternalError,
    // Refusals of a job, discovered before anything is written.
    StageNotInPipeline,
    UnknownPipeline,
    UnknownPlaceholder,
    MissingMandatoryField,
    InvalidClosingDate,
    InvalidOption,
    OwnerNotFound,
    OwnerInactive,
    RequesterNotFound,
    RequesterCannotConvert,
    AttachmentsNeedDeal,
    InvalidMapping,
    InvalidCriteria,
    JobNotFound,
    JobFinished,
    // Rules and schedules (issue 4).
    InvalidCron,
    RuleNotFound,
    ScheduleNotFound,
    DuplicateName,
    // Retries (SPEC §4).
    NothingToRetry,
    // Undo (SPEC §4a): why a lead's undo is skipped.
    ChangedSince,
    InUse,
    AlreadyUndone,
    NotLatestConversion,
    NoJournal,
    /// An undo of a job that is still converting.
    JobInProgress,
    /// An undo of a job none of whose leads (of those asked for) were converted.
    NothingToUndo,
    // Records named for a conversion (SPEC §4: `account_id`, `contact_id`).
    /// The contact or account named to convert into does not exist.
    RecordNotFound,
    /// A contact of another account than the one named (or matched).
    ContactInOtherAccount,
    /// An option only an admin's job may use (it changes the CRM's schema).
    AdminOnly,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AlreadyConverted => "already_converted",
            ErrorCode::NotFound => "not_found",
            ErrorCode::BlockedByHierarchy => "blocked_by_hierarchy",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::ConstraintViolation => "constraint_violation",
            ErrorCode::RetriesExhausted => "retries_exhausted",
            ErrorCode::PoisonMessage => "poison_message",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::StageNotInPipeline => "stage_not_in_pipeline",
            ErrorCode::UnknownPipeline => "unknown_pipeline",
            ErrorCode::UnknownPlaceholder => "unknown_placeholder",
            ErrorCode::MissingMandatoryField => "missing_mandatory_field",
            ErrorCode::InvalidClosingDate => "invalid_closing_date",
            ErrorCode::InvalidOption => "invalid_option",
            ErrorCode::OwnerNotFound => "owner_not_found",
            ErrorCode::OwnerInactive => "owner_inactive",
            ErrorCode::RequesterNotFound => "requester_not_found",
            ErrorCode::RequesterCannotConvert => "requester_cannot_convert",
            ErrorCode::AttachmentsNeedDeal => "attachments_need_deal",
            ErrorCode::InvalidMapping => "invalid_mapping",
            ErrorCode::InvalidCriteria => "invalid_criteria",
            ErrorCode::JobNotFound => "job_not_found",
            ErrorCode::JobFinished => "job_finished",
            ErrorCode::InvalidCron => "invalid_cron",
            ErrorCode::RuleNotFound => "rule_not_found",
            ErrorCode::ScheduleNotFound => "schedule_not_found",
            ErrorCode::DuplicateName => "duplicate_name",
            ErrorCode::NothingToRetry => "nothing_to_retry",
            ErrorCode::ChangedSince => "changed_since",
            ErrorCode::InUse => "in_use",
            ErrorCode::AlreadyUndone => "already_undone",
            ErrorCode::NotLatestConversion => "not_latest_conversion",
            ErrorCode::NoJournal => "no_journal",
            ErrorCode::JobInProgress => "job_in_progress",
            ErrorCode::NothingToUndo => "nothing_to_undo",
            ErrorCode::RecordNotFound => "record_not_found",
            ErrorCode::ContactInOtherAccount => "contact_in_other_account",
            ErrorCode::AdminOnly => "admin_only",
        }
    }

    /// What the code means, for people reading a result export.
    pub fn describe(self) -> &'static str {
        match self {
            ErrorCode::AlreadyConverted => "the lead was converted before (only an undo of that conversion makes it convertible again)",
            ErrorCode::NotFound => "the lead was deleted after the job was created",
            ErrorCode::BlockedByHierarchy => {
                "the lead's owner is above the acting user in the hierarchy and a contact with the same e-mail exists"
            }
            ErrorCode::Cancelled => "the job was cancelled before this lead was converted",
            ErrorCode::ConstraintViolation => "the database refused a write; nothing of this lead was changed",
            ErrorCode::RetriesExhausted => "a transient error (database or broker unreachable) outlasted every retry",
            ErrorCode::PoisonMessage => {
                "every attempt at this lead ended with its worker gone before the result was written; it is not tried again"
            }
            ErrorCode::InternalError => "an unexpected database error; nothing of this lead was changed",
            ErrorCode::StageNotInPipeline => "the deal stage does not exist in the pipeline",
            ErrorCode::UnknownPipeline => "the pipeline does not exist",
            ErrorCode::UnknownPlaceholder => "the deal name template uses a placeholder that is not a lead field",
            ErrorCode::MissingMandatoryField => "a mandatory field is missing",
            ErrorCode::InvalidClosingDate => "the closing date is neither an ISO date nor +Nd/+Nw/+Nm",
            ErrorCode::InvalidOption => "an option has a wrong name, type or value",
            ErrorCode::OwnerNotFound => "the owner override names no existing user",
            ErrorCode::OwnerInactive => "the owner override names an inactive user",
            ErrorCode::RequesterNotFound => "the acting user does not exist",
            ErrorCode::RequesterCannotConvert => "the acting user is inactive or may not convert leads",
            ErrorCode::AttachmentsNeedDeal => "attachments can move to the deal only when a deal is created",
            ErrorCode::InvalidMapping => "the custom field mapping joins incompatible fields",
            ErrorCode::InvalidCriteria => "the criteria are not valid",
            ErrorCode::JobNotFound => "no job has this id",
            ErrorCode::JobFinished => "the job has already finished",
            ErrorCode::InvalidCron => "the cron expression is not a valid 5-field cron expression (UTC)",
            ErrorCode::RuleNotFound => "no conversion rule has this id",
            ErrorCode::ScheduleNotFound => "no conversion schedule has this id",
            ErrorCode::DuplicateName => "another rule or schedule already has this name",
            ErrorCode::NothingToRetry => "the job has no unconverted leads of that outcome (and code) to retry",
            ErrorCode::ChangedSince => {
                "a field the conversion wrote was changed since (by a person or another system): the undo keeps that work"
            }
            ErrorCode::InUse => {
                "a record the conversion created is used by something it did not make (a later conversion, a deal, a note, another contact, …)"
            }
            ErrorCode::AlreadyUndone => "this conversion was taken back already",
            ErrorCode::NotLatestConversion => "the lead was converted again since: undo that conversion first",
            ErrorCode::NoJournal => "the lead was converted before leadconv kept a journal: there is nothing to take back from",
            ErrorCode::JobInProgress => "the job is still converting: cancel it, or wait for it to finish, then undo it",
            ErrorCode::NothingToUndo => "none of the job's leads (of those named) was converted by it",
            ErrorCode::RecordNotFound => "the contact or account named to convert into does not exist",
            ErrorCode::AdminOnly => "only an admin's job may use this option: it changes the CRM's schema",
            ErrorCode::ContactInOtherAccount => {
                "the contact belongs to another account than the one named: a contact never sits in one company \
                 while its deal points to another"
            }
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: a code, the field at fault (a JSON path such as `deal.stage`)
/// and a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{field}: {message} ({code})")]
pub struct Refusal {
    pub code: ErrorCode,
    pub field: String,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, field: impl Into<String>, message: impl Into<String>) -> Self {
        Refusal { code, field: field.into(), message: message.into() }
    }
}
