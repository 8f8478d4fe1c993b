//! Durable decisions: the stores, the thread that group-commits to them, and their readers.
//!
//! Shards never touch a database. A shard hands each decision to the [`Writer`] over a bounded
//! flume channel and gets the [`Outcome`] back on a channel of its own. The writer runs on a
//! thread of its own: it takes everything that is waiting as one batch and commits it in one
//! transaction (group commit), so the cost of a commit is shared by every decision that arrived
//! while the previous one ran. When the store is down, every request gets
//! [`Outcome::Unavailable`] at once (never a false "stored"), the writer reconnects with
//! backoff, and a full queue refuses new work instead of growing.
//!
//! Reads (replays that reach past a channel's in-memory history, the decisions API) run on
//! [`Reader`] threads with connections of their own, so they never wait behind a commit.
//!
//! The shard side (numbering, holding a decision's ACK and frame until its commit, answering
//! duplicates and refusals) is `Shard::ingest` and `Shard::stored`; start-up (open, migrate,
//! recover the channels' seqs, or start without an unreachable PostgreSQL and recover later)
//! is `server::open_storage`.

mod open;
pub mod postgres;
pub mod reader;
pub mod sqlite;

pub use open::{open, Opened, Recovery};
pub use reader::Reader;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::auth::{Revocation, Revoked};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The `[storage] url` is not one we know.
    #[error(
        "unsupported storage url {0:?}: use \"memory\", \"sqlite://PATH\" or \"postgres://…\""
    )]
    Url(String),
    /// SQLite said no.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL said no (or could not be reached).
    #[error("postgres: {}", with_sources(.0))]
    Postgres(#[from] ::postgres::Error),
    /// The database answered something that cannot be.
    #[error("inconsistent storage: {0}")]
    Inconsistent(String),
    /// A file or directory could not be made.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// This store does not do what was asked.
    #[error("{0}")]
    Unsupported(&'static str),
    /// A migration could not be applied.
    #[error("migration {version}: {message}")]
    Migration {
        /// The migration's version.
        version: u32,
        /// What went wrong.
        message: String,
    },
}

/// An error and its causes on one line ("db error" alone says little).
fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Where decisions are kept, from `[storage] url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Nowhere: nothing survives a restart (benchmarks).
    Memory,
    /// An embedded SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL server (connection string as given).
    Postgres(String),
}

impl Backend {
    /// Parse a storage url.
    pub fn parse(url: &str) -> Result<Self, StorageError> {
        if url == "memory" {
            Ok(Self::Memory)
        } else if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StorageError::Url(url.into()));
            }
            Ok(Self::Sqlite(PathBuf::from(path)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(url.into()))
        } else {
            Err(StorageError::Url(url.into()))
        }
    }
}

/// One decision as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The decision id sent to clients (`dec_…`).
    pub id: String,
    /// Organization.
    pub org: String,
    /// Channel it was ingested on.
    pub channel: String,
    /// The channel's sequence number for it.
    pub seq: u64,
    /// Schema name (`decision.v1`).
    pub schema: String,
    /// The client's idempotency key.
    pub idempotency_key: String,
    /// precheck or postcheck.
    pub direction: String,
    /// The outcome (allow, deny, …).
    pub decision: String,
    /// Tool the decision is about, when given.
    pub tool: Option<String>,
    /// Scope, when given.
    pub scope: Option<String>,
    /// Hash of the governed payload.
    pub payload_hash: String,
    /// How long the decision took, when given.
    pub latency_ms: Option<f64>,
    /// Correlation id, when given.
    pub correlation_id: Option<String>,
    /// Tags as a JSON array, when given.
    pub tags: Option<String>,
    /// The whole `data` object as fanned out (JSON).
    pub data: String,
    /// Server time of acceptance, Unix milliseconds.
    pub created_ms: i64,
}

/// What became of one submitted decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed.
    Stored,
    /// The (org, idempotency key) was already stored: the original's id and seq.
    Duplicate {
        /// The original decision's id.
        id: String,
        /// The original decision's seq.
        seq: u64,
    },
    /// Not stored: the store was down, so nothing was attempted (the reason, for logs).
    Unavailable(String),
    /// Not acknowledged: the commit failed. If the connection was lost during the commit
    /// the rows may still be there, so nothing of the batch may be reused.
    Failed(String),
}

/// The answer to one request, sent back to the shard that asked.
#[derive(Debug)]
pub struct Completion {
    /// The shard's token for the request.
    pub token: u64,
    /// What became of it.
    pub outcome: Outcome,
}

/// A decision to store, and where to say what became of it.
pub struct Request {
    /// The decision.
    pub record: Record,
    /// Returned in the completion.
    pub token: u64,
    /// The asking shard's completion channel.
    pub reply: flume::Sender<Completion>,
}

/// What a store knows at start-up, for the shards.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Highest stored seq of each channel, so sequences continue after a restart.
    pub channel_seqs: Vec<(String, u64)>,
    /// The newest idempotency keys, newest first, to warm the shards' caches: a known key must
    /// not be fanned out again before the database could say so (ack = "received").
    pub recent: Vec<RecentKey>,
    /// The token revocations still in force.
    pub revocations: Vec<Revocation>,
    /// The messages kept for users not connected, not expired, oldest first.
    pub offline: Vec<OfflineRow>,
}

/// A message kept for a user who is not connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineRow {
    /// Unique: `{boot}-{shard}-{ord}`.
    pub id: String,
    /// Its order among those made in the same millisecond.
    pub ord: i64,
    /// The user (JWT `sub`).
    pub user: String,
    /// Only for the user's connections of this org (`None`: any).
    pub org: Option<String>,
    /// The user's channel it was numbered on.
    pub channel: String,
    /// Its seq there.
    pub seq: u64,
    /// Its data (JSON).
    pub data: String,
    /// When it was kept (Unix ms).
    pub created_ms: i64,
    /// When it is dropped undelivered (Unix ms).
    pub expires_ms: i64,
}

/// A change to the offline messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfflineOp {
    /// Keep `row`, and drop the messages (by id) it pushed out of the user's bounds.
    Keep {
        /// The message.
        row: OfflineRow,
        /// Ids dropped to make room.
        dropped: Vec<String>,
    },
    /// Drop the messages kept for this user (delivered, or deleted through the API): those
    /// sent by `org`, or all.
    Clear {
        /// The user.
        user: String,
        /// Only those sent by this org (`None`: all).
        org: Option<String>,
    },
}

/// A revocation's row key: (kind, value, org), as the `revocations` table has it.
fn revocation_key(revocation: &Revocation) -> (&'static str, &str, &str) {
    match &revocation.what {
        Revoked::Jti(jti) => ("jti", jti, ""),
        Revoked::Sub { sub, org } => ("sub", sub, org.as_deref().unwrap_or("")),
    }
}

/// The revocation of a `revocations` row, if its kind is known.
fn revocation(kind: &str, value: String, org: String, at: i64, until: i64) -> Option<Revocation> {
    let what = match kind {
        "jti" => Revoked::Jti(value.into()),
        "sub" => Revoked::Sub {
            sub: value.into(),
            org: (!org.is_empty()).then(|| org.into()),
        },
        _ => return None,
    };
    Some(Revocation {
        what,
        at_ms: at.max(0) as u64,
        until_ms: until.max(0) as u64,
    })
}

/// A stored decision's identity, for the idempotency cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentKey {
    /// Organization.
    pub org: String,
    /// Idempotency key.
    pub key: String,
    /// Channel (its owner shard keeps the key).
    pub channel: String,
    /// Decision id.
    pub id: String,
    /// Seq on the channel.
    pub seq: u64,
}

/// One org's decisions, filtered, a page at a time (the decisions API).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DecisionQuery {
    /// Organization (always set: nobody reads another org's decisions).
    pub org: String,
    /// Only this channel.
    pub channel: Option<String>,
    /// Only this outcome (allow, deny, …).
    pub decision: Option<String>,
    /// Created at or after, Unix milliseconds.
    pub since_ms: Option<i64>,
    /// Created before, Unix milliseconds.
    pub until_ms: Option<i64>,
    /// Continue after this (created_ms, id): the last row of the previous page.
    pub after: Option<(i64, String)>,
    /// Newest first (else oldest first).
    pub newest_first: bool,
    /// Most rows.
    pub limit: usize,
}

/// A parameter of SQL built at run time.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    Text(String),
    Int(i64),
}

impl DecisionQuery {
    /// The `WHERE … ORDER BY … LIMIT …` of this query and its parameters, with `placeholder(n)`
    /// spelling the n-th parameter (1-based) in the backend's dialect. Every value is a
    /// parameter, never spliced into the text.
    pub(crate) fn tail(&self, placeholder: fn(usize) -> String) -> (String, Vec<Param>) {
        let mut params = vec![Param::Text(self.org.clone())];
        let mut sql = format!(" WHERE org = {}", placeholder(1));
        let mut add = |sql: &mut String, clause: &str, param: Param| {
            params.push(param);
            sql.push_str(&clause.replace('?', &placeholder(params.len())));
        };
        if let Some(channel) = &self.channel {
            add(&mut sql, " AND channel = ?", Param::Text(channel.clone()));
        }
        if let Some(decision) = &self.decision {
            add(&mut sql, " AND decision = ?", Param::Text(decision.clone()));
        }
        if let Some(ms) = self.since_ms {
            add(&mut sql, " AND created_ms >= ?", Param::Int(ms));
        }
        if let Some(ms) = self.until_ms {
            add(&mut sql, " AND created_ms < ?", Param::Int(ms));
        }
        let (cmp, order) = if self.newest_first {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        if let Some((ms, id)) = &self.after {
            // Keyset paging: (created_ms, id) orders every row, so no row is skipped or repeated
            // when rows arrive between pages.
            add(
                &mut sql,
                &format!(" AND (created_ms {cmp} ?"),
                Param::Int(*ms),
            );
            add(&mut sql, " OR (created_ms = ?", Param::Int(*ms));
            add(
                &mut sql,
                &format!(" AND id {cmp} ?))"),
                Param::Text(id.clone()),
            );
        }
        sql.push_str(&format!(" ORDER BY created_ms {order}, id {order}"));
        add(&mut sql, " LIMIT ?", Param::Int(self.limit as i64));
        (sql, params)
    }
}

/// A database the writer commits to (and the readers read from).
pub trait Store: Send {
    /// Store `batch` in one transaction; one outcome per record, in order. An error means
    /// nothing of the batch is stored.
    fn commit(&mut self, batch: &[&Record]) -> Result<Vec<Outcome>, StorageError>;
    /// Check the connection (called when idle, for readiness).
    fn ping(&mut self) -> Result<(), StorageError>;
    /// The schema version the database is at.
    fn version(&mut self) -> Result<u32, StorageError>;
    /// What the shards need at start-up: every channel's highest seq, and up to `limit` of
    /// the newest keys created at or after `since_ms`.
    fn recover(&mut self, since_ms: i64, limit: usize) -> Result<Recovered, StorageError>;
    /// The stored decision with this (org, idempotency key), if any.
    fn find(&mut self, org: &str, key: &str) -> Result<Option<Record>, StorageError>;
    /// Keep `revocation` (until its `until_ms`; [`Store::recover`] returns it), and forget
    /// those past theirs.
    fn revoke(&mut self, revocation: &Revocation) -> Result<(), StorageError>;
    /// Change the messages kept for users who are not connected ([`Store::recover`] returns
    /// those not expired), and forget the expired ones.
    fn offline(&mut self, op: &OfflineOp) -> Result<(), StorageError>;
    /// Delete at most `limit` decisions created before `before_ms`; returns how many went.
    fn trim(&mut self, before_ms: i64, limit: usize) -> Result<usize, StorageError>;
    /// `(seq, data)` of the decisions on `channel` with `after < seq <= upto`, in seq order,
    /// at most `limit`.
    fn history(
        &mut self,
        channel: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StorageError>;
    /// A page of one org's decisions.
    fn decisions(&mut self, query: &DecisionQuery) -> Result<Vec<Record>, StorageError>;
    /// Give decisions committed without a seq (`Record::seq` 0: in a cluster, Redis numbers
    /// a decision after its commit) the seqs they were numbered with; a decision that has
    /// one keeps it. Returns how many were numbered.
    fn number(&mut self, numbered: &[(&str, u64)]) -> Result<usize, StorageError>;
    /// The highest seq of `channel`'s stored decisions (0: none), where its numbering must
    /// go on from when Redis lost it.
    fn top(&mut self, channel: &str) -> Result<u64, StorageError>;
    /// Up to `limit` decisions committed without a seq before `before_ms`, oldest first:
    /// those a node stopped before numbering, for another to number.
    fn unnumbered(&mut self, before_ms: i64, limit: usize) -> Result<Vec<Record>, StorageError>;
}

/// Give committed decisions their seqs. What fails stays unnumbered in the store, where the
/// next node to look numbers it again under the same idempotency key (same seq).
fn number(store: &mut Option<Box<dyn Store>>, numbers: &[(String, u64)]) {
    let numbers: Vec<(&str, u64)> = numbers
        .iter()
        .map(|(id, seq)| (id.as_str(), *seq))
        .collect();
    let result = match store {
        Some(store) => store.number(&numbers),
        None => Err(StorageError::Unsupported("the store is unreachable")),
    };
    if let Err(e) = result {
        tracing::warn!(decisions = numbers.len(), "decisions left unnumbered: {e}");
    }
}

/// Opens a store; called again, with backoff, after a failure.
pub type Connect = Box<dyn FnMut() -> Result<Box<dyn Store>, StorageError> + Send>;

/// How to open `backend`; `None` for "memory", which stores nothing.
pub fn connector(backend: Backend) -> Option<Connect> {
    match backend {
        Backend::Memory => None,
        Backend::Sqlite(path) => Some(Box::new(move || {
            Ok(Box::new(sqlite::Sqlite::open(&path)?) as Box<dyn Store>)
        })),
        Backend::Postgres(url) => Some(Box::new(move || {
            Ok(Box::new(postgres::Postgres::connect(&url)?) as Box<dyn Store>)
        })),
    }
}

/// Whether the store can take writes, for `/health/ready`.
#[derive(Debug, Default)]
pub struct Status {
    ready: AtomicBool,
    reason: Mutex<String>,
    commits: AtomicU64,
}

impl Status {
    /// Transactions committed so far (decisions stored / commits = group commit at work).
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// True while the last attempt to reach the store succeeded.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Why the store is not ready (empty when it is).
    pub fn reason(&self) -> String {
        self.reason.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn set(&self, result: Result<(), String>) {
        let ready = result.is_ok();
        if let Ok(mut reason) = self.reason.lock() {
            *reason = result.err().unwrap_or_default();
        }
        self.ready.store(ready, Ordering::Relaxed);
    }
}

/// Writer settings.
#[derive(Debug, Clone, Copy)]
pub struct WriterConfig {
    /// Requests waiting at most; beyond it submissions are refused.
    pub queue_capacity: usize,
    /// Most records in one transaction.
    pub max_batch: usize,
    /// First reconnection delay; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest reconnection delay.
    pub max_backoff: Duration,
    /// How often an idle writer checks the store.
    pub ping_interval: Duration,
    /// Decisions older than this are deleted (`None`: kept for ever).
    pub retention: Option<Duration>,
    /// How often old decisions are looked for.
    pub trim_interval: Duration,
}

/// Decisions deleted per trimming transaction, so that writes are never held up for long.
const TRIM_CHUNK: usize = 10_000;

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 65_536,
            max_batch: 4_096,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            ping_interval: Duration::from_secs(1),
            retention: None,
            trim_interval: Duration::from_secs(60),
        }
    }
}

/// Why a request was not even queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The write queue is full (the store is slower than the ingest rate).
    #[error("storage write queue is full")]
    Full,
    /// The writer has stopped.
    #[error("storage writer has stopped")]
    Stopped,
}

/// The shards' handle on the storage thread.
#[derive(Clone)]
pub struct Writer {
    requests: flume::Sender<Job>,
    status: Arc<Status>,
}

/// What the writer's queue carries.
// Boxing the request would cost an allocation per decision for the sake of a one-off `Stop`.
#[allow(clippy::large_enum_variant)]
enum Job {
    Write(Request),
    /// Give a committed decision (by id) the seq it was numbered with after its commit.
    Number(String, u64),
    /// Everything queued before it is done: end the thread.
    Stop,
}

impl Writer {
    /// Start the writer thread. `connect` opens the store; it is called again, with backoff,
    /// after a failure. The thread ends when every `Writer` clone is dropped.
    pub fn spawn<F>(config: WriterConfig, connect: F) -> std::io::Result<(Self, JoinHandle<()>)>
    where
        F: FnMut() -> Result<Box<dyn Store>, StorageError> + Send + 'static,
    {
        let (requests, inbox) = flume::bounded(config.queue_capacity.max(1));
        let status = Arc::new(Status::default());
        let thread_status = status.clone();
        let handle = std::thread::Builder::new()
            .name("storage".into())
            .spawn(move || run(config, connect, inbox, &thread_status))?;
        Ok((Self { requests, status }, handle))
    }

    /// Give the committed decision `id` the seq it was numbered with (in a cluster, after its
    /// commit); refused at once when the queue is full.
    pub fn number(&self, id: String, seq: u64) -> Result<(), SubmitError> {
        self.requests
            .try_send(Job::Number(id, seq))
            .map_err(|e| match e {
                flume::TrySendError::Full(_) => SubmitError::Full,
                flume::TrySendError::Disconnected(_) => SubmitError::Stopped,
            })
    }

    /// Queue a decision; refused at once when the queue is full.
    pub fn submit(&self, request: Request) -> Result<(), SubmitError> {
        self.requests
            .try_send(Job::Write(request))
            .map_err(|e| match e {
                flume::TrySendError::Full(_) => SubmitError::Full,
                flume::TrySendError::Disconnected(_) => SubmitError::Stopped,
            })
    }

    /// A writer with no thread behind it: what is submitted waits in the returned queue until
    /// a test answers it (the shard simulation's store).
    #[cfg(test)]
    pub(crate) fn detached(capacity: usize) -> (Self, Submitted) {
        let (requests, inbox) = flume::bounded(capacity.max(1));
        let status = Arc::new(Status::default());
        (Self { requests, status }, Submitted(inbox))
    }

    /// Let the thread finish what is queued, then end (server shutdown). Later submissions
    /// are refused.
    pub fn stop(&self) {
        let _ = self.requests.send(Job::Stop);
    }

    /// Whether the store is reachable.
    pub fn status(&self) -> &Status {
        &self.status
    }
}

/// What was submitted to a [`Writer::detached`], for the test to answer.
#[cfg(test)]
pub(crate) struct Submitted(flume::Receiver<Job>);

#[cfg(test)]
impl Submitted {
    /// The decisions submitted since the last call, in order.
    pub fn take(&self) -> Vec<Request> {
        let jobs = self.0.try_iter();
        let writes = jobs.filter_map(|job| match job {
            Job::Write(request) => Some(request),
            Job::Number(..) | Job::Stop => None,
        });
        writes.collect()
    }
}

fn run<F>(config: WriterConfig, mut connect: F, inbox: flume::Receiver<Job>, status: &Status)
where
    F: FnMut() -> Result<Box<dyn Store>, StorageError>,
{
    let mut store: Option<Box<dyn Store>> = None;
    let mut backoff = config.min_backoff;
    let mut next_attempt = Instant::now();
    let mut next_trim = Instant::now();
    let mut batch: Vec<Request> = Vec::new();
    loop {
        // Connect (or reconnect) no more often than the backoff allows; until then requests
        // are answered Unavailable rather than held.
        if store.is_none() && Instant::now() >= next_attempt {
            match connect() {
                Ok(s) => {
                    store = Some(s);
                    backoff = config.min_backoff;
                    status.set(Ok(()));
                }
                Err(e) => {
                    tracing::warn!("storage unavailable, retrying in {backoff:?}: {e}");
                    status.set(Err(e.to_string()));
                    next_attempt = Instant::now() + backoff;
                    backoff = (backoff * 2).min(config.max_backoff);
                }
            }
        }
        // Retention: one chunk at a time between batches, sooner again while more is left.
        if let (Some(s), Some(retention)) = (store.as_mut(), config.retention) {
            if Instant::now() >= next_trim {
                let before =
                    crate::decision::unix_ms().saturating_sub(retention.as_millis() as u64);
                match s.trim(before as i64, TRIM_CHUNK) {
                    Ok(deleted) => {
                        if deleted > 0 {
                            tracing::info!(deleted, "trimmed decisions past retention");
                        }
                        next_trim = Instant::now();
                        if deleted < TRIM_CHUNK {
                            next_trim += config.trim_interval;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("storage trim failed: {e}");
                        status.set(Err(e.to_string()));
                        store = None;
                        continue;
                    }
                }
            }
        }
        let wait = if store.is_some() {
            let trim = match config.retention {
                Some(_) => next_trim.saturating_duration_since(Instant::now()),
                None => config.ping_interval,
            };
            config.ping_interval.min(trim)
        } else {
            next_attempt.saturating_duration_since(Instant::now())
        };
        let first = match inbox.recv_timeout(wait) {
            Ok(Job::Stop) => return,
            Ok(job) => job,
            Err(flume::RecvTimeoutError::Timeout)
                if config.retention.is_some() && Instant::now() >= next_trim =>
            {
                continue
            }
            Err(flume::RecvTimeoutError::Timeout) => {
                if let Some(s) = store.as_mut() {
                    if let Err(e) = s.ping() {
                        tracing::warn!("storage connection lost: {e}");
                        status.set(Err(e.to_string()));
                        store = None;
                    }
                }
                continue;
            }
            Err(flume::RecvTimeoutError::Disconnected) => return,
        };
        // Group commit: everything that arrived while the last commit ran goes in this one.
        let mut numbers: Vec<(String, u64)> = Vec::new();
        let mut stop = false;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Write(request) => batch.push(request),
                Job::Number(id, seq) => numbers.push((id, seq)),
                Job::Stop => {
                    stop = true;
                    break;
                }
            }
            if batch.len() < config.max_batch {
                next = inbox.try_recv().ok();
            }
        }
        if !numbers.is_empty() {
            number(&mut store, &numbers);
        }
        if batch.is_empty() {
            if stop {
                return;
            }
            continue;
        }
        let outcomes = match store.as_mut() {
            None => Err(Outcome::Unavailable(status.reason())),
            Some(s) => {
                let records: Vec<&Record> = batch.iter().map(|r| &r.record).collect();
                s.commit(&records)
                    .map_err(|e| Outcome::Failed(e.to_string()))
            }
        };
        match outcomes {
            Ok(outcomes) => {
                status.commits.fetch_add(1, Ordering::Relaxed);
                for (request, outcome) in batch.drain(..).zip(outcomes) {
                    let token = request.token;
                    let _ = request.reply.send(Completion { token, outcome });
                }
            }
            Err(outcome) => {
                if let Outcome::Failed(reason) = &outcome {
                    tracing::warn!("storage commit failed: {reason}");
                    status.set(Err(reason.clone()));
                    store = None;
                }
                for request in batch.drain(..) {
                    let outcome = outcome.clone();
                    let token = request.token;
                    let _ = request.reply.send(Completion { token, outcome });
                }
            }
        }
        if stop {
            return;
        }
    }
}

/// What every store must do, checked against each backend by its own tests.
#[cfg(test)]
pub(crate) mod contract {
    use super::*;

    pub(crate) fn record(org: &str, key: &str, channel: &str, seq: u64) -> Record {
        Record {
            id: format!("dec_{org}_{key}_{seq}"),
            org: org.into(),
            channel: channel.into(),
            seq,
            schema: "decision.v1".into(),
            idempotency_key: key.into(),
            direction: "precheck".into(),
            decision: "allow".into(),
            tool: Some("search".into()),
            scope: None,
            payload_hash: "sha256:x".into(),
            latency_ms: Some(1.5),
            correlation_id: None,
            tags: Some(r#"["a"]"#.into()),
            data: r#"{"orgId":"acme"}"#.into(),
            created_ms: 1_700_000_000_000,
        }
    }

    /// Deduplication by (org, key) in a batch and across reconnects, migrations once, seqs
    /// recovered, the exact text of `data` kept, and all-or-nothing batches.
    pub(crate) fn check(open: &mut dyn FnMut() -> Box<dyn Store>) {
        let mut db = open();
        let version = db.version().unwrap();
        assert!(version >= 1, "migrated: {version}");
        let mut a = record("acme", "k1", "org:acme:decisions", 1);
        a.data = r#"{"z":1,  "a":[1.50,"x"]}"#.into();
        let again = record("acme", "k1", "org:acme:decisions", 2);
        let other_org = record("beta", "k1", "org:beta:decisions", 1);
        let outcomes = db.commit(&[&a, &again, &other_org]).unwrap();
        let original = Outcome::Duplicate {
            id: a.id.clone(),
            seq: 1,
        };
        assert_eq!(
            outcomes,
            [Outcome::Stored, original.clone(), Outcome::Stored]
        );
        assert_eq!(db.find("acme", "k1").unwrap(), Some(a.clone()));
        drop(db);

        // Reopened, as after a restart: the database still answers with the original.
        let mut db = open();
        assert_eq!(db.version().unwrap(), version, "migrations run once");
        assert_eq!(db.commit(&[&again]).unwrap(), [original]);
        let mut next = record("acme", "k2", "org:acme:decisions", 2);
        (next.tool, next.latency_ms, next.tags) = (None, None, None);
        assert_eq!(db.commit(&[&next]).unwrap(), [Outcome::Stored]);
        assert_eq!(db.find("acme", "k2").unwrap(), Some(next));
        let recovered = db.recover(0, 2).unwrap();
        let mut seqs = recovered.channel_seqs;
        seqs.sort();
        let expected = [("org:acme:decisions", 2), ("org:beta:decisions", 1)];
        assert_eq!(seqs, expected.map(|(c, s)| (c.to_string(), s)));
        let keys: Vec<_> = recovered
            .recent
            .iter()
            .map(|r| (&*r.org, &*r.key, r.seq))
            .collect();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(keys.contains(&("acme", "k2", 2)), "{keys:?}");
        let future = db.recover(i64::MAX, 10).unwrap();
        assert!(future.recent.is_empty());

        // Revocations in force come back at recovery, the latest of one key kept; spent ones
        // are forgotten.
        let now = crate::decision::unix_ms();
        let sub = |org: Option<&str>, at_ms, until_ms| Revocation {
            what: Revoked::Sub {
                sub: "u1".into(),
                org: org.map(Into::into),
            },
            at_ms,
            until_ms,
        };
        let jti = Revocation {
            what: Revoked::Jti("j1".into()),
            at_ms: now,
            until_ms: now + 60_000,
        };
        for r in [
            sub(Some("acme"), now - 10, now + 60_000),
            sub(Some("acme"), now, now + 60_000),
            sub(None, now - 5, now - 1),
            jti.clone(),
        ] {
            db.revoke(&r).unwrap();
        }
        let mut kept = db.recover(0, 1).unwrap().revocations;
        kept.sort_by_key(|r| matches!(r.what, Revoked::Sub { .. }));
        assert_eq!(kept, [jti, sub(Some("acme"), now, now + 60_000)]);

        // Offline messages: kept in order, those pushed out and cleared gone, expired ones
        // not recovered.
        let now = now as i64;
        let row = |id: &str, ord, org: Option<&str>, expires_ms| OfflineRow {
            id: id.into(),
            ord,
            user: "u1".into(),
            org: org.map(Into::into),
            channel: "user:u1:notifications".into(),
            seq: ord as u64,
            data: format!(r#"{{"n": {ord}}}"#),
            created_ms: now,
            expires_ms,
        };
        let keep = |row, dropped: &[&str]| OfflineOp::Keep {
            row,
            dropped: dropped.iter().map(|d| d.to_string()).collect(),
        };
        db.offline(&keep(row("a", 1, Some("acme"), now + 60_000), &[]))
            .unwrap();
        db.offline(&keep(row("b", 2, None, now + 60_000), &[]))
            .unwrap();
        db.offline(&keep(row("c", 3, Some("acme"), now + 60_000), &["a"]))
            .unwrap();
        db.offline(&keep(row("d", 4, Some("acme"), now - 1), &[]))
            .unwrap();
        let offline = db.recover(0, 1).unwrap().offline;
        assert_eq!(
            offline,
            [
                row("b", 2, None, now + 60_000),
                row("c", 3, Some("acme"), now + 60_000)
            ]
        );
        let clear = |org: Option<&str>| OfflineOp::Clear {
            user: "u1".into(),
            org: org.map(Into::into),
        };
        db.offline(&clear(Some("acme"))).unwrap();
        assert_eq!(
            db.recover(0, 1).unwrap().offline,
            [row("b", 2, None, now + 60_000)]
        );
        db.offline(&clear(None)).unwrap();
        assert!(db.recover(0, 1).unwrap().offline.is_empty());

        // A batch that cannot be stored whole stores nothing.
        let fine = record("acme", "k3", "org:acme:decisions", 3);
        let clash = record("acme", "k4", "org:acme:decisions", 3);
        assert!(db.commit(&[&fine, &clash]).is_err());
        assert_eq!(db.find("acme", "k3").unwrap(), None);

        // Retention: only what is older than the cut goes, a chunk at a time.
        let mut old = record("acme", "old", "org:acme:decisions", 10);
        old.created_ms = 1_000;
        let mut older = record("acme", "older", "org:acme:decisions", 11);
        older.created_ms = 500;
        db.commit(&[&old, &older]).unwrap();
        assert_eq!(db.trim(2_000, 1).unwrap(), 1);
        assert_eq!(db.trim(2_000, 10).unwrap(), 1);
        assert_eq!(db.trim(2_000, 10).unwrap(), 0);
        assert_eq!(db.find("acme", "old").unwrap(), None);
        assert!(db.find("acme", "k2").unwrap().is_some());

        // History of a channel by seq, for replay.
        let channel = "org:acme:decisions";
        let history = db.history(channel, 0, 100, 10).unwrap();
        let seqs: Vec<u64> = history.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, [1, 2]);
        assert_eq!(
            history[0].1, a.data,
            "data comes back as stored, byte for byte"
        );
        assert_eq!(db.history(channel, 1, 1, 10).unwrap(), []);
        assert_eq!(db.history(channel, 0, 100, 1).unwrap().len(), 1);

        // The decisions API: one org, filters, keyset pages in both orders.
        for n in 0..5 {
            let mut r = record("query", &format!("q{n}"), "org:query:decisions", n + 1);
            r.created_ms = 10_000 + (n as i64 / 2) * 1_000; // pairs share a millisecond
            r.decision = if n % 2 == 0 { "allow" } else { "deny" }.into();
            if n == 4 {
                r.channel = "org:query:other".into();
                r.seq = 1;
            }
            db.commit(&[&r]).unwrap();
        }
        let keys = |rows: &[Record]| -> Vec<String> {
            rows.iter().map(|r| r.idempotency_key.clone()).collect()
        };
        let mut query = DecisionQuery {
            org: "query".into(),
            limit: 2,
            ..DecisionQuery::default()
        };
        let mut pages = Vec::new();
        loop {
            let page = db.decisions(&query).unwrap();
            let Some(last) = page.last() else { break };
            query.after = Some((last.created_ms, last.id.clone()));
            pages.push(keys(&page));
        }
        assert_eq!(pages, [vec!["q0", "q1"], vec!["q2", "q3"], vec!["q4"]]);
        query.newest_first = true;
        query.after = None;
        query.limit = 10;
        let newest = keys(&db.decisions(&query).unwrap());
        assert_eq!(newest, ["q4", "q3", "q2", "q1", "q0"]);
        let filtered = DecisionQuery {
            org: "query".into(),
            channel: Some("org:query:decisions".into()),
            decision: Some("allow".into()),
            since_ms: Some(10_000),
            until_ms: Some(12_000),
            limit: 10,
            ..DecisionQuery::default()
        };
        assert_eq!(keys(&db.decisions(&filtered).unwrap()), ["q0", "q2"]);
        let nobody = DecisionQuery {
            org: "nobody".into(),
            limit: 10,
            ..DecisionQuery::default()
        };
        assert!(db.decisions(&nobody).unwrap().is_empty());
    }
}
