//! The server API's deliveries: `POST /api/users/{userId}/send`, `POST /api/users/send`
//! (many users) and `POST /api/broadcast`.
//!
//! A message to a user is a PUBLISH on the user's own channel (`user:{id}:notifications`,
//! or `category`): numbered, kept in its history and delivered to its subscribers by its
//! owner, which then hands it to every connection of that user on every shard, subscribed
//! or not. Each shard says how many of the user's connections it reached.

use super::api::{principal, stopping};
use super::write::{bad, refused, respond, Body};
use super::Route;
use crate::auth::Principal;
use crate::clock::Now;
use crate::cluster::control::{Control, NodeAnswer, Question};
use crate::codes::ErrorCode;
use crate::config::Scope;
use crate::dialect::Answer;
use crate::http::{self, Response};
use crate::json;
use crate::shard::asks::Sink;
use crate::shard::directory::ToUser;
use crate::shard::{MeshMsg, Origin, Shard};

/// Most users in one `POST /api/users/send`.
pub const MAX_USERS: usize = 1_000;
/// The category of a user's channel when a send names none.
pub const DEFAULT_CATEGORY: &str = "notifications";

/// The org whose connections `principal` may act on: `Ok(None)` for an admin key (any; or
/// `org` when it names one), its own for an API key with the publish scope. Users' tokens
/// act on their own channels only, never on other people's connections.
pub(super) fn acting_org(
    principal: &Principal,
    org: Option<&str>,
) -> Result<Option<Box<str>>, Response> {
    if principal.scopes.has(Scope::Admin) {
        return Ok(org.map(Box::from));
    }
    if principal.key_id.is_none() || !principal.scopes.has(Scope::Publish) {
        let message = "this takes an API key with the publish scope, or an admin key";
        return Err(Response::error(403, ErrorCode::Forbidden, message));
    }
    match org {
        Some(org) if *org != *principal.org => {
            let message = format!("this key acts on org {:?} only", &*principal.org);
            Err(Response::error(403, ErrorCode::Forbidden, &message))
        }
        _ => Ok(Some(principal.org.clone())),
    }
}

/// The user of a `/api/users/{userId}…` path, percent-decoded.
pub fn path_user(path: &str, suffix: &str) -> Option<String> {
    let user = path.strip_prefix("/api/users/")?.strip_suffix(suffix)?;
    (!user.is_empty() && !user.contains('/')).then(|| http::percent_decode(user))
}

/// The user of the request's `/api/users/{userId}…` path, if it is a user id that may have
/// channels (`user:{id}:…`): letters, digits, `-`, `_`, `.` and `@`.
pub(super) fn user_of(request: &http::Request, suffix: &str) -> Result<String, Response> {
    let user = path_user(&request.path, suffix).unwrap_or_default();
    let valid = user
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if user.is_empty() || user.len() > 128 || !valid {
        let message = format!(
            "{} is not a user id (1 to 128 letters, digits, - _ . or @)",
            json::echo(&user)
        );
        return Err(Response::error(400, ErrorCode::InvalidChannel, &message));
    }
    Ok(user)
}

/// What one send carries: the data as delivered (wrapped as `{"event","payload"}` when the
/// send names an event), the user's channel's category, and its idempotency key.
struct Message {
    data: Vec<u8>,
    category: String,
    key: Option<String>,
}

impl Message {
    fn read(body: &Body<'_>) -> Result<Self, Response> {
        let data = body.raw("data").ok_or_else(|| bad("missing \"data\""))?;
        let data = match body.text("event")? {
            Some(event) => {
                let mut out = br#"{"event":"#.to_vec();
                json::push_str(&mut out, &event);
                out.extend_from_slice(br#","payload":"#);
                out.extend_from_slice(data);
                out.push(b'}');
                out
            }
            None => data.to_vec(),
        };
        let category = body.text("category")?;
        let key = body.text("idempotencyKey")?;
        if key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 256) {
            return Err(bad("\"idempotencyKey\" must be 1 to 256 bytes"));
        }
        Ok(Message {
            data,
            category: category.unwrap_or_else(|| DEFAULT_CATEGORY.into()),
            key,
        })
    }
}

/// A send to `user` under way: its channel, and where its seq, its reach and whether it
/// was kept come back.
struct Sending {
    user: String,
    channel: String,
    answer: flume::Receiver<Answer>,
    reached: flume::Receiver<usize>,
    queued: flume::Receiver<bool>,
}

