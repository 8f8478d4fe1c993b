//! Tokens through the server API: `POST /api/tokens` issues an HS256 JWT that `/ws?token=`
//! accepts with exactly the rights asked for; `POST /api/tokens/revoke` refuses a token (by
//! `jti`) or all of a user's tokens issued so far (by `sub`) from then on, and closes the
//! connections using them with 4403.
//!
//! Who may: an admin key (any org, any scopes), or a key with the `tokens` scope, for its
//! own org and the subscribe, publish and ingest scopes.

use std::rc::Rc;

use serde::Serialize;

use super::api::{principal, stopping};
use super::deliver::{count_cluster, Nodes};
use super::write::{bad, respond, Body};
use super::Route;
use crate::auth::{Principal, Revocation, Revoked};
use crate::cluster::control::Control;
use crate::codes::ErrorCode;
use crate::config::Scope;
use crate::http::{self, Response};
use crate::json;
use crate::shard::Shard;
use crate::storage::reader;

/// What `POST /api/tokens` signs.
#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    org: &'a str,
    scopes: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channels: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session: Option<&'a str>,
    iat: u64,
    exp: u64,
    jti: &'a str,
}

/// The scopes a token may be given, by name.
const SCOPES: [(&str, Scope); 5] = [
    ("subscribe", Scope::Subscribe),
    ("publish", Scope::Publish),
    ("ingest", Scope::Ingest),
    ("admin", Scope::Admin),
    ("tokens", Scope::Tokens),
];

/// An admin key, or a key with the tokens scope (`Ok(false)`: limited to its own org).
fn issuer(principal: &Principal) -> Result<bool, Response> {
    if principal.scopes.has(Scope::Admin) {
        return Ok(true);
    }
    if principal.key_id.is_some() && principal.scopes.has(Scope::Tokens) {
        return Ok(false);
    }
    let message = "this takes an admin key or a key with the tokens scope";
    Err(Response::error(403, ErrorCode::Forbidden, message))
}

fn forbidden(message: &str) -> Response {
    Response::error(403, ErrorCode::Forbidden, message)
}

/// A name that may stand in a channel (`user:{sub}:…`, `org:{org}:…`).
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// `POST /api/tokens {sub, org?, scopes, channels?, session?, expiresIn}` →
/// `{"token","expiresAt","jti"}`.
pub fn issue(shard: &Shard, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let admin = issuer(&principal)?;
        let secret = &shard.config().auth.jwt_secret;
        if secret.is_empty() {
            let message = "auth.jwt_secret is not set: this server takes no tokens";
            return Err(Response::error(409, ErrorCode::TokensDisabled, message));
        }
        let body = Body::read(shard, request)?;
        let sub = body.text("sub")?.ok_or_else(|| bad("missing \"sub\""))?;
        if !valid_id(&sub) {
            return Err(bad("\"sub\" must be 1 to 128 letters, digits, - _ . or @"));
        }
        let org = body
            .text("org")?
            .unwrap_or_else(|| principal.org.to_string());
        if !valid_id(&org) {
            return Err(bad("\"org\" must be 1 to 128 letters, digits, - _ . or @"));
        }
        if !admin && *org != *principal.org {
            return Err(forbidden(&format!(
                "this key issues tokens for org {:?} only",
                &*principal.org
            )));
        }
        let names = body
            .texts("scopes", SCOPES.len())?
            .ok_or_else(|| bad("missing \"scopes\""))?;
        let mut scopes = Vec::with_capacity(names.len());
        for name in &names {
            let Some((name, scope)) = SCOPES.iter().find(|(n, _)| n == name) else {
                return Err(bad(&format!("unknown scope {}", json::echo(name))));
            };
            let grantable = matches!(scope, Scope::Subscribe | Scope::Publish | Scope::Ingest);
            if !admin && !grantable {
                return Err(forbidden(&format!("this key may not grant {name:?}")));
            }
            scopes.push(*name);
        }
        let channels = body.texts("channels", 100)?;
        let categories = &shard.config().channels.categories;
        for name in channels.iter().flatten() {
            let exact = name.strip_suffix('*').is_none();
            if exact && crate::auth::Channel::parse(name, categories).is_err() {
                return Err(bad(&format!(
                    "{} is not a channel (or a prefix ending in *)",
                    json::echo(name)
                )));
            }
        }
        let session = match body.text("session")?.as_deref() {
            None => None,
            Some("exclusive") => Some("exclusive"),
            Some(_) => return Err(bad("\"session\" must be \"exclusive\"")),
        };
        let max = shard.config().auth.max_token_secs;
        let expires_in = body
            .raw("expiresIn")
            .and_then(|raw| std::str::from_utf8(raw).ok()?.parse::<u64>().ok())
            .filter(|secs| (1..=max).contains(secs))
            .ok_or_else(|| bad(&format!("\"expiresIn\" must be 1 to {max} seconds")))?;
        let now_s = crate::decision::unix_ms() / 1000;
        let jti = random_id();
        let claims = Claims {
            sub: &sub,
            org: &org,
            scopes,
            channels,
            session,
            iat: now_s,
            exp: now_s + expires_in,
            jti: &jti,
        };
        let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
        let token = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)
            .map_err(|e| Response::error(500, ErrorCode::Internal, &e.to_string()))?;
        let mut out = br#"{"token":"#.to_vec();
        json::push_str(&mut out, &token);
        out.extend_from_slice(br#","expiresAt":"#);
        json::push_str(&mut out, &crate::decision::rfc3339(claims.exp * 1000));
        out.extend_from_slice(br#","jti":"#);
        json::push_str(&mut out, &jti);
        out.push(b'}');
        Err(Response::json(200, out))
    })
}

