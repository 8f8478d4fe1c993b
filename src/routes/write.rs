//! The HTTP write API: `POST /api/publish`, `POST /api/publish/batch` and `POST /api/ingest`.
//!
//! A body is parsed by the shardcast dialect's parser as the WebSocket message of the same
//! kind (same fields, same checks, `data` relayed byte for byte) and handed to the shard as
//! the WebSocket request is: the channel's owner numbers, deduplicates and stores it, and
//! answers this request's channel instead of a connection.

use std::future::Future;

use super::api::{principal, stopping};
use super::{Pending, Route};
use crate::clock::Now;
use crate::codes::ErrorCode;
use crate::dialect::{shardcast, Answer, Refusal, Request};
use crate::http::{self, Response};
use crate::json;
use crate::shard::{Origin, Shard};

/// Most messages in one `POST /api/publish/batch`.
pub const MAX_BATCH: usize = 1_000;

/// `POST /api/publish {channel, data, idempotencyKey?}` → `{"seq":N}`.
pub fn publish(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        writable(shard, request)?;
        let answer = publish_one(shard, &principal, &request.body).map_err(refused)?;
        Ok(Box::pin(async move {
            match answer.await {
                Some(answer) => publish_response(&answer),
                None => stopping(),
            }
        }))
    })
}

/// `POST /api/publish/batch {messages:[…]}` → `{"results":[…]}`, one result per message in
/// order: `{"seq":N}` or `{"error":code,"message":…}`. Each message is published as by
/// `POST /api/publish`, in order, so those of one channel are numbered in the order given.
pub fn publish_batch(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let body = Body::read(shard, request)?;
        let items = body
            .raw("messages")
            .and_then(|list| Some((list, json::array_items(list)?)))
            .ok_or_else(|| bad("\"messages\" must be an array of messages"))?;
        let (list, items) = items;
        if items.is_empty() || items.len() > MAX_BATCH {
            return Err(bad(&format!("\"messages\" must hold 1 to {MAX_BATCH}")));
        }
        let answers: Vec<_> = items
            .into_iter()
            .map(|item| publish_one(shard, &principal, &list[item]))
            .collect();
        Ok(Box::pin(async move {
            let mut out = br#"{"results":["#.to_vec();
            for (i, answer) in answers.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let response = match answer {
                    Ok(answer) => match answer.await {
                        Some(answer) => publish_response(&answer),
                        None => return stopping(),
                    },
                    Err(refusal) => refused(refusal),
                };
                out.extend_from_slice(response.body());
            }
            out.extend_from_slice(b"]}");
            Response::json(200, out)
        }))
    })
}

/// `POST /api/ingest {channel, schema, idempotencyKey, data}` → the WebSocket `ACK`'s body,
/// sent once the decision is durable (`ack = "durable"`); 503 `storage_unavailable` when it
/// could not be stored (retry with the same key).
pub fn ingest(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        writable(shard, request)?;
        let parsed = shard
            .parser
            .borrow_mut()
            .parse_body("INGEST", &request.body);
        let Request::Ingest(ingest) = parsed.map_err(refused)? else {
            return Err(Response::error(500, ErrorCode::Internal, "not an ingest"));
        };
        let (reply, answer) = flume::bounded(1);
        let origin = Origin::http(reply);
        shard
            .ingest_request(&principal, ingest, origin, Now::read())
            .map_err(refused)?;
        Ok(Box::pin(async move {
            match answer.recv_async().await {
                Ok(answer) => ingest_response(&answer),
                Err(_) => stopping(),
            }
        }))
    })
}

/// Publish one message body for `principal`: the answer to wait for, or why it was refused
/// at once.
fn publish_one(
    shard: &Shard,
    principal: &crate::auth::Principal,
    body: &[u8],
) -> Result<impl Future<Output = Option<Answer>>, Refusal> {
    let parsed = shard.parser.borrow_mut().parse_body("PUBLISH", body)?;
    let Request::Publish {
        channel, data, key, ..
    } = parsed
    else {
        return Err(Refusal::bad_request("not a publish"));
    };
    let (reply, answer) = flume::bounded(1);
    let message = (channel.as_str(), data, key.as_deref());
    shard.publish(principal, message, Origin::http(reply), Now::read())?;
    Ok(async move { answer.recv_async().await.ok() })
}

