//! What operators and load balancers ask: `/health` (counters and memory), `/health/live`,
//! `/health/ready` (503 while draining, while the decision store is unreachable, or while a
//! cluster node cannot reach its Redis),
//! `/metrics` (Prometheus text) and `/info` (what this server speaks and its limits).

use std::sync::atomic::Ordering;

use crate::http::Response;
use crate::shard::Shard;

/// `GET /health`.
pub fn health(shard: &Shard) -> Response {
    let status = if shard.global.ready.load(Ordering::Relaxed) {
        "healthy"
    } else {
        "shutting_down"
    };
    Response::json(200, shard.global.health_json(status))
}

/// `GET /health/live`: the process answers.
pub fn live() -> Response {
    Response::json(200, r#"{"status":"alive"}"#)
}

/// `GET /health/ready`: whether this server should get traffic.
pub fn ready(shard: &Shard) -> Response {
    if !shard.global.ready.load(Ordering::Relaxed) {
        let body = r#"{"status":"not_ready","reason":"shutting_down"}"#;
        return Response::json(503, body).header("Retry-After", "1");
    }
    let storage = match shard.storage_status() {
        Some(status) if !status.ready() => Some(status.reason()),
        Some(_) if !shard.storage_recovered() => {
            Some("waiting for the decision store's state".to_string())
        }
        _ => None,
    };
    let cluster = shard.global.cluster.as_ref();
    let (code, reason) = match (storage, cluster.and_then(|c| c.unavailable())) {
        (Some(reason), _) => ("storage_unavailable", reason),
        (None, Some(reason)) => ("cluster_unavailable", reason),
        (None, None) => return Response::json(200, r#"{"status":"ready"}"#),
    };
    let mut body = format!(r#"{{"status":"not_ready","reason":"{code}","detail":"#).into_bytes();
    crate::json::push_str(&mut body, &reason);
    body.push(b'}');
    Response::json(503, body).header("Retry-After", "1")
}

/// `GET /metrics`.
pub fn metrics(shard: &Shard) -> Response {
    Response::new(200, "text/plain; version=0.0.4", shard.global.prometheus())
}

/// `GET /info`.
pub fn info(shard: &Shard) -> Response {
    let c = &*shard.config();
    let body = format!(
        concat!(
            r#"{{"name":"shardcast","version":"{}","shards":{},"listen":"{}","#,
            r#""uptimeSeconds":{},"protocol":{{"endpoint":"/ws","messages":["SUB","UNSUB","PUBLISH","INGEST","REFRESH","PING"],"#,
            r#""schemas":["{}"],"categories":{:?}}},"#,
            r#""limits":{{"maxMessageBytes":{},"outboundQueueMessages":{},"outboundQueueBytes":{},"maxConnections":{}}}}}"#
        ),
        env!("CARGO_PKG_VERSION"),
        shard.nshards,
        c.listen,
        shard.global.started.elapsed().as_secs(),
        crate::decision::SCHEMA,
        c.channels.categories,
        c.limits.max_message_bytes,
        c.limits.outbound_queue_messages,
        c.limits.outbound_queue_bytes,
        c.max_connections,
    );
    Response::json(200, body)
}