/// 128 random bits in hex, from the kernel.
fn random_id() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: the buffer is 16 writable bytes.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Never expected; the id is then still unique per process and moment.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = nanos.to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `POST /api/tokens/revoke {jti}` or `{sub, org?}` → `{"revoked":true,"closed":N}`: kept
/// in the store (when there is one) before it is applied; connections using a revoked
/// token are closed with 4403.
pub fn revoke(shard: &Rc<Shard>, request: &http::Request) -> Route {
    respond(|| {
        let principal = principal(shard, request)?;
        let admin = issuer(&principal)?;
        let body = Body::read(shard, request)?;
        let what = match (body.text("jti")?, body.text("sub")?) {
            (Some(jti), None) if !jti.is_empty() && jti.len() <= 128 => Revoked::Jti(jti.into()),
            (None, Some(sub)) if valid_id(&sub) => {
                let org = match body.text("org")? {
                    Some(org) if admin => Some(org.into()),
                    Some(org) if *org != *principal.org => {
                        return Err(forbidden("this key revokes its own org's tokens only"))
                    }
                    _ if admin => None,
                    _ => Some(principal.org.clone()),
                };
                Revoked::Sub {
                    sub: sub.into(),
                    org,
                }
            }
            _ => return Err(bad("send \"jti\" or \"sub\" (one of them)")),
        };
        let auth = &shard.config().auth;
        if shard.auth.revocations() >= auth.max_revocations {
            let message = format!(
                "{} revocations are in force, auth.max_revocations: retry once some expire",
                auth.max_revocations
            );
            let response = Response::error(503, ErrorCode::Overloaded, &message);
            return Err(response.header("Retry-After", "60"));
        }
        let now = crate::decision::unix_ms();
        let lasts = auth
            .max_token_secs
            .saturating_add(auth.jwt_leeway_secs)
            .saturating_mul(1000);
        let revocation = Revocation {
            what,
            at_ms: now,
            until_ms: now.saturating_add(lasts),
        };
        // Kept first: a revocation the store lost would be forgotten at the next start.
        let stored = match shard.reader() {
            None => None,
            Some(reader) => {
                let (reply, stored) = flume::bounded(1);
                let query = reader::Query::Revoke(revocation.clone());
                let submitted = reader.submit(query, Box::new(move |r| drop(reply.send(r))));
                if let Err(e) = submitted {
                    return Err(unavailable(&e.to_string()));
                }
                Some(stored)
            }
        };
        let shard = shard.clone();
        Ok(Box::pin(async move {
            if let Some(stored) = stored {
                match stored.recv_async().await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return unavailable(&e),
                    Err(_) => return stopping(),
                }
            }
            let command = Control::Revoke(revocation);
            let closed = count_cluster(&shard, command, Nodes::All).await;
            Response::json(200, format!(r#"{{"revoked":true,"closed":{closed}}}"#))
        }))
    })
}

fn unavailable(reason: &str) -> Response {
    let message = format!("the revocation could not be stored: {reason}");
    Response::error(503, ErrorCode::StorageUnavailable, &message).header("Retry-After", "1")
}
