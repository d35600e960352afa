//! A Postgres that stops taking writes under a running pool (issue 23: after
//! a failover the pool's connections may lead to the old primary, now a
//! standby): the refused write is transient, and the pool drops the
//! read-only connections and opens new ones instead of failing on them
//! again and again.

mod common;

use common::*;
use leadconv::store::db;

#[tokio::test]
async fn connections_to_a_read_only_server_are_dropped_after_a_refused_write() {
    let crm = Crm::new().await;
    let pool = db::connect_warm(&crm.url(), 2, 0, None).await.unwrap();
    // Both connections of the pool now lead to "a standby": writes refused.
    let (mut a, mut b) = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
    for c in [&mut a, &mut b] {
        sqlx::query("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY").execute(&mut **c).await.unwrap();
    }
    drop((a, b));
    let write = "INSERT INTO users (name) VALUES ('Çağrı')";
    let refused = sqlx::query(write).execute(&pool).await.unwrap_err();
    assert!(leadconv::error::is_transient(&refused), "a read-only refusal is worth retrying: {refused}");
    // The next writes get connections that take them: the read-only ones
    // were dropped, not handed out again.
    for _ in 0..4 {
        sqlx::query(write).execute(&pool).await.expect("a writable connection");
    }
    assert_eq!(crm.count("SELECT count(*) FROM users WHERE name = 'Çağrı'").await, 4);
    pool.close().await;
}
