//! Administration: `migrate` and `token create`.

use clap::{Args, Subcommand};
use leadconv::config::Services;
use leadconv::store::db;

#[derive(Args)]
pub struct Migrate {
    /// Also create the database when it does not exist.
    #[arg(long)]
    pub create_database: bool,
}

impl Migrate {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        if self.create_database && db::create_database_if_missing(&s.database_url).await? {
            println!("created the database");
        }
        let pool = db::connect(&s.database_url, 2).await?;
        db::migrate(&pool).await?;
        println!("migrated");
        Ok(())
    }
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a bearer token for a user and print it once (only its hash is stored).
    Create {
        #[arg(long)]
        user: i64,
        /// A label to recognise the token by.
        #[arg(long, default_value = "")]
        name: String,
    },
}

impl TokenCommand {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let TokenCommand::Create { user, name } = self;
        let pool = db::connect(&s.database_url, 2).await?;
        println!("{}", leadconv::store::auth::create_token(&pool, user, &name).await?);
        Ok(())
    }
}