/// Send `message` to `user`'s connections (of `org` only, unless `None`).
fn send(
    shard: &Shard,
    user: &str,
    org: Option<Box<str>>,
    message: &Message,
) -> Result<Sending, Response> {
    let channel = format!("user:{user}:{}", message.category);
    let (reply, answer) = flume::bounded(1);
    let (reached_tx, reached) = flume::unbounded();
    let (queued_tx, queued) = flume::bounded(1);
    let to = ToUser {
        user: user.into(),
        org,
        reached: reached_tx,
        queued: queued_tx,
    };
    let sent = (channel.as_str(), &message.data[..], message.key.as_deref());
    shard
        .send_to_user(sent, to, Origin::http(reply), Now::read())
        .map_err(refused)?;
    Ok(Sending {
        user: user.into(),
        channel,
        answer,
        reached,
        queued,
    })
}

/// Wait for a send's seq and reach: its result object and the connections it reached, or
/// the error that stopped it.
async fn outcome(sending: Sending) -> Result<(Vec<u8>, usize), Response> {
    let seq = match sending.answer.recv_async().await {
        Ok(Answer::PublishAck { seq, .. }) => seq,
        Ok(Answer::Error { code, message, .. }) => {
            return Err(Response::error(code.http_status(), code, &message))
        }
        Ok(_) => {
            return Err(Response::error(
                500,
                ErrorCode::Internal,
                "unexpected answer",
            ))
        }
        Err(_) => return Err(stopping()),
    };
    // Every shard's count, until the last one is in (their senders are then gone).
    let reached = total(sending.reached).await;
    // Sent true once kept (and stored); dropped unsent when it was not kept.
    let queued = sending.queued.recv_async().await.unwrap_or(false);
    let mut out = br#"{"user":"#.to_vec();
    json::push_str(&mut out, &sending.user);
    out.extend_from_slice(br#","channel":"#);
    json::push_str(&mut out, &sending.channel);
    out.extend_from_slice(br#","seq":"#);
    json::push_u64(&mut out, seq);
    out.extend_from_slice(br#","reached":"#);
    json::push_u64(&mut out, reached as u64);
    out.extend_from_slice(if queued {
        br#","queued":true}"#
    } else {
        br#","queued":false}"#
    });
    Ok((out, reached))
}

/// `POST /api/users/{userId}/send {data, event?, category?, idempotencyKey?}` →
/// `{"user","channel","seq","reached","queued"}`.
pub fn send_to_user(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let org = acting_org(&principal, None)?;
        let user = user_of(request, "/send")?;
        let body = Body::read(shard, request)?;
        let message = Message::read(&body)?;
        let sending = send(shard, &user, org, &message)?;
        Ok(Box::pin(async move {
            match outcome(sending).await {
                Ok((body, _)) => Response::json(200, body),
                Err(response) => response,
            }
        }))
    })
}

/// `POST /api/users/send {users:[…], data, event?, category?}` → `{"results":[…],
/// "reached":N}`: one result per user, in order, as `POST /api/users/{userId}/send` answers
/// (or `{"user","error","message"}`).
pub fn send_to_users(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let org = acting_org(&principal, None)?;
        let body = Body::read(shard, request)?;
        let users = body
            .texts("users", MAX_USERS)?
            .ok_or_else(|| bad("missing \"users\""))?;
        let mut message = Message::read(&body)?;
        // One key would answer every user but the first with the first's seq.
        message.key = None;
        let sends: Vec<_> = users
            .iter()
            .map(|user| (user.clone(), send(shard, user, org.clone(), &message)))
            .collect();
        Ok(Box::pin(async move {
            let mut out = br#"{"results":["#.to_vec();
            let mut total = 0u64;
            for (i, (user, sending)) in sends.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                let result = match sending {
                    Ok(sending) => outcome(sending).await,
                    Err(refused) => Err(refused),
                };
                match result {
                    Ok((body, reached)) => {
                        total += reached as u64;
                        out.extend_from_slice(&body);
                    }
                    Err(refused) if refused.status() == 503 => return refused,
                    Err(refused) => {
                        // `{"error":…,"message":…}` with the user first.
                        out.extend_from_slice(br#"{"user":"#);
                        json::push_str(&mut out, &user);
                        out.push(b',');
                        out.extend_from_slice(&refused.body()[1..]);
                    }
                }
            }
            out.extend_from_slice(br#"],"reached":"#);
            json::push_u64(&mut out, total);
            out.push(b'}');
            Response::json(200, out)
        }))
    })
}

