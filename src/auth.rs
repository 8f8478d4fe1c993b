//! Who a connection is (API key or JWT) and which channels it may use.

use std::collections::HashMap;
use std::rc::Rc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::codes::{Close, ErrorCode};
use crate::config::{Config, Scope};

/// A set of scopes, as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    fn bit(scope: Scope) -> u8 {
        match scope {
            Scope::Subscribe => 1,
            Scope::Publish => 2,
            Scope::Ingest => 4,
            Scope::Admin => 8,
            Scope::Tokens => 16,
        }
    }

    /// Scopes from a list.
    pub fn from_list(list: &[Scope]) -> Self {
        Scopes(list.iter().fold(0, |acc, s| acc | Self::bit(*s)))
    }

    /// True when every scope of `other` is held here too.
    pub fn covers(self, other: Scopes) -> bool {
        self.0 & other.0 == other.0
    }

    /// True when `scope` is held (admin holds every scope).
    pub fn has(self, scope: Scope) -> bool {
        self.0 & (Self::bit(scope) | Self::bit(Scope::Admin)) != 0
    }
}

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Organization.
    pub org: Box<str>,
    /// User id (JWT `sub`), for `user:<id>:*` channels.
    pub user: Option<Box<str>>,
    /// API key id, for `key:<id>:*` channels.
    pub key_id: Option<Box<str>>,
    /// Scopes held.
    pub scopes: Scopes,
    /// Its connections are exclusive per session key (`[sessions]`).
    pub exclusive: bool,
    /// When the credential stops being valid, in Unix milliseconds (a JWT's `exp` plus the
    /// configured leeway); `None` for API keys.
    pub expires_ms: Option<u64>,
    /// What a token says of itself beyond its rights (`None` for API keys).
    pub grant: Option<Box<Grant>>,
}

/// A token's identity and limits: what revocation and channel lists go by.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grant {
    /// Its `jti`, if it has one.
    pub jti: Option<Box<str>>,
    /// Its `iat` (Unix seconds; 0 when absent: older than any revocation).
    pub issued_s: u64,
    /// Its `channels`: the only channels it may use (exact names, or prefixes ending in
    /// `*`); `None`: any its scopes allow.
    pub channels: Option<Vec<Box<str>>>,
}

impl Grant {
    /// Whether the token's channel list lets it use `name`.
    pub fn allows(&self, name: &str) -> bool {
        self.channels.as_ref().is_none_or(|list| {
            list.iter().any(|allowed| match allowed.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => **allowed == *name,
            })
        })
    }
}

/// A revoked token (`jti`), or every token of a user issued at or before `at_ms`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Revocation {
    /// What is revoked.
    pub what: Revoked,
    /// When (Unix ms).
    pub at_ms: u64,
    /// Kept until then (Unix ms): no token it covers is valid after it.
    pub until_ms: u64,
}

/// What a [`Revocation`] covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
pub enum Revoked {
    /// The token with this `jti`.
    Jti(Box<str>),
    /// The tokens of this `sub` (of this org only, unless `None`).
    Sub {
        /// The user.
        sub: Box<str>,
        /// Only in this org.
        org: Option<Box<str>>,
    },
}

impl Revocation {
    /// Whether it covers the token of `principal`.
    pub fn covers(&self, principal: &Principal) -> bool {
        let Some(grant) = &principal.grant else {
            return false;
        };
        match &self.what {
            Revoked::Jti(jti) => grant.jti.as_deref() == Some(&**jti),
            Revoked::Sub { sub, org } => {
                principal.user.as_deref() == Some(&**sub)
                    && org.as_deref().is_none_or(|o| *o == *principal.org)
                    && grant.issued_s.saturating_mul(1_000) <= self.at_ms
            }
        }
    }
}

/// The kinds of channel (first part of `type:id:category`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// `org:<org>:…`
    Org,
    /// `user:<user id>:…`
    User,
    /// `key:<key id>:…`
    Key,
}

/// A parsed channel name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channel<'a> {
    /// Its kind.
    pub kind: ChannelKind,
    /// The org, user or key id.
    pub id: &'a str,
    /// The category.
    pub category: &'a str,
    /// What follows the category, if anything (`org:acme:rooms:investigation:123`: a room
    /// of Socket.IO clients): its own channel, with the category's rights.
    pub sub: Option<&'a str>,
}

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// Not `type:id:category[:name]` with a known type and sane characters.
    #[error("channel must look like type:id:category[:name] with type org, user or key")]
    Malformed,
    /// Category not in the configured list.
    #[error("unknown channel category {0:?}")]
    UnknownCategory(String),
}

