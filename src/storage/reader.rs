//! Reads from the store on threads of their own: replays that reach past a channel's in-memory
//! history, and the decisions API. Reads never wait behind the writer's commits (each reader
//! has its own connection; SQLite in WAL mode lets readers run beside the writer), and a slow
//! query never holds up a shard: the shard hands the read over and is answered later.

use std::thread::JoinHandle;

use super::{Backend, DecisionQuery, Record, StorageError, Store, SubmitError};

/// What to read.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// `(seq, data)` of a channel's stored decisions with `after < seq <= upto`, in order.
    History {
        /// Channel.
        channel: String,
        /// Exclusive lower bound.
        after: u64,
        /// Inclusive upper bound.
        upto: u64,
        /// Most rows.
        limit: usize,
    },
    /// A page of the decisions API.
    Decisions(DecisionQuery),
    /// Up to `limit` decisions committed before `before_ms` and never numbered.
    Unnumbered {
        /// Unix milliseconds.
        before_ms: i64,
        /// Most rows.
        limit: usize,
    },
    /// Keep a token revocation (a write, but rare and off the decisions' commit path).
    Revoke(crate::auth::Revocation),
    /// Change the offline messages (writes that must keep their order: see
    /// `StorageLink::ordered`).
    Offline(super::OfflineOp),
    /// The stored decision with this (org, idempotency key).
    Find {
        /// Organization.
        org: String,
        /// Idempotency key.
        key: String,
    },
}

/// What a read found.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// For [`Query::History`].
    History(Vec<(u64, String)>),
    /// For [`Query::Decisions`].
    Decisions(Vec<Record>),
    /// For [`Query::Find`].
    Found(Option<Box<Record>>),
    /// For [`Query::Unnumbered`].
    Unnumbered(Vec<Record>),
    /// For [`Query::Revoke`] and [`Query::Offline`]: done.
    Done,
}

/// Called with the result, on the reader's thread.
pub type Reply = Box<dyn FnOnce(Result<Answer, String>) + Send>;

struct Job {
    query: Query,
    reply: Reply,
}

/// The handle on the reader threads.
#[derive(Clone)]
pub struct Reader {
    jobs: flume::Sender<Job>,
}

impl Reader {
    /// Start `threads` readers of `backend` with a queue of `capacity` reads; `None` for
    /// "memory", which has nothing to read. A reader connects on its first read and again
    /// after an error; the threads end when every `Reader` clone is dropped.
    pub fn spawn(
        backend: &Backend,
        threads: usize,
        capacity: usize,
    ) -> std::io::Result<Option<(Self, Vec<JoinHandle<()>>)>> {
        let (jobs, inbox) = flume::bounded::<Job>(capacity.max(1));
        let mut handles = Vec::new();
        for n in 0..threads.max(1) {
            let Some(connect) = super::connector(backend.clone()) else {
                return Ok(None);
            };
            let inbox = inbox.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("storage-read-{n}"))
                    .spawn(move || run(connect, &inbox))?,
            );
        }
        Ok(Some((Self { jobs }, handles)))
    }

    /// A reader with no thread behind it: reads wait in the returned queue until a test
    /// answers them (the shard simulation's store).
    #[cfg(test)]
    pub(crate) fn detached(capacity: usize) -> (Self, Asked) {
        let (jobs, inbox) = flume::bounded(capacity.max(1));
        (Self { jobs }, Asked(inbox))
    }

    /// Queue a read; refused at once when the readers are that far behind.
    pub fn submit(&self, query: Query, reply: Reply) -> Result<(), SubmitError> {
        self.jobs
            .try_send(Job { query, reply })
            .map_err(|e| match e {
                flume::TrySendError::Full(_) => SubmitError::Full,
                flume::TrySendError::Disconnected(_) => SubmitError::Stopped,
            })
    }
}

/// What was asked of a [`Reader::detached`], for the test to answer.
#[cfg(test)]
pub(crate) struct Asked(flume::Receiver<Job>);

#[cfg(test)]
impl Asked {
    /// The reads asked since the last call, in order, with how to answer each.
    pub fn take(&self) -> Vec<(Query, Reply)> {
        self.0
            .try_iter()
            .map(|job| (job.query, job.reply))
            .collect()
    }
}

fn run(mut connect: super::Connect, inbox: &flume::Receiver<Job>) {
    let mut store: Option<Box<dyn Store>> = None;
    while let Ok(job) = inbox.recv() {
        let result = read(&mut connect, &mut store, &job.query);
        if let Err(e) = &result {
            tracing::warn!("storage read failed: {e}");
            // The connection may be broken: the next read opens a new one.
            store = None;
        }
        (job.reply)(result.map_err(|e| e.to_string()));
    }
}

fn read(
    connect: &mut super::Connect,
    store: &mut Option<Box<dyn Store>>,
    query: &Query,
) -> Result<Answer, StorageError> {
    let db = match store {
        Some(db) => db,
        None => store.insert(connect()?),
    };
    Ok(match query {
        Query::History {
            channel,
            after,
            upto,
            limit,
        } => Answer::History(db.history(channel, *after, *upto, *limit)?),
        Query::Decisions(q) => Answer::Decisions(db.decisions(q)?),
        Query::Unnumbered { before_ms, limit } => {
            Answer::Unnumbered(db.unnumbered(*before_ms, *limit)?)
        }
        Query::Find { org, key } => Answer::Found(db.find(org, key)?.map(Box::new)),
        Query::Revoke(revocation) => {
            db.revoke(revocation)?;
            Answer::Done
        }
        Query::Offline(op) => {
            db.offline(op)?;
            Answer::Done
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::contract::record;
    use crate::storage::{sqlite::Sqlite, Outcome};

    #[test]
    fn reads_what_the_writer_committed_on_a_connection_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let mut db = Sqlite::open(&path).unwrap();
        let rows: Vec<_> = (1..=3)
            .map(|n| record("acme", &format!("k{n}"), "org:acme:decisions", n))
            .collect();
        let refs: Vec<&Record> = rows.iter().collect();
        assert!(db
            .commit(&refs)
            .unwrap()
            .iter()
            .all(|o| *o == Outcome::Stored));
        let (reader, _threads) = Reader::spawn(&Backend::Sqlite(path), 2, 8)
            .unwrap()
            .expect("sqlite has readers");
        let (tx, rx) = flume::bounded(1);
        let query = Query::History {
            channel: "org:acme:decisions".into(),
            after: 1,
            upto: 3,
            limit: 10,
        };
        reader
            .submit(query, Box::new(move |r| drop(tx.send(r))))
            .unwrap();
        let Ok(Answer::History(found)) = rx.recv().unwrap() else {
            panic!("history expected");
        };
        assert_eq!(found.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [2, 3]);
        assert!(Reader::spawn(&Backend::Memory, 1, 1).unwrap().is_none());
    }
}
