//! Opening the configured store at start-up: migrate it, read what the shards need to go on
//! (each channel's highest seq, the recent idempotency keys), and start the writer and reader
//! threads. A database server that is down does not stop start-up: the state is read once it
//! is reached, and decisions are refused until then.

use std::sync::Arc;
use std::time::Duration;

use super::{Backend, Reader, Recovered, StorageError, Writer, WriterConfig};
use crate::config::Config;

/// Reads waiting for a storage reader at most; beyond it a replay goes without the store and
/// the decisions API answers 503.
const READ_QUEUE: usize = 1_024;

/// When the shards learn the store's state.
#[derive(Clone)]
pub enum Recovery {
    /// Read at start-up.
    Now(Arc<Recovered>),
    /// The store was unreachable: announced (once per shard) when it is reached.
    Later(flume::Receiver<Arc<Recovered>>),
}

/// An open store: its writer, its readers, and what the shards need to continue.
pub struct Opened {
    /// The writer's queue.
    pub writer: Writer,
    /// The writer thread (joined at shutdown).
    pub thread: std::thread::JoinHandle<()>,
    /// The readers' queue.
    pub reader: Reader,
    /// One reader's queue, for the store's small writes that must keep their order (offline
    /// messages, revocations).
    pub ordered: Reader,
    /// When the shards learn the store's state.
    pub recovery: Recovery,
}

/// Open the configured store (migrating it and reading what the shards need to continue), and
/// start its writer thread; `None` for "memory".
pub fn open(config: &Config, nshards: usize) -> Result<Option<Opened>, StorageError> {
    let backend = Backend::parse(&config.storage.url)?;
    let what = match &backend {
        Backend::Memory => String::new(),
        Backend::Sqlite(path) => format!("SQLite at {}", path.display()),
        // Not the url: it may hold a password.
        Backend::Postgres(_) => "PostgreSQL".into(),
    };
    let postgres = matches!(backend, Backend::Postgres(_));
    let Some(mut connect) = super::connector(backend.clone()) else {
        tracing::warn!(
            "storage url is \"memory\": decisions are NOT durable, and idempotency keys are \
             forgotten on restart"
        );
        return Ok(None);
    };
    // Keys within the deduplication window, as many as the shards' tables hold.
    let window_ms = config.ingest.dedup_window_secs.saturating_mul(1000);
    let since = crate::decision::unix_ms().saturating_sub(window_ms);
    let since = since.min(i64::MAX as u64) as i64;
    let limit = config.ingest.dedup_max_entries.saturating_mul(nshards);
    // Opened (and migrated) here. A SQLite file that cannot be opened is a mistake to fix, so
    // start-up stops; a database server may just be down, so the server starts without it
    // (decisions refused, not ready) and catches up when it is reached.
    let (first, recovery) = match connect() {
        Ok(mut store) => {
            let recovered = store.recover(since, limit)?;
            tracing::info!("decisions stored in {what}");
            (Some(store), Recovery::Now(Arc::new(recovered)))
        }
        Err(e) if postgres => {
            tracing::error!(
                "{what} unreachable at start-up ({e}): starting without it; decisions are \
                 refused (storage_unavailable) until it is reached"
            );
            let (announce, later) = flume::unbounded();
            let connect = super::connector(backend.clone());
            std::thread::Builder::new()
                .name("storage-recover".into())
                .spawn(move || recover_later(connect, since, limit, nshards, &announce))
                .map_err(StorageError::Io)?;
            (None, Recovery::Later(later))
        }
        Err(e) => return Err(e),
    };
    // The writer starts with that connection, and reconnects through `connect` after failures.
    let mut first = first;
    let connect = move || first.take().map_or_else(&mut connect, Ok);
    let writer_config = WriterConfig {
        queue_capacity: config.storage.queue_capacity,
        max_batch: config.storage.max_batch,
        retention: (config.storage.retention_days > 0)
            .then(|| Duration::from_secs(config.storage.retention_days * 86_400)),
        ..WriterConfig::default()
    };
    let (writer, thread) = Writer::spawn(writer_config, connect).map_err(StorageError::Io)?;
    // Readers connect on their first read (their threads end with the process).
    let reader = Reader::spawn(&backend, config.storage.readers, READ_QUEUE)
        .map_err(StorageError::Io)?
        .map(|(reader, _threads)| reader);
    let ordered = Reader::spawn(&backend, 1, READ_QUEUE)
        .map_err(StorageError::Io)?
        .map(|(ordered, _thread)| ordered);
    let (Some(reader), Some(ordered)) = (reader, ordered) else {
        return Ok(None);
    };
    Ok(Some(Opened {
        writer,
        thread,
        reader,
        ordered,
        recovery,
    }))
}

/// Reach the store with backoff, read what the shards need, and announce it to each of them.
fn recover_later(
    connect: Option<super::Connect>,
    since: i64,
    limit: usize,
    nshards: usize,
    announce: &flume::Sender<Arc<Recovered>>,
) {
    let Some(mut connect) = connect else { return };
    let mut backoff = Duration::from_millis(100);
    loop {
        match connect().and_then(|mut store| store.recover(since, limit)) {
            Ok(recovered) => {
                tracing::info!("decision store reached: taking decisions");
                let recovered = Arc::new(recovered);
                for _ in 0..nshards {
                    let _ = announce.send(recovered.clone());
                }
                return;
            }
            Err(e) => {
                tracing::debug!("decision store still unreachable: {e}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