/// Longest accepted channel name.
pub const MAX_CHANNEL_LEN: usize = 1024;

impl<'a> Channel<'a> {
    /// Parse and check `name` against the configured categories.
    pub fn parse(name: &'a str, categories: &[String]) -> Result<Self, ChannelError> {
        if name.len() > MAX_CHANNEL_LEN {
            return Err(ChannelError::Malformed);
        }
        let mut parts = name.splitn(4, ':');
        let (Some(kind), Some(id), Some(category)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(ChannelError::Malformed);
        };
        let sub = parts.next();
        let kind = match kind {
            "org" => ChannelKind::Org,
            "user" => ChannelKind::User,
            "key" => ChannelKind::Key,
            _ => return Err(ChannelError::Malformed),
        };
        let valid = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
        };
        // A name may hold colons of its own (`investigation:123`), but no empty part.
        let valid_sub = |s: &str| s.split(':').all(valid);
        if !valid(id) || !valid(category) || !sub.is_none_or(valid_sub) {
            return Err(ChannelError::Malformed);
        }
        if !categories.iter().any(|c| c == category) {
            return Err(ChannelError::UnknownCategory(category.to_string()));
        }
        Ok(Channel {
            kind,
            id,
            category,
            sub,
        })
    }

    /// The org this channel belongs to, when the name says so.
    pub fn org(&self) -> Option<&'a str> {
        (self.kind == ChannelKind::Org).then_some(self.id)
    }

    /// `type:id`: every channel of one owner shares a shard (and so an ingest dedup table).
    pub fn owner_key(name: &str) -> &str {
        let second = name
            .match_indices(':')
            .nth(1)
            .map_or(name.len(), |(i, _)| i);
        &name[..second]
    }
}

impl Principal {
    /// True when this principal may use `channel` for `scope`.
    pub fn may(&self, scope: Scope, channel: &Channel<'_>) -> bool {
        if !self.scopes.has(scope) {
            return false;
        }
        // Only a token with a channel list pays for composing the name.
        if let Some(grant) = self.grant.as_ref().filter(|g| g.channels.is_some()) {
            let mut name = format!(
                "{}:{}:{}",
                kind_name(channel.kind),
                channel.id,
                channel.category
            );
            if let Some(sub) = channel.sub {
                name.push(':');
                name.push_str(sub);
            }
            if !grant.allows(&name) {
                return false;
            }
        }
        if self.scopes.has(Scope::Admin) {
            return true;
        }
        match channel.kind {
            ChannelKind::Org => *self.org == *channel.id,
            ChannelKind::User => self.user.as_deref() == Some(channel.id),
            ChannelKind::Key => self.key_id.as_deref() == Some(channel.id),
        }
    }
}

fn kind_name(kind: ChannelKind) -> &'static str {
    match kind {
        ChannelKind::Org => "org",
        ChannelKind::User => "user",
        ChannelKind::Key => "key",
    }
}

/// Why a connection was refused; each maps to an HTTP status and a close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No key or token at all.
    #[error("missing API key or token")]
    Missing,
    /// The API key is unknown.
    #[error("invalid API key")]
    BadKey,
    /// The token is malformed, badly signed or lacks claims.
    #[error("invalid token: {0}")]
    BadToken(String),
    /// The token has expired.
    #[error("token expired")]
    Expired,
    /// The token was revoked.
    #[error("token revoked")]
    Revoked,
}

impl AuthError {
    /// Close code sent after the upgrade.
    pub fn close_code(&self) -> Close {
        match self {
            AuthError::Missing | AuthError::BadKey => Close::Unauthorized,
            AuthError::BadToken(_) | AuthError::Expired | AuthError::Revoked => Close::TokenRefused,
        }
    }

    /// Machine-readable reason (also the metrics label).
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Missing => ErrorCode::MissingCredentials,
            AuthError::BadKey => ErrorCode::InvalidKey,
            AuthError::BadToken(_) => ErrorCode::InvalidToken,
            AuthError::Expired => ErrorCode::TokenExpired,
            AuthError::Revoked => ErrorCode::TokenRevoked,
        }
    }
}