/// `POST /api/broadcast {data, org?}` → `{"reached":N}`: `{"type":"SYSTEM",
/// "event":"broadcast","data":…}` to every connection of the org (an admin key: of `org`,
/// or all).
pub fn broadcast(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let body = Body::read(shard, request)?;
        let org = acting_org(&principal, body.text("org")?.as_deref())?;
        let data = body.raw("data").ok_or_else(|| bad("missing \"data\""))?;
        let command = Control::Broadcast {
            org: org.as_deref().map(String::from),
            data: data.to_vec(),
        };
        let reached = count_cluster(shard, command, Nodes::All);
        Ok(Box::pin(async move {
            let reached = reached.await;
            Response::json(200, format!(r#"{{"reached":{reached}}}"#))
        }))
    })
}

/// Which nodes do a server API command.
pub(super) enum Nodes<'a> {
    /// Every node.
    All,
    /// This one.
    Here,
    /// Node `0` (boot id in hex) only.
    One(&'a str),
}

/// Have `nodes` do `command`: the connections they reached or closed, once every node that
/// heard it has answered (or `[cluster] timeout_ms` has passed).
pub(super) fn count_cluster(
    shard: &Shard,
    command: Control,
    nodes: Nodes<'_>,
) -> impl std::future::Future<Output = usize> {
    let question = Question::Count(Box::new(command));
    let (tx, counts) = flume::unbounded();
    let here = match nodes {
        Nodes::One(node) => {
            shard.ask_nodes(question, Some(node), Sink::Counts(tx));
            None
        }
        Nodes::Here => Some(shard.ask_node(&question, Now::read())),
        Nodes::All => {
            let part = shard.ask_node(&question, Now::read());
            shard.ask_nodes(question, None, Sink::Counts(tx));
            Some(part)
        }
    };
    async move {
        let mine = match here {
            Some(part) => match part.gather().await {
                Some(NodeAnswer::Count(n)) => n,
                _ => 0,
            },
            None => 0,
        };
        mine + total(counts).await
    }
}

/// Every node's answer to `question`, this node's first (`None`: the node is stopping).
pub(super) fn ask_cluster(
    shard: &Shard,
    question: Question,
) -> impl std::future::Future<Output = Option<Vec<NodeAnswer>>> {
    let part = shard.ask_node(&question, Now::read());
    let (tx, answers) = flume::unbounded();
    shard.ask_nodes(question, None, Sink::Answers(tx));
    async move {
        let mut all = vec![part.gather().await?];
        while let Ok(answer) = answers.recv_async().await {
            all.push(answer);
        }
        Some(all)
    }
}

/// The sum of the counts sent on `counts`, once every sender is gone.
pub(super) async fn total(counts: flume::Receiver<usize>) -> usize {
    let mut total = 0;
    while let Ok(n) = counts.recv_async().await {
        total += n;
    }
    total
}

/// `GET /api/users/{userId}/queue` → `{"user","messages":[{"channel","seq","data",
/// "queuedAt","expiresAt"}]}`, oldest first; `DELETE` the same → `{"deleted":N}`. An org's
/// key sees and deletes what its org sent.
pub fn queue(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let org = acting_org(&principal, None)?;
        let user = user_of(request, "/queue")?;
        let clear = request.method == "DELETE";
        let (reply, answer) = flume::bounded(1);
        let owner = crate::shard::offline::owner_of_user(&user, shard.nshards);
        let msg = MeshMsg::OfflineQueue {
            user: user.as_str().into(),
            org,
            clear,
            reply,
        };
        shard.to_shard(owner, msg, Now::read());
        Ok(Box::pin(async move {
            let rows = match answer.recv_async().await {
                Ok(Ok(rows)) => rows,
                Ok(Err(e)) => {
                    let message = format!("what is kept for the user could not be read: {e}");
                    return Response::error(503, ErrorCode::ClusterUnavailable, &message)
                        .header("Retry-After", "1");
                }
                Err(_) => return stopping(),
            };
            if clear {
                return Response::json(200, format!(r#"{{"deleted":{}}}"#, rows.len()));
            }
            let mut out = br#"{"user":"#.to_vec();
            json::push_str(&mut out, &user);
            out.extend_from_slice(br#","messages":["#);
            for (i, row) in rows.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(br#"{"channel":"#);
                json::push_str(&mut out, &row.channel);
                out.extend_from_slice(br#","seq":"#);
                json::push_u64(&mut out, row.seq);
                out.extend_from_slice(br#","data":"#);
                out.extend_from_slice(row.data.as_bytes());
                out.extend_from_slice(br#","queuedAt":"#);
                json::push_str(&mut out, &crate::decision::rfc3339(row.created_ms as u64));
                out.extend_from_slice(br#","expiresAt":"#);
                json::push_str(&mut out, &crate::decision::rfc3339(row.expires_ms as u64));
                out.push(b'}');
            }
            out.extend_from_slice(b"]}");
            Response::json(200, out)
        }))
    })
}
