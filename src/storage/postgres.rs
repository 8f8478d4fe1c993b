//! The production store: PostgreSQL through the `postgres` crate (blocking, on the writer's
//! thread). A batch is one transaction holding one multi-row `INSERT … SELECT FROM UNNEST`,
//! whatever its size, so a commit costs one round trip for the insert and one for the
//! originals of any duplicates.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, NoTls};

use super::{
    DecisionQuery, OfflineOp, OfflineRow, Outcome, Param, RecentKey, Record, Recovered,
    StorageError, Store,
};
use crate::auth::Revocation;

/// Versioned migrations, applied in order; a database remembers which it has.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        include_str!("../../migrations/postgres/0001_decisions.sql"),
    ),
    (
        2,
        include_str!("../../migrations/postgres/0002_unnumbered.sql"),
    ),
    (
        3,
        include_str!("../../migrations/postgres/0003_revocations.sql"),
    ),
    (
        4,
        include_str!("../../migrations/postgres/0004_offline.sql"),
    ),
];

/// Serializes migrations between servers starting against the same database.
const MIGRATION_LOCK: i64 = 0x5348_4152_4443_4153; // "SHARDCAS"

/// A PostgreSQL database of decisions.
pub struct Postgres {
    client: Client,
}

impl Postgres {
    /// Connect (5 s timeout unless the url sets one) and migrate.
    pub fn connect(url: &str) -> Result<Self, StorageError> {
        let mut config: postgres::Config = url.parse()?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        let client = config.connect(NoTls)?;
        let mut db = Self { client };
        db.migrate()?;
        Ok(db)
    }

    fn migrate(&mut self) -> Result<(), StorageError> {
        let mut tx = self.client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 applied_ms BIGINT  NOT NULL
             )",
        )?;
        let current: i32 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                &[],
            )?
            .get(0);
        for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            tx.batch_execute(sql).map_err(|e| StorageError::Migration {
                version: version as u32,
                message: e.to_string(),
            })?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)",
                &[&version, &(crate::decision::unix_ms() as i64)],
            )?;
            tracing::info!(version, "applied storage migration");
        }
        tx.commit()?;
        Ok(())
    }
}