/// Credentials found in a request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// API key secret (`?key=` or `X-API-Key`).
    pub key: Option<String>,
    /// JWT (`?token=` or `Authorization: Bearer`).
    pub token: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    org: Option<String>,
    exp: u64,
    #[serde(default)]
    scopes: ScopeClaim,
    /// `"exclusive"`: one connection per session key.
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    iat: u64,
    /// The only channels the token may use.
    #[serde(default)]
    channels: Option<Vec<String>>,
}

/// `scopes` as a list or a space-separated string (both are common in the wild).
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum ScopeClaim {
    List(Vec<String>),
    Spaced(String),
    #[default]
    None,
}

/// Checks credentials. One per shard: keys resolve to shared `Rc<Principal>`s, so a key-authenticated
/// connection costs no allocation.
pub struct Authenticator {
    /// What the configuration trusts (replaced by [`Authenticator::reload`]).
    trust: std::cell::RefCell<Trust>,
    /// Revoked tokens, until their `until_ms`.
    revoked: std::cell::RefCell<HashMap<Revoked, Revocation>>,
}

/// The credentials a configuration accepts.
struct Trust {
    keys: HashMap<String, Rc<Principal>>,
    /// What tokens may be signed with.
    jwt: Vec<TokenKey>,
    /// The org of a token without one (`None`: refused).
    default_org: Option<Box<str>>,
    leeway_secs: u64,
}

/// What a reload did to the principal of an API key its connections hold.
#[derive(Debug)]
pub enum KeyChange {
    /// Unchanged, or only given more scopes: connections carry on as the new principal.
    Keep(Rc<Principal>),
    /// Removed, its secret changed, or its rights narrowed: its connections are closed.
    Withdrawn,
}

impl Trust {
    fn new(config: &Config) -> Self {
        let keys = config
            .api_keys
            .iter()
            .map(|k| {
                let principal = Principal {
                    org: k.org.as_str().into(),
                    user: None,
                    key_id: Some(k.id.as_str().into()),
                    scopes: Scopes::from_list(&k.scopes),
                    exclusive: k.session == crate::config::SessionMode::Exclusive,
                    expires_ms: None,
                    grant: None,
                };
                (k.secret.clone(), Rc::new(principal))
            })
            .collect();
        // `Config::validate` has read them already: an error here is a file changed since.
        let jwt = token_keys(&config.auth).unwrap_or_else(|e| {
            tracing::error!("tokens are refused: {e}");
            Vec::new()
        });
        let default_org = Some(config.auth.jwt_default_org.as_str())
            .filter(|o| !o.is_empty())
            .map(Into::into);
        Self {
            keys,
            jwt,
            default_org,
            leeway_secs: config.auth.jwt_leeway_secs,
        }
    }
}

impl Authenticator {
    /// Build from the configuration.
    pub fn new(config: &Config) -> Self {
        Self {
            trust: std::cell::RefCell::new(Trust::new(config)),
            revoked: Default::default(),
        }
    }

    /// Trust what `config` says from now on (revocations are kept). Returns, by the address
    /// of the principal its connections hold, what became of each API key: kept (the same
    /// secret, org and session mode, no scope taken away) or withdrawn.
    pub fn reload(&self, config: &Config) -> HashMap<*const Principal, KeyChange> {
        let fresh = Trust::new(config);
        let old = self.trust.replace(fresh);
        let trust = self.trust.borrow();
        old.keys
            .iter()
            .map(|(secret, was)| {
                let change = match trust.keys.get(secret) {
                    Some(now)
                        if now.org == was.org
                            && now.key_id == was.key_id
                            && now.exclusive == was.exclusive
                            && now.scopes.covers(was.scopes) =>
                    {
                        KeyChange::Keep(now.clone())
                    }
                    _ => KeyChange::Withdrawn,
                };
                (Rc::as_ptr(was), change)
            })
            .collect()
    }

    /// Refuse the tokens `revocation` covers from now on (until its `until_ms`).
    pub fn revoke(&self, revocation: Revocation) {
        let mut revoked = self.revoked.borrow_mut();
        let kept = revoked.get(&revocation.what);
        // A later revocation of the same user covers more of its tokens.
        if kept.is_none_or(|k| k.at_ms <= revocation.at_ms) {
            revoked.insert(revocation.what.clone(), revocation);
        }
    }

