//! The HTTP read API: `GET /api/decisions` (one org's stored decisions, filtered and paged) and
//! `GET /api/channels/{channel}/history` (a channel's recent messages by seq).
//!
//! Query strings in, [`DecisionQuery`]s and JSON bodies out; the handlers hand the read to the
//! storage readers or the channel's owner and return the response to wait for.

use std::rc::Rc;

use super::{Pending, Route};
use crate::auth::{Channel, Principal};
use crate::clock::Now;
use crate::codes::ErrorCode;
use crate::config::Scope;
use crate::dialect::shardcast;
use crate::http::{Request, Response};
use crate::json;
use crate::shard::{HistoryPage, Shard};
use crate::storage::{reader, DecisionQuery, Record};

/// Rows per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 100;
/// Most rows per page.
pub const MAX_LIMIT: usize = 1_000;

/// A refused API request: HTTP status, error code, message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Explanation.
    pub message: String,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError {
        status: 400,
        code: ErrorCode::BadRequest,
        message: message.into(),
    }
}

fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError {
        status: 403,
        code: ErrorCode::Forbidden,
        message: message.into(),
    }
}

/// `name=value` pairs of a query string, percent-decoded.
pub fn params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (
                crate::http::percent_decode(name),
                crate::http::percent_decode(value),
            )
        })
        .collect()
}

fn limit(value: &str) -> Result<usize, ApiError> {
    match value.parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        _ => Err(bad(format!("limit must be 1 to {MAX_LIMIT}"))),
    }
}

/// `GET /api/decisions`: the query `principal` may run. The org defaults to the caller's; only
/// an admin key may name another.
pub fn decisions_query(principal: &Principal, query: &str) -> Result<DecisionQuery, ApiError> {
    if !principal.scopes.has(Scope::Subscribe) {
        return Err(forbidden("this key may not read decisions"));
    }
    let mut q = DecisionQuery {
        org: principal.org.to_string(),
        limit: DEFAULT_LIMIT,
        newest_first: true,
        ..DecisionQuery::default()
    };
    for (name, value) in params(query) {
        match name.as_str() {
            "org" => q.org = value,
            "channel" => q.channel = Some(value),
            "decision" => q.decision = Some(value),
            "since" => q.since_ms = Some(time(&value, "since")?),
            "until" => q.until_ms = Some(time(&value, "until")?),
            "limit" => q.limit = limit(&value)?,
            "order" => {
                q.newest_first = match value.as_str() {
                    "newest" => true,
                    "oldest" => false,
                    _ => return Err(bad("order must be \"newest\" or \"oldest\"")),
                }
            }
            "cursor" => q.after = Some(cursor(&value)?),
            // Credentials, and anything a client adds for its own reasons.
            _ => {}
        }
    }
    if *q.org != *principal.org && !principal.scopes.has(Scope::Admin) {
        return Err(forbidden(format!(
            "this key reads org {:?} only",
            &*principal.org
        )));
    }
    Ok(q)
}

/// A time as Unix milliseconds or RFC 3339 (`2026-11-22T10:00:00Z`, `…+01:00`, fractions).
fn time(value: &str, name: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(ms);
    }
    parse_rfc3339(value).ok_or_else(|| {
        bad(format!(
            "{name} must be Unix milliseconds or an RFC 3339 time, not {}",
            crate::json::echo(value)
        ))
    })
}

/// Unix milliseconds of an RFC 3339 date-time (an offset is required: a local time would be
/// ambiguous).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    s.parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}

/// The opaque cursor for the row after which the next page starts.
pub fn encode_cursor(record: &Record) -> String {
    format!("{}.{}", record.created_ms, record.id)
}

fn cursor(value: &str) -> Result<(i64, String), ApiError> {
    let (ms, id) = value
        .split_once('.')
        .ok_or_else(|| bad("cursor must be a nextCursor from an earlier page"))?;
    let ms = ms
        .parse()
        .map_err(|_| bad("cursor must be a nextCursor from an earlier page"))?;
    Ok((ms, id.to_string()))
}

