//! Conversion rules and schedules: `rule …` and `schedule …`. Adding
//! differs (a schedule has a cron expression); `list`, `enable`, `disable`
//! and `delete` are one set of commands over [`Automation`].

use clap::{Args, Subcommand};
use leadconv::automation::rules::{self, NewRule, Rule};
use leadconv::automation::schedule::{self, NewSchedule, Schedule};
use leadconv::automation::{self, Automation};
use leadconv::config::Services;
use leadconv::store::db;
use leadconv::store::job::{self, Trigger};
use leadconv::store::types::Overlap;

use super::{json_arg, say};

#[derive(Subcommand)]
pub enum RuleCommand {
    /// Create a rule (criteria, options and acting user checked as a job's; exit 2 when refused).
    Add(Definition),
    #[command(flatten)]
    Manage(Manage),
}

#[derive(Subcommand)]
pub enum ScheduleCommand {
    /// Create a schedule (cron, criteria, options and acting user checked; exit 2 when refused).
    Add {
        /// Standard 5-field cron expression in UTC, e.g. "0 2 * * *".
        #[arg(long)]
        cron: String,
        /// A tick while the previous run is still in progress: `skip` it, or
        /// `allow` a second job.
        #[arg(long, value_enum, default_value_t = Overlap::Skip)]
        overlap: Overlap,
        #[command(flatten)]
        definition: Definition,
    },
    #[command(flatten)]
    Manage(Manage),
}

/// What a new rule or schedule is made of.
#[derive(Args)]
pub struct Definition {
    /// Its name, unique among rules (or among schedules).
    #[arg(long)]
    name: String,
    /// Criteria as JSON, or @FILE.
    #[arg(long)]
    criteria: String,
    /// Options as JSON, or @FILE.
    #[arg(long, default_value = "{}")]
    options: String,
    /// The user its conversions act as: needs can_convert and active.
    #[arg(long)]
    acting_user: i64,
    /// Create it disabled.
    #[arg(long)]
    disabled: bool,
}

/// What rules and schedules share on the command line.
#[derive(Subcommand)]
pub enum Manage {
    /// List them, by id.
    List {
        /// One JSON object per line instead of one text line each.
        #[arg(long)]
        json: bool,
    },
    /// Enable one (a schedule's next run is then the first tick after now).
    Enable {
        /// Its id, as `list` shows it.
        id: i64,
    },
    /// Disable one.
    Disable {
        /// Its id, as `list` shows it.
        id: i64,
    },
    /// Delete one; the jobs it created stay.
    Delete {
        /// Its id, as `list` shows it.
        id: i64,
    },
}

/// One line of `list` for people.
trait Line {
    fn line(&self) -> String;
}

impl Line for Rule {
    fn line(&self) -> String {
        let state = if self.enabled { "enabled" } else { "disabled" };
        format!("{}\t{}\t{state}\tacting_user={}\t{}", self.id, self.name, self.acting_user, self.criteria.0)
    }
}

impl Line for Schedule {
    fn line(&self) -> String {
        let state = if self.enabled { "enabled" } else { "disabled" };
        let last = self.last_job_id.map(|j| j.to_string()).unwrap_or_else(|| "-".into());
        format!(
            "{}\t{}\t{}\t{state}\tnext={}\tlast_job={last}",
            self.id,
            self.name,
            self.cron,
            self.next_run_at.to_rfc3339()
        )
    }
}

impl Manage {
    async fn run<T: Automation + Line>(self, s: &Services) -> anyhow::Result<()> {
        let pool = db::connect_migrated(&s.database_url, 2).await?;
        match self {
            Manage::List { json } => {
                // When each last made a job, and how many leads its jobs converted.
                let runs = job::origin_runs(&pool, T::TRIGGER == Trigger::Schedule).await?;
                for r in automation::list::<T>(&pool, None).await? {
                    let (last, converted) = runs.get(&r.id()).map_or((None, 0), |(at, n)| (Some(*at), *n));
                    say(if json {
                        let mut v = serde_json::to_value(&r)?;
                        v["last_job_at"] = serde_json::to_value(last)?;
                        v["leads_converted"] = converted.into();
                        v.to_string()
                    } else {
                        let last = last.map_or("-".to_owned(), |t| t.to_rfc3339());
                        format!("{}\tlast_job_at={last}\tleads_converted={converted}", r.line())
                    })?;
                }
            }
            Manage::Enable { id } => say(automation::set_enabled::<T>(&pool, id, true).await?.line())?,
            Manage::Disable { id } => say(automation::set_enabled::<T>(&pool, id, false).await?.line())?,
            Manage::Delete { id } => {
                automation::delete::<T>(&pool, id).await?;
                say(format!("deleted {} {id}", T::WHAT))?;
            }
        }
        Ok(())
    }
}

impl RuleCommand {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        match self {
            RuleCommand::Add(Definition { name, criteria, options, acting_user, disabled }) => {
                let new = NewRule {
                    name,
                    criteria: json_arg("criteria", &criteria)?,
                    options: json_arg("options", &options)?,
                    acting_user,
                    enabled: !disabled,
                };
                let pool = db::connect_migrated(&s.database_url, 2).await?;
                say(rules::create(&pool, new).await?.id)?;
                Ok(())
            }
            RuleCommand::Manage(m) => m.run::<Rule>(s).await,
        }
    }
}

impl ScheduleCommand {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        match self {
            ScheduleCommand::Add {
                cron,
                overlap,
                definition: Definition { name, criteria, options, acting_user, disabled },
            } => {
                let new = NewSchedule {
                    name,
                    cron,
                    criteria: json_arg("criteria", &criteria)?,
                    options: json_arg("options", &options)?,
                    acting_user,
                    enabled: !disabled,
                    overlap,
                };
                let pool = db::connect_migrated(&s.database_url, 2).await?;
                say(schedule::create(&pool, new).await?.id)?;
                Ok(())
            }
            ScheduleCommand::Manage(m) => m.run::<Schedule>(s).await,
        }
    }
}
