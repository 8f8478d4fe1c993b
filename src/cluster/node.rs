//! A node's Redis threads, started before its shards: per Redis instance a link (publishes
//! and history reads) and a PUB/SUB subscriber, and per shard the channels their answers come
//! back on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::client::Retention;
use super::link::{self, Completion, Link};
use super::pubsub::{self, Incoming, Subscriber, Wants};
use crate::config::Config;
use crate::storage;

/// Messages from PUB/SUB waiting for one shard; past it they are dropped and the shard
/// fills the gap from the history.
const INCOMING_CAPACITY: usize = 65_536;

/// One Redis instance of the cluster, as a shard sees it.
pub struct Instance {
    /// Where the link takes requests.
    pub link: flume::Sender<link::Request>,
    /// What the node wants from its PUB/SUB.
    pub wants: Wants,
}

use crate::config::redacted;

/// Where a channel Redis has no numbering for goes on from: the highest seq of its decisions
/// in the store (`None` for "memory", which keeps none), read on a connection of its own.
fn floors(storage_url: &str) -> Option<link::Floors> {
    let connect = storage::Backend::parse(storage_url)
        .ok()
        .and_then(storage::connector)?;
    let state: Mutex<(storage::Connect, Option<Box<dyn storage::Store>>)> =
        Mutex::new((connect, None));
    let read = move |channel: &str| {
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let (connect, store) = &mut *state;
        let store_now = match store {
            Some(s) => s,
            None => store.insert(connect().map_err(|e| e.to_string())?),
        };
        store_now.top(channel).map_err(|e| {
            // The connection may be broken: the next read opens a new one.
            *store = None;
            e.to_string()
        })
    };
    Some(link::Floors(Arc::new(read)))
}

/// What one shard is handed.
pub struct ShardSide {
    /// The Redis instances, in the order of `cluster.redis_url`.
    pub instances: Vec<Instance>,
    /// Answers of every link.
    pub completions: flume::Receiver<Completion>,
    /// What every PUB/SUB connection heard for the channels this shard owns.
    pub incoming: flume::Receiver<Incoming>,
}

/// What a node's Redis threads have done, for health and metrics.
#[derive(Debug)]
pub struct Stats {
    /// The node's name.
    pub node_id: String,
    /// Per Redis instance: its URL, its link's and its PUB/SUB side's figures.
    pub instances: Vec<(String, Arc<link::Stats>, Arc<pubsub::Stats>)>,
}

impl Stats {
    /// Why the node cannot deliver across nodes now, if it cannot: the first Redis whose
    /// link or PUB/SUB connection is down.
    pub fn unavailable(&self) -> Option<String> {
        use std::sync::atomic::Ordering::Relaxed;
        self.instances.iter().find_map(|(url, link, pubsub)| {
            if !pubsub.up.load(Relaxed) {
                Some(format!("no PUB/SUB connection to {url}"))
            } else if !link.up.load(Relaxed) {
                Some(format!("cannot publish through {url}"))
            } else {
                None
            }
        })
    }
}

/// The node's Redis threads.
pub struct Node {
    urls: Vec<String>,
    links: Vec<Link>,
    subscribers: Vec<Subscriber>,
}

impl Node {
    /// Start the threads of node `boot` (its boot id in hex) for `nshards` shards, whose
    /// owner of a channel is `route`.
    pub fn start(
        config: &Config,
        boot: &str,
        nshards: usize,
        route: pubsub::Route,
    ) -> std::io::Result<(Self, Vec<ShardSide>)> {
        let cluster = &config.cluster;
        let timeout = Duration::from_millis(cluster.timeout_ms);
        let backoff = Duration::from_millis(100);
        let retention = Retention {
            history_size: config.history.size,
            history_ttl_s: config.history.ttl_secs,
            meta_ttl_s: cluster.meta_ttl_secs,
            result_ttl_s: cluster.result_ttl_secs,
            kept: match &config.offline {
                o if o.enabled => crate::cluster::client::KeptBounds {
                    messages: o.max_messages,
                    bytes: o.max_bytes,
                    total_bytes: o.max_total_bytes,
                },
                _ => Default::default(),
            },
        };
        let floors = floors(&config.storage.url);
        let (completion_tx, completion_rx): (Vec<_>, Vec<_>) =
            (0..nshards).map(|_| flume::unbounded()).unzip();
        let (incoming_tx, incoming_rx): (Vec<_>, Vec<_>) = (0..nshards)
            .map(|_| flume::bounded(INCOMING_CAPACITY))
            .unzip();
        let mut node = Node {
            urls: cluster.redis_url.iter().map(|u| redacted(u)).collect(),
            links: Vec::new(),
            subscribers: Vec::new(),
        };
        for (redis, url) in cluster.redis_url.iter().enumerate() {
            let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let settings = link::Settings {
                url: url.clone(),
                prefix: cluster.prefix.clone(),
                retention: retention.clone(),
                timeout,
                backoff,
                probe: Duration::from_millis(cluster.probe_interval_ms),
                suspect: Arc::clone(&lost),
                floors: floors.clone(),
                node: boot.to_owned(),
                presence_ttl_ms: config.presence.ttl_ms,
                session_ttl_ms: config.sessions.lock_ttl_ms,
            };
            node.links
                .push(Link::spawn(settings, completion_tx.clone())?);
            let settings = pubsub::Settings {
                url: url.clone(),
                prefix: cluster.prefix.clone(),
                probe_interval: Duration::from_millis(cluster.probe_interval_ms),
                timeout,
                backoff,
                lost,
                redis,
                node: boot.to_owned(),
            };
            let subscriber = Subscriber::spawn(settings, Arc::clone(&route), incoming_tx.clone())?;
            node.subscribers.push(subscriber);
        }
        let sides = completion_rx
            .into_iter()
            .zip(incoming_rx)
            .map(|(completions, incoming)| ShardSide {
                instances: node
                    .links
                    .iter()
                    .zip(&node.subscribers)
                    .map(|(link, subscriber)| Instance {
                        link: link.requests.clone(),
                        wants: subscriber.wants(),
                    })
                    .collect(),
                completions,
                incoming,
            })
            .collect();
        Ok((node, sides))
    }

    /// Their figures, under the node's name.
    pub fn stats(&self, node_id: &str) -> Stats {
        let instances = self.links.iter().zip(&self.subscribers);
        let instances = instances.zip(&self.urls);
        Stats {
            node_id: node_id.to_owned(),
            instances: instances
                .map(|((link, subscriber), url)| {
                    (url.clone(), link.stats.clone(), subscriber.stats.clone())
                })
                .collect(),
        }
    }

    /// Stop the threads, once the shards (and their senders) are gone.
    pub fn join(self) {
        for link in self.links {
            link.join();
        }
        for subscriber in self.subscribers {
            subscriber.join();
        }
    }
}
