//! The embedded store: one SQLite file in WAL mode, migrated on open.
//!
//! `synchronous = FULL`: a commit returns only once the WAL is on disk, so an ACK sent after it
//! survives a crash of the process or of the machine.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    DecisionQuery, OfflineOp, OfflineRow, Outcome, Param, RecentKey, Record, Recovered,
    StorageError, Store,
};
use crate::auth::Revocation;

/// Versioned migrations, applied in order; a database remembers which it has.
const MIGRATIONS: &[(u32, &str)] = &[
    (
        1,
        include_str!("../../migrations/sqlite/0001_decisions.sql"),
    ),
    (
        2,
        include_str!("../../migrations/sqlite/0002_revocations.sql"),
    ),
    (3, include_str!("../../migrations/sqlite/0003_offline.sql")),
];

/// A SQLite database of decisions.
pub struct Sqlite {
    conn: Connection,
}

impl Sqlite {
    /// Open (creating the file and its directory if needed) and migrate.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let mut db = Self { conn };
        db.migrate()?;
        Ok(db)
    }

    fn migrate(&mut self) -> Result<(), StorageError> {
        self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 applied_ms INTEGER NOT NULL
             )",
        )?;
        let current = Store::version(self)?;
        for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql).map_err(|e| StorageError::Migration {
                version,
                message: e.to_string(),
            })?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_ms) VALUES (?1, ?2)",
                params![version, crate::decision::unix_ms() as i64],
            )?;
            tx.commit()?;
            tracing::info!(version, "applied storage migration");
        }
        Ok(())
    }
}

/// Why SQLite holds no decision without a seq.
const UNNUMBERED: &str =
    "SQLite stores decisions numbered on one node; decisions numbered after their commit \
     (cluster mode) need PostgreSQL";