/// The response to a publish's answer.
fn publish_response(answer: &Answer) -> Response {
    match answer {
        Answer::PublishAck { seq, local, .. } => {
            let mut out = br#"{"seq":"#.to_vec();
            json::push_u64(&mut out, *seq);
            if *local {
                out.extend_from_slice(br#","local":true"#);
            }
            out.push(b'}');
            Response::json(200, out)
        }
        other => failure(other),
    }
}

/// The response to an ingest's answer.
fn ingest_response(answer: &Answer) -> Response {
    match answer {
        Answer::IngestAck {
            key,
            decision_id,
            dedup,
            seq,
        } => {
            let mut out = Vec::new();
            shardcast::ingest_ack_json(&mut out, key, decision_id, *dedup, *seq);
            Response::json(200, out)
        }
        other => failure(other),
    }
}

/// An answer that is not the ACK a request waits for.
fn failure(answer: &Answer) -> Response {
    match answer {
        Answer::StorageUnavailable { .. } => {
            let message = "the decision store is unavailable; retry with the same idempotencyKey";
            Response::error(503, ErrorCode::StorageUnavailable, message).header("Retry-After", "1")
        }
        Answer::Error { code, message, .. } => {
            let response = Response::error(code.http_status(), *code, message);
            match code.http_status() {
                503 => response.header("Retry-After", "1"),
                _ => response,
            }
        }
        _ => Response::error(500, ErrorCode::Internal, "unexpected answer"),
    }
}

/// A request refused before it reached the core.
pub(super) fn refused(refusal: Refusal) -> Response {
    Response::error(refusal.code.http_status(), refusal.code, &refusal.message)
}

pub(super) fn bad(message: &str) -> Response {
    Response::error(400, ErrorCode::BadRequest, message)
}

/// A JSON object body, checked as every request is (one value, no name twice, not too
/// deep), with its members' raw spans.
pub(super) struct Body<'a> {
    raw: &'a [u8],
    members: Vec<json::Member>,
}

impl<'a> Body<'a> {
    /// The body of `request`, if the shard can take a write now and it is a JSON object.
    pub fn read(shard: &Shard, request: &'a http::Request) -> Result<Self, Response> {
        writable(shard, request)?;
        let raw = &request.body[..];
        shard.parser.borrow_mut().validate(raw).map_err(refused)?;
        let members = json::object_members(raw).ok_or_else(|| bad("body must be an object"))?;
        Ok(Body { raw, members })
    }

    /// The raw value of member `name`.
    pub fn raw(&self, name: &str) -> Option<&'a [u8]> {
        json::member(self.raw, &self.members, name)
    }

    /// Member `name`, which must be a string if present.
    pub fn text(&self, name: &str) -> Result<Option<String>, Response> {
        match self.raw(name) {
            None => Ok(None),
            Some(raw) => json::string(raw)
                .map(Some)
                .ok_or_else(|| bad(&format!("\"{name}\" must be a string"))),
        }
    }

    /// Member `name`, which must be an array of 1 to `max` strings if present.
    pub fn texts(&self, name: &str, max: usize) -> Result<Option<Vec<String>>, Response> {
        let Some(raw) = self.raw(name) else {
            return Ok(None);
        };
        let wrong = || {
            bad(&format!(
                "\"{name}\" must be an array of 1 to {max} strings"
            ))
        };
        let items = json::array_items(raw).ok_or_else(wrong)?;
        if items.is_empty() || items.len() > max {
            return Err(wrong());
        }
        let texts = items.into_iter().map(|item| json::string(&raw[item]));
        texts
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(wrong)
    }
}

/// A write the shard can take now, with a body the API can read (JSON, when a
/// `Content-Type` says what it is). While other shards or Redis have too much waiting, as
/// WebSocket publishers are paused, HTTP ones are told to come back.
pub(super) fn writable(shard: &Shard, request: &http::Request) -> Result<(), Response> {
    if shard.congested() {
        let message = "too much is waiting inside the server: retry shortly";
        let response = Response::error(503, ErrorCode::Overloaded, message);
        return Err(response.header("Retry-After", "1"));
    }
    let json = request.content_type.as_deref().is_none_or(|value| {
        let media = value.split(';').next().unwrap_or("").trim();
        media.eq_ignore_ascii_case("application/json")
            || media.to_ascii_lowercase().ends_with("+json")
    });
    if !json {
        let message = "request bodies are JSON: send Content-Type: application/json";
        return Err(Response::error(
            415,
            ErrorCode::UnsupportedMediaType,
            message,
        ));
    }
    if request.body.is_empty() {
        return Err(bad("a JSON body is required"));
    }
    Ok(())
}

/// The route for a handler that answers at once (`Err`) or later (`Ok`).
pub(super) fn respond(handler: impl FnOnce() -> Result<Pending, Response>) -> Route {
    handler().map_or_else(Route::Respond, Route::Wait)
}