    /// Revocations in force.
    pub fn revocations(&self) -> usize {
        self.revoked.borrow().len()
    }

    /// Forget revocations past their `until_ms` (`now_ms`: Unix ms).
    pub fn expire_revocations(&self, now_ms: u64) {
        self.revoked.borrow_mut().retain(|_, r| r.until_ms > now_ms);
    }

    /// Whether a revocation covers `principal`'s token.
    pub fn is_revoked(&self, principal: &Principal) -> bool {
        let Some(grant) = &principal.grant else {
            return false;
        };
        let revoked = self.revoked.borrow();
        if revoked.is_empty() {
            return false;
        }
        let mut keys = Vec::with_capacity(3);
        if let Some(jti) = &grant.jti {
            keys.push(Revoked::Jti(jti.clone()));
        }
        if let Some(sub) = &principal.user {
            for org in [None, Some(principal.org.clone())] {
                let sub = sub.clone();
                keys.push(Revoked::Sub { sub, org });
            }
        }
        keys.iter()
            .filter_map(|key| revoked.get(key))
            .any(|r| r.covers(principal))
    }

    /// Resolve credentials to a principal. A key wins over a token when both are given.
    pub fn authenticate(&self, creds: &Credentials) -> Result<Rc<Principal>, AuthError> {
        let trust = self.trust.borrow();
        if let Some(key) = &creds.key {
            return trust.keys.get(key).cloned().ok_or(AuthError::BadKey);
        }
        let Some(token) = &creds.token else {
            return Err(AuthError::Missing);
        };
        if trust.jwt.is_empty() {
            return Err(AuthError::BadToken("tokens are not enabled".into()));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::BadToken(e.to_string()))?;
        let mut candidates = trust
            .jwt
            .iter()
            .filter(|k| k.algorithm == header.alg && (k.kid.is_none() || k.kid == header.kid))
            .peekable();
        if candidates.peek().is_none() {
            return Err(AuthError::BadToken(format!(
                "no key for {:?} tokens (kid {:?})",
                header.alg, header.kid
            )));
        }
        // Several keys may fit (the secret and `jwt_secret_previous`): the first whose
        // signature matches decides.
        let mut outcome = None;
        for key in candidates {
            let decoded = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation);
            let wrong_key = decoded
                .as_ref()
                .is_err_and(|e| *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature);
            outcome = Some(decoded);
            if !wrong_key {
                break;
            }
        }
        let decoded = outcome.ok_or(AuthError::Missing)?;
        let data = decoded.map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                AuthError::BadToken("token not valid yet (nbf)".into())
            }
            _ => AuthError::BadToken(e.to_string()),
        })?;
        let claims = data.claims;
        let scopes: Vec<Scope> = match claims.scopes {
            ScopeClaim::List(list) => list.iter().filter_map(|s| parse_scope(s)).collect(),
            ScopeClaim::Spaced(s) => s.split_whitespace().filter_map(parse_scope).collect(),
            ScopeClaim::None => vec![Scope::Subscribe],
        };
        let expires_secs = claims.exp.saturating_add(trust.leeway_secs);
        let grant = Grant {
            jti: claims.jti.map(Into::into),
            issued_s: claims.iat,
            channels: claims
                .channels
                .map(|list| list.into_iter().map(Into::into).collect()),
        };
        let org = match claims.org {
            Some(org) => org.into(),
            None => trust
                .default_org
                .clone()
                .ok_or_else(|| AuthError::BadToken("the token has no org".into()))?,
        };
        let principal = Principal {
            org,
            user: Some(claims.sub.into()),
            key_id: None,
            scopes: Scopes::from_list(&scopes),
            exclusive: claims.session.as_deref() == Some("exclusive"),
            expires_ms: Some(expires_secs.saturating_mul(1_000)),
            grant: Some(Box::new(grant)),
        };
        if self.is_revoked(&principal) {
            return Err(AuthError::Revoked);
        }
        Ok(Rc::new(principal))
    }
}

