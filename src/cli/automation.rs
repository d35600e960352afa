//! Conversion rules and schedules: `rule …` and `schedule …`.

use clap::Subcommand;
use leadconv::config::Services;
use leadconv::store::db;

use super::json_arg;

#[derive(Subcommand)]
pub enum RuleCommand {
    /// Create a rule (criteria, options and acting user checked as a job's; exit 2 when refused).
    Add {
        #[arg(long)]
        name: String,
        /// Criteria as JSON, or @FILE.
        #[arg(long)]
        criteria: String,
        /// Options as JSON, or @FILE.
        #[arg(long, default_value = "{}")]
        options: String,
        /// The user the rule's conversions act as: needs can_convert and active.
        #[arg(long)]
        acting_user: i64,
        /// Create the rule disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List rules.
    List {
        #[arg(long)]
        json: bool,
    },
    Enable {
        id: i64,
    },
    Disable {
        id: i64,
    },
    Delete {
        id: i64,
    },
}

#[derive(Subcommand)]
pub enum ScheduleCommand {
    /// Create a schedule (cron, criteria, options and acting user checked; exit 2 when refused).
    Add {
        #[arg(long)]
        name: String,
        /// Standard 5-field cron expression in UTC, e.g. "0 2 * * *".
        #[arg(long)]
        cron: String,
        /// Criteria as JSON, or @FILE.
        #[arg(long)]
        criteria: String,
        /// Options as JSON, or @FILE.
        #[arg(long, default_value = "{}")]
        options: String,
        /// The user the schedule's jobs act as: needs can_convert and active.
        #[arg(long)]
        acting_user: i64,
        /// Create the schedule disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List schedules.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Enable a schedule; its next run is the first tick after now.
    Enable {
        id: i64,
    },
    Disable {
        id: i64,
    },
    Delete {
        id: i64,
    },
}

impl RuleCommand {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let (database_url, cmd) = (&s.database_url, self);
        use leadconv::automation::rules;
        let line = |r: &rules::Rule| {
            format!(
                "{}\t{}\t{}\tacting_user={}\t{}",
                r.id,
                r.name,
                if r.enabled { "enabled" } else { "disabled" },
                r.acting_user,
                r.criteria.0
            )
        };
        match cmd {
            RuleCommand::Add { name, criteria, options, acting_user, disabled } => {
                let new = rules::NewRule {
                    name,
                    criteria: json_arg("criteria", &criteria)?,
                    options: json_arg("options", &options)?,
                    acting_user,
                    enabled: !disabled,
                };
                let pool = db::connect(database_url, 2).await?;
                println!("{}", rules::create(&pool, new).await?.id);
            }
            RuleCommand::List { json } => {
                let pool = db::connect(database_url, 2).await?;
                for r in rules::list(&pool).await? {
                    println!("{}", if json { serde_json::to_string(&r)? } else { line(&r) });
                }
            }
            RuleCommand::Enable { id } | RuleCommand::Disable { id } => {
                let enabled = matches!(cmd, RuleCommand::Enable { .. });
                let pool = db::connect(database_url, 2).await?;
                println!("{}", line(&rules::set_enabled(&pool, id, enabled).await?));
            }
            RuleCommand::Delete { id } => {
                let pool = db::connect(database_url, 2).await?;
                rules::delete(&pool, id).await?;
                println!("deleted rule {id}");
            }
        }
        Ok(())
    }
}

impl ScheduleCommand {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let (database_url, cmd) = (&s.database_url, self);
        use leadconv::automation::schedule;
        let line = |s: &schedule::Schedule| {
            format!(
                "{}\t{}\t{}\t{}\tnext={}\tlast_job={}",
                s.id,
                s.name,
                s.cron,
                if s.enabled { "enabled" } else { "disabled" },
                s.next_run_at.to_rfc3339(),
                s.last_job_id.map(|j| j.to_string()).unwrap_or_else(|| "-".into())
            )
        };
        match cmd {
            ScheduleCommand::Add { name, cron, criteria, options, acting_user, disabled } => {
                let new = schedule::NewSchedule {
                    name,
                    cron,
                    criteria: json_arg("criteria", &criteria)?,
                    options: json_arg("options", &options)?,
                    acting_user,
                    enabled: !disabled,
                };
                let pool = db::connect(database_url, 2).await?;
                println!("{}", schedule::create(&pool, new).await?.id);
            }
            ScheduleCommand::List { json } => {
                let pool = db::connect(database_url, 2).await?;
                for s in schedule::list(&pool).await? {
                    println!("{}", if json { serde_json::to_string(&s)? } else { line(&s) });
                }
            }
            ScheduleCommand::Enable { id } | ScheduleCommand::Disable { id } => {
                let enabled = matches!(cmd, ScheduleCommand::Enable { .. });
                let pool = db::connect(database_url, 2).await?;
                println!("{}", line(&schedule::set_enabled(&pool, id, enabled).await?));
            }
            ScheduleCommand::Delete { id } => {
                let pool = db::connect(database_url, 2).await?;
                schedule::delete(&pool, id).await?;
                println!("deleted schedule {id}");
            }
        }
        Ok(())
    }
}