/// The JSON body of a decisions page. `full` says the page holds `limit` rows, so a next page
/// may exist.
pub fn decisions_body(rows: &[Record], full: bool) -> String {
    let mut out = br#"{"decisions":["#.to_vec();
    for (i, r) in rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(br#"{"id":"#);
        json::push_str(&mut out, &r.id);
        let texts = [
            ("org", Some(&r.org)),
            ("channel", Some(&r.channel)),
            ("schema", Some(&r.schema)),
            ("idempotencyKey", Some(&r.idempotency_key)),
            ("direction", Some(&r.direction)),
            ("decision", Some(&r.decision)),
            ("tool", r.tool.as_ref()),
            ("scope", r.scope.as_ref()),
            ("payloadHash", Some(&r.payload_hash)),
            ("correlationId", r.correlation_id.as_ref()),
        ];
        for (name, value) in texts {
            if let Some(value) = value {
                out.push(b',');
                json::push_str(&mut out, name);
                out.push(b':');
                json::push_str(&mut out, value);
            }
        }
        out.extend_from_slice(br#","seq":"#);
        json::push_u64(&mut out, r.seq);
        if let Some(ms) = r.latency_ms.filter(|ms| ms.is_finite()) {
            out.extend_from_slice(format!(r#","latencyMs":{ms}"#).as_bytes());
        }
        if let Some(tags) = &r.tags {
            out.extend_from_slice(br#","tags":"#);
            out.extend_from_slice(tags.as_bytes());
        }
        out.extend_from_slice(br#","createdAt":"#);
        json::push_str(
            &mut out,
            &crate::decision::rfc3339(r.created_ms.max(0) as u64),
        );
        out.extend_from_slice(br#","data":"#);
        out.extend_from_slice(r.data.as_bytes());
        out.push(b'}');
    }
    out.extend_from_slice(br#"],"nextCursor":"#);
    match rows.last().filter(|_| full) {
        Some(last) => json::push_str(&mut out, &encode_cursor(last)),
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    // Built from valid UTF-8 pieces only.
    String::from_utf8(out).unwrap_or_default()
}

/// `GET /api/channels/{channel}/history`: the seq to start after and the page size, if
/// `principal` may read that channel.
pub fn history_query(
    principal: &Principal,
    name: &str,
    categories: &[String],
    query: &str,
) -> Result<(u64, usize), ApiError> {
    let channel = Channel::parse(name, categories).map_err(|e| ApiError {
        status: 400,
        code: ErrorCode::InvalidChannel,
        message: format!("{}: {e}", crate::json::echo(name)),
    })?;
    if !principal.may(Scope::Subscribe, &channel) {
        return Err(forbidden(format!("not allowed to read {name:?}")));
    }
    let (mut since, mut page) = (0, DEFAULT_LIMIT);
    for (key, value) in params(query) {
        match key.as_str() {
            "since" => {
                since = value
                    .parse()
                    .map_err(|_| bad("since must be a seq (0 or more)"))?
            }
            "limit" => page = limit(&value)?,
            _ => {}
        }
    }
    Ok((since, page))
}

/// The JSON body of a history page: the messages (as delivered), whether nothing between
/// `since` and the last one is missing, and where the next page starts.
pub fn history_body(channel: &str, since: u64, page: &HistoryPage) -> String {
    let mut out = br#"{"channel":"#.to_vec();
    json::push_str(&mut out, channel);
    out.extend_from_slice(br#","since":"#);
    json::push_u64(&mut out, since);
    out.extend_from_slice(br#","messages":["#);
    for (i, m) in page.messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        shardcast::message_json(&mut out, channel, m);
    }
    out.extend_from_slice(br#"],"complete":"#);
    out.extend_from_slice(if page.complete { b"true" } else { b"false" });
    out.extend_from_slice(br#","more":"#);
    out.extend_from_slice(if page.more { b"true" } else { b"false" });
    out.extend_from_slice(br#","nextSince":"#);
    let last = page.messages.last().map_or(since, |m| m.seq);
    json::push_u64(&mut out, last);
    out.push(b'}');
    String::from_utf8_lossy(&out).into_owned()
}

// ----- handlers -----

/// Who asks: the request's credentials, or a 401.
/// Each request counts as a message against its key's (or user's) and org's rates: over
/// one, a 429 with `Retry-After`.
pub(super) fn principal(shard: &Shard, request: &Request) -> Result<Rc<Principal>, Response> {
    let principal = shard.auth.authenticate(&request.credentials).map_err(|e| {
        shard.global.auth_failed(e.code());
        Response::error(401, e.code(), &e.to_string())
    })?;
    if let Err(wait_ms) = shard.take_quota(&principal, 1) {
        let message = "over the message rate of the key or org";
        let retry = wait_ms.div_ceil(1_000).max(1).to_string();
        let refused = Response::error(429, ErrorCode::RateLimited, message);
        return Err(refused.header("Retry-After", &retry));
    }
    Ok(principal)
}

fn refusal(e: ApiError) -> Response {
    Response::error(e.status, e.code, &e.message)
}

/// The channel of a `/api/channels/{channel}/history` path, still percent-encoded.
pub fn history_channel(path: &str) -> Option<&str> {
    path.strip_prefix("/api/channels/")?
        .strip_suffix("/history")
}

/// `GET /api/channels/{channel}/history`: a page from the channel's owner (its ring, and the
/// store for older decisions).
pub fn history(shard: &Shard, request: &Request) -> Route {
    let answer = || {
        let principal = principal(shard, request)?;
        let name = history_channel(&request.path).unwrap_or_default();
        let channel = crate::http::percent_decode(name);
        let categories = &shard.config().channels.categories;
        let (since, limit) =
            history_query(&principal, &channel, categories, &request.query).map_err(refusal)?;
        let (reply, page) = flume::bounded(1);
        shard.history(&channel, since, limit, reply, Now::read());
        Ok(Box::pin(async move {
            match page.recv_async().await {
                Ok(page) => Response::json(200, history_body(&channel, since, &page)),
                Err(_) => stopping(),
            }
        }) as Pending)
    };
    answer().map_or_else(Route::Respond, Route::Wait)
}

/// `GET /api/decisions`: a page of one org's stored decisions, from a storage reader.
pub fn decisions(shard: &Shard, request: &Request) -> Route {
    let answer = || {
        let principal = principal(shard, request)?;
        let query = decisions_query(&principal, &request.query).map_err(refusal)?;
        let Some(reader) = shard.reader() else {
            let message = "storage url is \"memory\": no decisions are kept";
            return Err(Response::error(503, ErrorCode::StorageUnavailable, message));
        };
        let limit = query.limit;
        let (reply, answer) = flume::bounded(1);
        let read = reader::Query::Decisions(query);
        if let Err(e) = reader.submit(read, Box::new(move |result| drop(reply.send(result)))) {
            let response = Response::error(503, ErrorCode::StorageUnavailable, &e.to_string());
            return Err(response.header("Retry-After", "1"));
        }
        Ok(Box::pin(async move {
            match answer.recv_async().await {
                Ok(Ok(reader::Answer::Decisions(rows))) => {
                    Response::json(200, decisions_body(&rows, rows.len() == limit))
                }
                Ok(Ok(_)) => Response::error(500, ErrorCode::Internal, "unexpected answer"),
                Ok(Err(e)) => {
                    let message = format!("the decision store could not be read: {e}");
                    Response::error(503, ErrorCode::StorageUnavailable, &message)
                        .header("Retry-After", "1")
                }
                Err(_) => stopping(),
            }
        }) as Pending)
    };
    answer().map_or_else(Route::Respond, Route::Wait)
}

/// The answer to a request the server stopped before answering.
pub(super) fn stopping() -> Response {
    Response::error(503, ErrorCode::ShuttingDown, "server is stopping")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Scopes;

    fn key(org: &str, scopes: &[Scope]) -> Principal {
        Principal {
            org: org.into(),
            user: None,
            key_id: Some("k".into()),
            scopes: Scopes::from_list(scopes),
            exclusive: false,
            expires_ms: None,
            grant: None,
        }
    }

    #[test]
    fn rfc3339_times_and_unix_ms_are_accepted() {
        let ms = parse_rfc3339("2026-11-22T10:00:00Z").unwrap();
        assert_eq!(
            crate::decision::rfc3339(ms as u64),
            "2026-11-22T10:00:00.000Z"
        );
        assert_eq!(parse_rfc3339("2026-11-22T11:00:00.5+01:00"), Some(ms + 500));
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-02-29T23:59:59.999Z"),
            Some(1_709_251_199_999)
        );
        for bad in [
            "2026-11-22T10:00:00+0é00",
            "2026-11-22T10:00:00.é",
            "2026-11-22T10:00:0é",
            "é026-11-22T10:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-22",
            "2026-11-22T10:00:00",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
        assert_eq!(time("1700000000000", "since"), Ok(1_700_000_000_000));
        assert_eq!(time("soon", "since").unwrap_err().status, 400);
    }

    #[test]
    fn a_key_reads_its_own_org_only() {
        let acme = key("acme", &[Scope::Subscribe]);
        let q = decisions_query(
            &acme,
            "channel=org%3Aacme%3Adecisions&decision=deny&limit=5&order=oldest",
        )
        .unwrap();
        assert_eq!(q.org, "acme");
        assert_eq!(q.channel.as_deref(), Some("org:acme:decisions"));
        assert_eq!((q.limit, q.newest_first), (5, false));
        assert_eq!(decisions_query(&acme, "org=beta").unwrap_err().status, 403);
        let publisher = key("acme", &[Scope::Publish]);
        assert_eq!(decisions_query(&publisher, "").unwrap_err().status, 403);
        let admin = key("ops", &[Scope::Admin, Scope::Subscribe]);
        assert_eq!(decisions_query(&admin, "org=beta").unwrap().org, "beta");
        for bad in [
            "limit=0",
            "limit=5000",
            "order=up",
            "cursor=x",
            "since=yesterday",
        ] {
            assert_eq!(
                decisions_query(&acme, bad).unwrap_err().status,
                400,
                "{bad}"
            );
        }
    }

    #[test]
    fn pages_carry_a_cursor_only_when_full() {
        let mut r = crate::storage::contract::record("acme", "k", "org:acme:decisions", 3);
        r.correlation_id = Some("c\"1".into());
        let body = decisions_body(std::slice::from_ref(&r), true);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["decisions"][0]["seq"], 3);
        assert_eq!(v["decisions"][0]["correlationId"], "c\"1");
        assert_eq!(v["decisions"][0]["tags"], serde_json::json!(["a"]));
        assert_eq!(v["decisions"][0]["data"]["orgId"], "acme");
        let next = v["nextCursor"].as_str().unwrap();
        assert_eq!(cursor(next).unwrap(), (r.created_ms, r.id.clone()));
        let last: serde_json::Value = serde_json::from_str(&decisions_body(&[r], false)).unwrap();
        assert!(last["nextCursor"].is_null());
    }
}