/// A key tokens may be signed with, and how they are checked with it.
#[derive(Clone)]
pub struct TokenKey {
    algorithm: Algorithm,
    /// Only for tokens with this `kid` (a JWKS key's); `None`: any.
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

/// The keys `[auth]` names (secret, PEM public key, JWKS file), read and checked.
pub fn token_keys(auth: &crate::config::Auth) -> Result<Vec<TokenKey>, String> {
    let mut keys: Vec<(Algorithm, Option<String>, DecodingKey)> = Vec::new();
    // The previous secret after the current one: a reload that rotates the secret keeps
    // the tokens signed with the old one valid until they expire.
    for secret in [&auth.jwt_secret, &auth.jwt_secret_previous] {
        if !secret.is_empty() {
            let secret = DecodingKey::from_secret(secret.as_bytes());
            keys.push((Algorithm::HS256, None, secret));
        }
    }
    if !auth.jwt_public_key.is_empty() {
        let path = &auth.jwt_public_key;
        let pem = std::fs::read(path).map_err(|e| format!("jwt_public_key {path}: {e}"))?;
        let key = DecodingKey::from_rsa_pem(&pem)
            .map(|k| (Algorithm::RS256, k))
            .or_else(|_| DecodingKey::from_ec_pem(&pem).map(|k| (Algorithm::ES256, k)))
            .map_err(|e| format!("jwt_public_key {path}: not an RSA or EC public key: {e}"))?;
        keys.push((key.0, None, key.1));
    }
    if !auth.jwks_file.is_empty() {
        let path = &auth.jwks_file;
        let mut text = std::fs::read(path).map_err(|e| format!("jwks_file {path}: {e}"))?;
        let set: jsonwebtoken::jwk::JwkSet = simd_json::serde::from_slice(&mut text)
            .map_err(|e| format!("jwks_file {path}: {e}"))?;
        for jwk in &set.keys {
            let algorithm = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec)
                    if ec.curve == jsonwebtoken::jwk::EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                // Other kinds of keys sign no token shardcast takes.
                _ => continue,
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("jwks_file {path}: {e}"))?;
            keys.push((algorithm, jwk.common.key_id.clone(), key));
        }
    }
    Ok(keys
        .into_iter()
        .map(|(algorithm, kid, key)| {
            let mut validation = Validation::new(algorithm);
            validation.leeway = auth.jwt_leeway_secs;
            // A token is refused before its `nbf` as after its `exp`.
            validation.validate_nbf = true;
            // A configured audience or issuer is required, not only checked when present.
            let mut required = vec!["exp", "sub"];
            required.extend((!auth.jwt_audience.is_empty()).then_some("aud"));
            required.extend((!auth.jwt_issuer.is_empty()).then_some("iss"));
            validation.set_required_spec_claims(&required);
            if auth.jwt_audience.is_empty() {
                validation.validate_aud = false;
            } else {
                validation.set_audience(&auth.jwt_audience);
            }
            if !auth.jwt_issuer.is_empty() {
                validation.set_issuer(&auth.jwt_issuer);
            }
            TokenKey {
                algorithm,
                kid,
                key,
                validation,
            }
        })
        .collect())
}