impl Store for Sqlite {
    fn commit(&mut self, batch: &[&Record]) -> Result<Vec<Outcome>, StorageError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO decisions (id, org, channel, seq, schema, idempotency_key,
                     direction, decision, tool, scope, payload_hash, latency_ms,
                     correlation_id, tags, data, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
                 ON CONFLICT (org, idempotency_key) DO NOTHING",
            )?;
            let mut original = tx.prepare_cached(
                "SELECT id, seq FROM decisions WHERE org = ?1 AND idempotency_key = ?2",
            )?;
            for r in batch {
                let inserted = insert.execute(params![
                    r.id,
                    r.org,
                    r.channel,
                    r.seq as i64,
                    r.schema,
                    r.idempotency_key,
                    r.direction,
                    r.decision,
                    r.tool,
                    r.scope,
                    r.payload_hash,
                    r.latency_ms,
                    r.correlation_id,
                    r.tags,
                    r.data,
                    r.created_ms,
                ])?;
                outcomes.push(if inserted == 1 {
                    Outcome::Stored
                } else {
                    let (id, seq) = original
                        .query_row(params![r.org, r.idempotency_key], |row| {
                            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64))
                        })?;
                    Outcome::Duplicate { id, seq }
                });
            }
        }
        tx.commit()?;
        Ok(outcomes)
    }

    fn ping(&mut self) -> Result<(), StorageError> {
        self.conn.query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }

    fn trim(&mut self, before_ms: i64, limit: usize) -> Result<usize, StorageError> {
        Ok(self.conn.execute(
            "DELETE FROM decisions WHERE rowid IN
                 (SELECT rowid FROM decisions WHERE created_ms < ?1 LIMIT ?2)",
            params![before_ms, limit as i64],
        )?)
    }

    fn version(&mut self) -> Result<u32, StorageError> {
        Ok(self.conn.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |row| row.get(0),
        )?)
    }

    fn recover(&mut self, since_ms: i64, limit: usize) -> Result<Recovered, StorageError> {
        let mut stmt = self
            .conn
            .prepare("SELECT channel, MAX(seq) FROM decisions GROUP BY channel")?;
        let channel_seqs = stmt
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)? as u64))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut stmt = self.conn.prepare(
            "SELECT org, idempotency_key, channel, id, seq FROM decisions
             WHERE created_ms >= ?1 ORDER BY created_ms DESC LIMIT ?2",
        )?;
        let recent = stmt
            .query_map(params![since_ms, limit as i64], |row| {
                Ok(RecentKey {
                    org: row.get(0)?,
                    key: row.get(1)?,
                    channel: row.get(2)?,
                    id: row.get(3)?,
                    seq: row.get::<_, i64>(4)? as u64,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut stmt = self.conn.prepare(
            "SELECT kind, value, org, at_ms, until_ms FROM revocations WHERE until_ms > ?1",
        )?;
        let rows = stmt.query_map(params![crate::decision::unix_ms() as i64], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, i64>(4)?,
            ))
        })?;
        let mut revocations = Vec::new();
        for row in rows {
            let (kind, value, org, at, until) = row?;
            revocations.extend(super::revocation(&kind, value, org, at, until));
        }
        let mut stmt = self.conn.prepare(
            "SELECT id, ord, user_id, org, channel, seq, data, created_ms, expires_ms
             FROM offline_messages WHERE expires_ms > ?1 ORDER BY created_ms, ord",
        )?;
        let offline = stmt
            .query_map(params![crate::decision::unix_ms() as i64], |row| {
                let org: String = row.get(3)?;
                Ok(OfflineRow {
                    id: row.get(0)?,
                    ord: row.get(1)?,
                    user: row.get(2)?,
                    org: (!org.is_empty()).then_some(org),
                    channel: row.get(4)?,
                    seq: row.get::<_, i64>(5)? as u64,
                    data: row.get(6)?,
                    created_ms: row.get(7)?,
                    expires_ms: row.get(8)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
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
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM revocations WHERE until_ms <= ?1", params![now])?;
        tx.execute(
            "INSERT INTO revocations (kind, value, org, at_ms, until_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (kind, value, org) DO UPDATE
             SET at_ms = max(at_ms, excluded.at_ms), until_ms = max(until_ms, excluded.until_ms)",
            params![kind, value, org, at, until],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn offline(&mut self, op: &OfflineOp) -> Result<(), StorageError> {
        let tx = self.conn.transaction()?;
        match op {
            OfflineOp::Keep { row, dropped } => {
                let now = crate::decision::unix_ms() as i64;
                tx.execute(
                    "DELETE FROM offline_messages WHERE expires_ms <= ?1",
                    params![now],
                )?;
                for id in dropped {
                    tx.execute("DELETE FROM offline_messages WHERE id = ?1", params![id])?;
                }
                tx.execute(
                    "INSERT OR IGNORE INTO offline_messages
                     (id, ord, user_id, org, channel, seq, data, created_ms, expires_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    params![
                        row.id,
                        row.ord,
                        row.user,
                        row.org.as_deref().unwrap_or(""),
                        row.channel,
                        row.seq as i64,
                        row.data,
                        row.created_ms,
                        row.expires_ms
                    ],
                )?;
            }
            OfflineOp::Clear { user, org: None } => {
                tx.execute(
                    "DELETE FROM offline_messages WHERE user_id = ?1",
                    params![user],
                )?;
            }
            OfflineOp::Clear {
                user,
                org: Some(org),
            } => {
                tx.execute(
                    "DELETE FROM offline_messages WHERE user_id = ?1 AND org = ?2",
                    params![user, org],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn find(&mut self, org: &str, key: &str) -> Result<Option<Record>, StorageError> {
        let sql =
            format!("SELECT {COLUMNS} FROM decisions WHERE org = ?1 AND idempotency_key = ?2");
        Ok(self
            .conn
            .query_row(&sql, params![org, key], record)
            .optional()?)
    }

    fn history(
        &mut self,
        channel: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StorageError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, data FROM decisions WHERE channel = ?1 AND seq > ?2 AND seq <= ?3
             ORDER BY seq LIMIT ?4",
        )?;
        let rows = stmt.query_map(
            params![channel, after as i64, upto as i64, limit as i64],
            |row| Ok((row.get::<_, i64>(0)? as u64, row.get(1)?)),
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One node numbers before it commits; cluster mode refuses SQLite.
    fn number(&mut self, _numbered: &[(&str, u64)]) -> Result<usize, StorageError> {
        Err(StorageError::Unsupported(UNNUMBERED))
    }

    fn top(&mut self, channel: &str) -> Result<u64, StorageError> {
        let top: i64 = self.conn.query_row(
            "SELECT COALESCE(MAX(seq), 0) FROM decisions WHERE channel = ?1",
            [channel],
            |row| row.get(0),
        )?;
        Ok(top as u64)
    }

    fn unnumbered(&mut self, _before: i64, _limit: usize) -> Result<Vec<Record>, StorageError> {
        Err(StorageError::Unsupported(UNNUMBERED))
    }

    fn decisions(&mut self, query: &DecisionQuery) -> Result<Vec<Record>, StorageError> {
        let (tail, params) = query.tail(|n| format!("?{n}"));
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM decisions{tail}"))?;
        let values = params.into_iter().map(|p| match p {
            Param::Text(s) => rusqlite::types::Value::Text(s),
            Param::Int(i) => rusqlite::types::Value::Integer(i),
        });
        let rows = stmt.query_map(rusqlite::params_from_iter(values), record)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// A decision's columns, in the order [`record`] reads them.
const COLUMNS: &str = "id, org, channel, seq, schema, idempotency_key, direction, decision,
    tool, scope, payload_hash, latency_ms, correlation_id, tags, data, created_ms";

fn record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        id: row.get(0)?,
        org: row.get(1)?,
        channel: row.get(2)?,
        seq: row.get::<_, i64>(3)? as u64,
        schema: row.get(4)?,
        idempotency_key: row.get(5)?,
        direction: row.get(6)?,
        decision: row.get(7)?,
        tool: row.get(8)?,
        scope: row.get(9)?,
        payload_hash: row.get(10)?,
        latency_ms: row.get(11)?,
        correlation_id: row.get(12)?,
        tags: row.get(13)?,
        data: row.get(14)?,
        created_ms: row.get(15)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::contract::{self, record};
    use crate::storage::{Completion, Request, SubmitError, Writer, WriterConfig};
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn keeps_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/shardcast.db");
        contract::check(&mut || Box::new(Sqlite::open(&path).unwrap()) as Box<dyn Store>);
    }

    #[test]
    fn writer_group_commits_and_answers_every_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        // The writer connects only once every request is queued: they must all share a commit.
        let (gate, held) = flume::bounded::<()>(0);
        let (writer, thread) = Writer::spawn(WriterConfig::default(), move || {
            let _ = held.recv();
            Ok(Box::new(Sqlite::open(&path)?) as Box<dyn Store>)
        })
        .unwrap();
        let (reply, completions) = flume::unbounded::<Completion>();
        for n in 0..1000u64 {
            let key = format!("k{}", n % 500); // every key twice
            let record = record("acme", &key, "org:acme:decisions", n + 1);
            writer
                .submit(Request {
                    record,
                    token: n,
                    reply: reply.clone(),
                })
                .unwrap();
        }
        drop(gate);
        let mut stored = 0;
        let mut duplicates = 0;
        for expected in 0..1000u64 {
            let c = completions.recv().unwrap();
            assert_eq!(c.token, expected, "completions come back in order");
            match c.outcome {
                Outcome::Stored => stored += 1,
                Outcome::Duplicate { seq, .. } => {
                    assert_eq!(seq, expected + 1 - 500);
                    duplicates += 1;
                }
                Outcome::Unavailable(reason) | Outcome::Failed(reason) => panic!("{reason}"),
            }
        }
        assert_eq!((stored, duplicates), (500, 500));
        assert_eq!(
            writer.status().commits(),
            1,
            "one transaction for the whole group"
        );
        assert!(writer.status().ready());
        drop(writer);
        thread.join().unwrap();
    }

    #[test]
    fn writer_answers_unavailable_while_the_store_is_down_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let up = std::sync::Arc::new(AtomicBool::new(false));
        let (connect_path, connect_up) = (path.clone(), up.clone());
        let config = WriterConfig {
            min_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            ..WriterConfig::default()
        };
        let (writer, _thread) = Writer::spawn(config, move || {
            if !connect_up.load(Ordering::Relaxed) {
                return Err(StorageError::Io(std::io::Error::other("database is down")));
            }
            Ok(Box::new(Sqlite::open(&connect_path)?) as Box<dyn Store>)
        })
        .unwrap();
        let (reply, completions) = flume::unbounded::<Completion>();
        let submit = |n: u64| {
            let record = record("acme", &format!("k{n}"), "org:acme:decisions", n);
            writer
                .submit(Request {
                    record,
                    token: n,
                    reply: reply.clone(),
                })
                .unwrap();
        };
        submit(1);
        let down = completions.recv().unwrap();
        assert!(
            matches!(&down.outcome, Outcome::Unavailable(r) if r.contains("database is down")),
            "{down:?}"
        );
        assert!(!writer.status().ready());
        assert!(writer.status().reason().contains("database is down"));

        up.store(true, Ordering::Relaxed);
        let mut n = 2;
        loop {
            submit(n);
            match completions.recv().unwrap().outcome {
                Outcome::Stored => break,
                Outcome::Unavailable(_) => n += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(writer.status().ready());
        assert!(Sqlite::open(&path)
            .unwrap()
            .find("acme", &format!("k{n}"))
            .unwrap()
            .is_some());
    }

    #[test]
    fn writer_deletes_decisions_past_retention() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let mut old = record("acme", "old", "org:acme:decisions", 1);
        old.created_ms = 1_000; // 1970
        Sqlite::open(&path).unwrap().commit(&[&old]).unwrap();
        let config = WriterConfig {
            retention: Some(Duration::from_secs(86_400)),
            ..WriterConfig::default()
        };
        let connect_path = path.clone();
        let (writer, thread) = Writer::spawn(config, move || {
            Ok(Box::new(Sqlite::open(&connect_path)?) as Box<dyn Store>)
        })
        .unwrap();
        // The writer trims as soon as it is connected, before it takes its first batch.
        let (reply, completions) = flume::unbounded::<Completion>();
        let mut new = record("acme", "new", "org:acme:decisions", 2);
        new.created_ms = crate::decision::unix_ms() as i64;
        writer
            .submit(Request {
                record: new,
                token: 1,
                reply,
            })
            .unwrap();
        assert_eq!(completions.recv().unwrap().outcome, Outcome::Stored);
        writer.stop();
        thread.join().unwrap();
        let mut db = Sqlite::open(&path).unwrap();
        assert_eq!(db.find("acme", "old").unwrap(), None);
        assert!(db.find("acme", "new").unwrap().is_some());
    }

    #[test]
    fn a_full_queue_refuses_instead_of_growing() {
        // The writer is held inside `connect` until the gate closes: nothing leaves the queue.
        let (gate, held) = flume::bounded::<()>(0);
        let (writer, thread) = Writer::spawn(
            WriterConfig {
                queue_capacity: 2,
                ..WriterConfig::default()
            },
            move || {
                let _ = held.recv();
                Err(StorageError::Io(std::io::Error::other("slow")))
            },
        )
        .unwrap();
        let (reply, _completions) = flume::unbounded::<Completion>();
        let results: Vec<_> = (0..3)
            .map(|n| {
                writer.submit(Request {
                    record: record("acme", &format!("k{n}"), "c", n),
                    token: n,
                    reply: reply.clone(),
                })
            })
            .collect();
        assert_eq!(results[..2], [Ok(()), Ok(())]);
        assert_eq!(results[2], Err(SubmitError::Full));
        drop(gate);
        drop(writer);
        thread.join().unwrap();
    }
}