impl Store for Postgres {
    fn commit(&mut self, batch: &[&Record]) -> Result<Vec<Outcome>, StorageError> {
        let column = |f: fn(&Record) -> &str| batch.iter().map(|r| f(r)).collect::<Vec<_>>();
        let optional =
            |f: fn(&Record) -> Option<&str>| batch.iter().map(|r| f(r)).collect::<Vec<_>>();
        let ids = column(|r| &r.id);
        let orgs = column(|r| &r.org);
        let keys = column(|r| &r.idempotency_key);
        let seqs: Vec<i64> = batch.iter().map(|r| r.seq as i64).collect();
        let latencies: Vec<Option<f64>> = batch.iter().map(|r| r.latency_ms).collect();
        let created: Vec<i64> = batch.iter().map(|r| r.created_ms).collect();
        let mut tx = self.client.transaction()?;
        let inserted: HashSet<String> = tx
            .query(
                "INSERT INTO decisions (id, org, channel, seq, schema, idempotency_key,
                     direction, decision, tool, scope, payload_hash, latency_ms,
                     correlation_id, tags, data, created_ms)
                 SELECT id, org, channel, NULLIF(seq, 0), schema, key, direction, decision, tool, scope,
                        hash, latency, correlation, tags::jsonb, data::json, created
                 FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[], $5::text[],
                             $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                             $11::text[], $12::float8[], $13::text[], $14::text[],
                             $15::text[], $16::int8[])
                      AS t(id, org, channel, seq, schema, key, direction, decision, tool,
                           scope, hash, latency, correlation, tags, data, created)
                 ON CONFLICT (org, idempotency_key) DO NOTHING
                 RETURNING id",
                &[
                    &ids,
                    &orgs,
                    &column(|r| &r.channel),
                    &seqs,
                    &column(|r| &r.schema),
                    &keys,
                    &column(|r| &r.direction),
                    &column(|r| &r.decision),
                    &optional(|r| r.tool.as_deref()),
                    &optional(|r| r.scope.as_deref()),
                    &column(|r| &r.payload_hash),
                    &latencies,
                    &optional(|r| r.correlation_id.as_deref()),
                    &optional(|r| r.tags.as_deref()),
                    &column(|r| &r.data),
                    &created,
                ],
            )?
            .iter()
            .map(|row| row.get(0))
            .collect();
        // Whatever was not inserted collided with a stored (or earlier in this batch) key.
        let mut originals = HashMap::new();
        if inserted.len() < batch.len() {
            let rows = tx.query(
                "SELECT org, idempotency_key, id, COALESCE(seq, 0) FROM decisions
                 WHERE (org, idempotency_key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))",
                &[&orgs, &keys],
            )?;
            for row in rows {
                let key: (String, String) = (row.get(0), row.get(1));
                originals.insert(key, (row.get::<_, String>(2), row.get::<_, i64>(3) as u64));
            }
        }
        // Each returned id stands for one inserted row: the first record that carries it.
        let mut inserted = inserted;
        let outcomes = batch
            .iter()
            .map(|r| {
                if inserted.remove(&r.id) {
                    return Ok(Outcome::Stored);
                }
                let key = (r.org.clone(), r.idempotency_key.clone());
                match originals.get(&key) {
                    Some((id, seq)) => Ok(Outcome::Duplicate {
                        id: id.clone(),
                        seq: *seq,
                    }),
                    None => Err(StorageError::Inconsistent(format!(
                        "decision {} was neither stored nor found",
                        r.id
                    ))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit()?;
        Ok(outcomes)
    }

    fn ping(&mut self) -> Result<(), StorageError> {
        self.client.simple_query("SELECT 1")?;
        Ok(())
    }

    fn trim(&mut self, before_ms: i64, limit: usize) -> Result<usize, StorageError> {
        let deleted = self.client.execute(
            "DELETE FROM decisions WHERE id IN
                 (SELECT id FROM decisions WHERE created_ms < $1 LIMIT $2)",
            &[&before_ms, &(limit as i64)],
        )?;
        Ok(deleted as usize)
    }

    fn version(&mut self) -> Result<u32, StorageError> {
        let row = self.client.query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )?;
        Ok(row.get::<_, i32>(0) as u32)
    }

    fn recover(&mut self, since_ms: i64, limit: usize) -> Result<Recovered, StorageError> {
        let rows = self.client.query(
            "SELECT channel, MAX(seq) FROM decisions WHERE seq IS NOT NULL GROUP BY channel",
            &[],
        )?;
        let channel_seqs = rows
            .iter()
            .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1) as u64))
            .collect();
        let rows = self.client.query(
            "SELECT org, idempotency_key, channel, id, COALESCE(seq, 0) FROM decisions
             WHERE created_ms >= $1 ORDER BY created_ms DESC LIMIT $2",
            &[&since_ms, &(limit.min(i64::MAX as usize) as i64)],
        )?;
        let recent = rows
            .iter()
            .map(|row| RecentKey {
                org: row.get(0),
                key: row.get(1),
                channel: row.get(2),
                id: row.get(3),
                seq: row.get::<_, i64>(4) as u64,
            })
            .collect();
        let rows = self.client.query(
            "SELECT kind, value, org, at_ms, until_ms FROM revocations WHERE until_ms > $1",
            &[&(crate::decision::unix_ms() as i64)],
        )?;
        let revocations = rows
            .iter()
            .filter_map(|row| {
                let (kind, value, org) = (row.get(0), row.get(1), row.get(2));
                super::revocation(kind, value, org, row.get(3), row.get(4))
            })
            .collect();
        let rows = self.client.query(
            "SELECT id, ord, user_id, org, channel, seq, data, created_ms, expires_ms
             FROM offline_messages WHERE expires_ms > $1 ORDER BY created_ms, ord",
            &[&(crate::decision::unix_ms() as i64)],
        )?;
        let offline = rows
            .iter()
            .map(|row| {
                let org: String = row.get(3);
                OfflineRow {
                    id: row.get(0),
                    ord: row.get(1),
                    user: row.get(2),
                    org: (!org.is_empty()).then_some(org),
                    channel: row.get(4),
                    seq: row.get::<_, i64>(5) as u64,
                    data: row.get(6),
                    created_ms: row.get(7),
                    expires_ms: row.get(8),
                }
            })
            .collect();
        Ok(Recovered {
            channel_seqs,
            recent,
            revocations,
            offline,
        })
    }

    fn revoke(&mut self, revocation: &Revocation) -> Result<(), StorageError> {
        let (kind, value, org) = super::revocation_key(revocation);
        let (at, until) = (revocation.at_ms as i64, revocation.until_ms as i64);
        let now = crate::decision::unix_ms() as i64;
        let mut tx = self.client.transaction()?;
        tx.execute("DELETE FROM revocations WHERE until_ms <= $1", &[&now])?;
        tx.execute(
            "INSERT INTO revocations (kind, value, org, at_ms, until_ms)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (kind, value, org) DO UPDATE
             SET at_ms = GREATEST(revocations.at_ms, EXCLUDED.at_ms),
                 until_ms = GREATEST(revocations.until_ms, EXCLUDED.until_ms)",
            &[&kind, &value, &org, &at, &until],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn offline(&mut self, op: &OfflineOp) -> Result<(), StorageError> {
        let mut tx = self.client.transaction()?;
        match op {
            OfflineOp::Keep { row, dropped } => {
                let now = crate::decision::unix_ms() as i64;
                tx.execute(
                    "DELETE FROM offline_messages WHERE expires_ms <= $1",
                    &[&now],
                )?;
                if !dropped.is_empty() {
                    tx.execute(
                        "DELETE FROM offline_messages WHERE id = ANY($1)",
                        &[dropped],
                    )?;
                }
                tx.execute(
                    "INSERT INTO offline_messages
                     (id, ord, user_id, org, channel, seq, data, created_ms, expires_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
                    &[
                        &row.id,
                        &row.ord,
                        &row.user,
                        &row.org.as_deref().unwrap_or(""),
                        &row.channel,
                        &(row.seq as i64),
                        &row.data,
                        &row.created_ms,
                        &row.expires_ms,
                    ],
                )?;
            }
            OfflineOp::Clear { user, org: None } => {
                tx.execute("DELETE FROM offline_messages WHERE user_id = $1", &[user])?;
            }
            OfflineOp::Clear {
                user,
                org: Some(org),
            } => {
                tx.execute(
                    "DELETE FROM offline_messages WHERE user_id = $1 AND org = $2",
                    &[user, org],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn find(&mut self, org: &str, key: &str) -> Result<Option<Record>, StorageError> {
        let sql =
            format!("SELECT {COLUMNS} FROM decisions WHERE org = $1 AND idempotency_key = $2");
        let row = self.client.query_opt(&sql, &[&org, &key])?;
        Ok(row.as_ref().map(record))
    }

    fn history(
        &mut self,
        channel: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StorageError> {
        let rows = self.client.query(
            "SELECT seq, data::text FROM decisions WHERE channel = $1 AND seq > $2 AND seq <= $3
             ORDER BY seq LIMIT $4",
            &[&channel, &(after as i64), &(upto as i64), &(limit as i64)],
        )?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, i64>(0) as u64, row.get(1)))
            .collect())
    }

    fn number(&mut self, numbered: &[(&str, u64)]) -> Result<usize, StorageError> {
        let ids: Vec<&str> = numbered.iter().map(|(id, _)| *id).collect();
        let seqs: Vec<i64> = numbered.iter().map(|(_, seq)| *seq as i64).collect();
        let updated = self.client.execute(
            "UPDATE decisions AS d SET seq = t.seq
             FROM UNNEST($1::text[], $2::int8[]) AS t(id, seq)
             WHERE d.id = t.id AND d.seq IS NULL",
            &[&ids, &seqs],
        )?;
        Ok(updated as usize)
    }

    fn top(&mut self, channel: &str) -> Result<u64, StorageError> {
        let row = self.client.query_one(
            "SELECT COALESCE(MAX(seq), 0) FROM decisions WHERE channel = $1",
            &[&channel],
        )?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    fn unnumbered(&mut self, before_ms: i64, limit: usize) -> Result<Vec<Record>, StorageError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM decisions WHERE seq IS NULL AND created_ms < $1
             ORDER BY created_ms LIMIT $2"
        );
        let limit = limit.min(i64::MAX as usize) as i64;
        let rows = self.client.query(&sql, &[&before_ms, &limit])?;
        Ok(rows.iter().map(record).collect())
    }

    fn decisions(&mut self, query: &DecisionQuery) -> Result<Vec<Record>, StorageError> {
        let (tail, params) = query.tail(|n| format!("${n}"));
        let params: Vec<Box<dyn ToSql + Sync>> = params
            .into_iter()
            .map(|p| match p {
                Param::Text(s) => Box::new(s) as Box<dyn ToSql + Sync>,
                Param::Int(i) => Box::new(i),
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
        let sql = format!("SELECT {COLUMNS} FROM decisions{tail}");
        Ok(self.client.query(&sql, &refs)?.iter().map(record).collect())
    }
}

/// A decision's columns, in the order [`record`] reads them (JSON columns as their text).
const COLUMNS: &str =
    "id, org, channel, COALESCE(seq, 0), schema, idempotency_key, direction, decision,
    tool, scope, payload_hash, latency_ms, correlation_id, tags::text, data::text, created_ms";

fn record(row: &::postgres::Row) -> Record {
    Record {
        id: row.get(0),
        org: row.get(1),
        channel: row.get(2),
        seq: row.get::<_, i64>(3) as u64,
        schema: row.get(4),
        idempotency_key: row.get(5),
        direction: row.get(6),
        decision: row.get(7),
        tool: row.get(8),
        scope: row.get(9),
        payload_hash: row.get(10),
        latency_ms: row.get(11),
        correlation_id: row.get(12),
        tags: row.get(13),
        data: row.get(14),
        created_ms: row.get(15),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::contract::{self, record};

    /// A schema of a test's own in the test database, dropped when the test ends.
    struct TestSchema {
        url: String,
        schema: String,
        admin: Client,
    }

    impl Drop for TestSchema {
        fn drop(&mut self) {
            let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
            let _ = self.admin.batch_execute(&sql);
        }
    }

    /// A schema of the test's own in the test database, or `None` when PostgreSQL is not
    /// running here (a failure under CI=true, where it must be).
    fn test_database(name: &str) -> Option<TestSchema> {
        let base = std::env::var("SHARDCAST_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let mut admin = match Client::connect(&base, NoTls) {
            Ok(client) => client,
            Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
                eprintln!(
                    "SKIPPED: PostgreSQL not reachable at {base} ({e}); start it to run {name}"
                );
                return None;
            }
            Err(e) => panic!("PostgreSQL must be reachable at {base} under CI=true: {e}"),
        };
        let schema = format!("shardcast_{name}_{}", std::process::id());
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
            ))
            .expect("create test schema");
        let separator = if base.contains('?') { '&' } else { '?' };
        Some(TestSchema {
            url: format!("{base}{separator}options=-csearch_path%3D{schema}"),
            schema,
            admin,
        })
    }

    #[test]
    fn keeps_the_store_contract() {
        let Some(db) = test_database("contract") else {
            return;
        };
        let url = db.url.clone();
        contract::check(&mut || Box::new(Postgres::connect(&url).unwrap()) as Box<dyn Store>);
    }

    #[test]
    fn decisions_committed_without_a_seq_are_found_and_numbered_once() {
        let Some(db) = test_database("unnumbered") else {
            return;
        };
        let mut store = Postgres::connect(&db.url).unwrap();
        let c = "org:acme:decisions";
        let (first, second) = (record("acme", "k1", c, 0), record("acme", "k2", c, 0));
        let numbered = record("acme", "k0", c, 3);
        let outcomes = store.commit(&[&numbered, &first, &second]).unwrap();
        assert!(
            outcomes.iter().all(|o| matches!(o, Outcome::Stored)),
            "{outcomes:?}"
        );
        // The same key again, while its decision has no seq: the original, with seq 0.
        let again = record("acme", "k1", c, 0);
        let outcomes = store
            .commit(&[&Record {
                id: "dec_other".into(),
                ..again
            }])
            .unwrap();
        assert!(
            matches!(&outcomes[..], [Outcome::Duplicate { id, seq: 0 }] if *id == first.id),
            "{outcomes:?}"
        );
        let waiting = store.unnumbered(i64::MAX, 10).unwrap();
        let ids: Vec<&str> = waiting.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, [first.id.as_str(), second.id.as_str()]);
        assert!(store.unnumbered(first.created_ms, 10).unwrap().is_empty());
        // Not in the channel's history nor its maximum until numbered.
        assert_eq!(store.history(c, 0, 100, 10).unwrap().len(), 1);
        assert_eq!(
            store.recover(0, 10).unwrap().channel_seqs,
            [(c.to_string(), 3)]
        );
        assert_eq!(store.number(&[(&first.id, 4)]).unwrap(), 1);
        // Numbered once: a second numbering (another node, later) changes nothing.
        assert_eq!(store.number(&[(&first.id, 9), (&second.id, 5)]).unwrap(), 1);
        let seqs: Vec<u64> = store
            .history(c, 0, 100, 10)
            .unwrap()
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!(store.find("acme", "k1").unwrap().map(|r| r.seq), Some(4));
        assert!(store.unnumbered(i64::MAX, 10).unwrap().is_empty());
        // A seq the channel has already cannot be given twice.
        let third = record("acme", "k3", c, 0);
        store.commit(&[&third]).unwrap();
        assert!(store.number(&[(&third.id, 4)]).is_err());
    }

    #[test]
    fn writer_reports_a_lost_connection_then_reconnects() {
        use crate::storage::{Completion, Request, Writer, WriterConfig};
        let Some(db) = test_database("lost") else {
            return;
        };
        let url = format!(
            "{}&application_name=shardcast_lost_{}",
            db.url,
            std::process::id()
        );
        let config = WriterConfig {
            min_backoff: Duration::from_millis(10),
            ping_interval: Duration::from_secs(3600),
            ..WriterConfig::default()
        };
        let connect_url = url.clone();
        let (writer, _thread) = Writer::spawn(config, move || {
            Ok(Box::new(Postgres::connect(&connect_url)?) as Box<dyn Store>)
        })
        .unwrap();
        let (reply, completions) = flume::unbounded::<Completion>();
        let submit = |n: u64| {
            let record = record("acme", &format!("k{n}"), "org:acme:decisions", n);
            let reply = reply.clone();
            writer
                .submit(Request {
                    record,
                    token: n,
                    reply,
                })
                .unwrap();
            completions.recv().unwrap().outcome
        };
        assert_eq!(submit(1), Outcome::Stored);

        // The server drops the writer's connection: the next commit fails, and says so.
        let mut admin = Client::connect(&url, NoTls).unwrap();
        let killed: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE application_name = current_setting('application_name')
                   AND pid <> pg_backend_pid()",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(killed, 1);
        // pg_terminate_backend only signals: until the backend has exited, a commit may still
        // succeed.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = current_setting('application_name')
                   AND pid <> pg_backend_pid()",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            > 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the backend never exited"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let outcome = submit(2);
        assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
        assert!(!writer.status().ready());
        let mut n = 3;
        while submit(n) != Outcome::Stored {
            n += 1;
        }
        assert!(writer.status().ready());
        assert!(admin
            .query_opt("SELECT 1 FROM decisions WHERE idempotency_key = 'k2'", &[])
            .unwrap()
            .is_none());
    }

    #[test]
    fn an_unreachable_server_is_an_error_not_a_hang() {
        let err = Postgres::connect("postgres://postgres@127.0.0.1:1/test").err();
        assert!(matches!(err, Some(StorageError::Postgres(_))), "{err:?}");
    }
}