fn parse_scope(s: &str) -> Option<Scope> {
    match s {
        "subscribe" => Some(Scope::Subscribe),
        "publish" => Some(Scope::Publish),
        "ingest" => Some(Scope::Ingest),
        "admin" => Some(Scope::Admin),
        "tokens" => Some(Scope::Tokens),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKey;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn categories() -> Vec<String> {
        crate::config::Channels::default().categories
    }

    fn config() -> Config {
        let mut config = Config::default();
        config.auth.jwt_secret = "jwt-secret".into();
        config.api_keys.push(ApiKey {
            id: "k1".into(),
            secret: "s1".into(),
            org: "acme".into(),
            scopes: vec![Scope::Subscribe, Scope::Publish],
            session: Default::default(),
        });
        config
    }

    fn token(secret: &str, exp_offset: i64, scopes: serde_json::Value) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let claims =
            serde_json::json!({"sub":"u1","org":"acme","exp":now + exp_offset,"scopes":scopes});
        sign(secret, claims)
    }

    fn sign(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn parses_channels() {
        let c = Channel::parse("org:acme:decisions", &categories()).unwrap();
        assert_eq!(
            (c.kind, c.id, c.category),
            (ChannelKind::Org, "acme", "decisions")
        );
        for bad in [
            "org:acme",
            "team:x:decisions",
            "org::decisions",
            "org:a b:usage",
            "",
        ] {
            assert_eq!(
                Channel::parse(bad, &categories()),
                Err(ChannelError::Malformed),
                "{bad}"
            );
        }
        assert!(matches!(
            Channel::parse("org:acme:secrets", &categories()),
            Err(ChannelError::UnknownCategory(_))
        ));
        assert_eq!(Channel::owner_key("org:acme:decisions"), "org:acme");
        let room = Channel::parse("org:acme:usage:investigation:123", &categories()).unwrap();
        assert_eq!(
            (room.category, room.sub),
            ("usage", Some("investigation:123"))
        );
        assert_eq!(
            Channel::owner_key("org:acme:usage:investigation:123"),
            "org:acme"
        );
        for bad in [
            "org:acme:usage:",
            "org:acme:usage:a::b",
            "org:acme:usage:a b",
        ] {
            assert_eq!(
                Channel::parse(bad, &categories()),
                Err(ChannelError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn keys_and_tokens_resolve_to_principals() {
        let auth = Authenticator::new(&config());
        let creds = |key: Option<&str>, token: Option<String>| Credentials {
            key: key.map(String::from),
            token,
        };
        let p = auth.authenticate(&creds(Some("s1"), None)).unwrap();
        assert_eq!(&*p.org, "acme");
        assert_eq!(
            auth.authenticate(&creds(Some("nope"), None)),
            Err(AuthError::BadKey)
        );
        assert_eq!(
            auth.authenticate(&creds(None, None)),
            Err(AuthError::Missing)
        );

        let ok = token("jwt-secret", 60, serde_json::json!(["subscribe", "ingest"]));
        let p = auth.authenticate(&creds(None, Some(ok))).unwrap();
        assert_eq!(p.user.as_deref(), Some("u1"));
        assert!(p.scopes.has(Scope::Ingest) && !p.scopes.has(Scope::Publish));

        let expired = token("jwt-secret", -10, serde_json::json!("subscribe"));
        assert_eq!(
            auth.authenticate(&creds(None, Some(expired))),
            Err(AuthError::Expired)
        );
        let now = crate::decision::unix_ms() / 1000;
        let early = sign(
            "jwt-secret",
            serde_json::json!({"sub":"u1","org":"acme","exp":now + 7200,"nbf":now + 3600}),
        );
        let err = auth.authenticate(&creds(None, Some(early))).unwrap_err();
        assert!(err.to_string().contains("nbf"), "{err}");
        let ok = token("jwt-secret", 60, serde_json::json!("subscribe"));
        let p = auth.authenticate(&creds(None, Some(ok))).unwrap();
        let exp = p.expires_ms.unwrap() / 1000;
        assert!(exp.abs_diff(now + 60) <= 1, "expires {exp}, now {now}");
        let forged = token("other", 60, serde_json::json!("subscribe"));
        let err = auth.authenticate(&creds(None, Some(forged))).unwrap_err();
        assert_eq!(err.close_code(), Close::TokenRefused);
        assert_eq!(AuthError::BadKey.close_code(), Close::Unauthorized);
    }

    #[test]
    fn channel_permissions_follow_ownership_and_scope() {
        let cats = categories();
        let user = Principal {
            org: "acme".into(),
            user: Some("u1".into()),
            key_id: None,
            scopes: Scopes::from_list(&[Scope::Subscribe]),
            exclusive: false,
            expires_ms: None,
            grant: None,
        };
        let ch = |s| Channel::parse(s, &cats).unwrap();
        assert!(user.may(Scope::Subscribe, &ch("org:acme:decisions")));
        assert!(user.may(Scope::Subscribe, &ch("user:u1:notifications")));
        assert!(!user.may(Scope::Subscribe, &ch("org:other:decisions")));
        assert!(!user.may(Scope::Subscribe, &ch("user:u2:notifications")));
        assert!(!user.may(Scope::Subscribe, &ch("key:k1:usage")));
        assert!(!user.may(Scope::Publish, &ch("org:acme:decisions")));
        let admin = Principal {
            scopes: Scopes::from_list(&[Scope::Admin]),
            ..user
        };
        assert!(admin.may(Scope::Ingest, &ch("org:other:decisions")));
    }
}
