//! Every code a client can be told, in one place: the error codes of `ERROR` frames and HTTP
//! error bodies, and the WebSocket close codes the server sends. The wire strings and numbers
//! are the protocol: renaming a variant must not change them.

/// Machine-readable error codes (`ERROR` frames, HTTP error bodies, auth failure labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed request: bad JSON, unknown type, missing or ill-typed field, duplicate key.
    BadRequest,
    /// The credentials do not allow this.
    Forbidden,
    /// Not a valid channel name.
    InvalidChannel,
    /// An INGEST whose decision fails validation.
    InvalidDecision,
    /// The connection holds `limits.max_subscriptions` already.
    TooManySubscriptions,
    /// The channel has `limits.max_subscribers_per_channel` subscribers already.
    TooManySubscribers,
    /// The org holds its `max_connections` already.
    TooManyConnections,
    /// The connection's token has expired (REFRESH to continue).
    TokenExpired,
    /// The decision store cannot take or read decisions now.
    StorageUnavailable,
    /// The server is draining.
    ShuttingDown,
    /// Over the rate limit.
    RateLimited,
    /// Frames were dropped because the connection reads too slowly.
    SlowConsumer,
    /// No API key or token.
    MissingCredentials,
    /// Unknown API key.
    InvalidKey,
    /// A token that does not verify.
    InvalidToken,
    /// A revoked token.
    TokenRevoked,
    /// `POST /api/tokens` on a server without `auth.jwt_secret`.
    TokensDisabled,
    /// A plain HTTP request on a WebSocket endpoint.
    UpgradeRequired,
    /// An unsupported `Sec-WebSocket-Version`.
    BadVersion,
    /// At `max_connections`.
    OverCapacity,
    /// Not ready for traffic (`/health/ready`).
    NotReady,
    /// No such route.
    NotFound,
    /// The route exists for other methods.
    MethodNotAllowed,
    /// The request's `Origin` is not in `http.allowed_origins`.
    OriginNotAllowed,
    /// A request body over `http.max_body_bytes`.
    PayloadTooLarge,
    /// A request body without `Content-Length`.
    LengthRequired,
    /// A request body that is not JSON (`Content-Type`).
    UnsupportedMediaType,
    /// A cluster node cannot reach its Redis: the request was not carried out.
    ClusterUnavailable,
    /// Too much is waiting inside the server (other shards, Redis): retry shortly.
    Overloaded,
    /// The server's own fault.
    Internal,
}

impl ErrorCode {
    /// The code as sent.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::InvalidDecision => "invalid_decision",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::TooManySubscribers => "too_many_subscribers",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::MissingCredentials => "missing_credentials",
            ErrorCode::InvalidKey => "invalid_key",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::TokenRevoked => "token_revoked",
            ErrorCode::TokensDisabled => "tokens_disabled",
            ErrorCode::UpgradeRequired => "upgrade_required",
            ErrorCode::BadVersion => "bad_version",
            ErrorCode::OverCapacity => "over_capacity",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::OriginNotAllowed => "origin_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::LengthRequired => "length_required",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::ClusterUnavailable => "cluster_unavailable",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Internal => "internal",
        }
    }
}

impl ErrorCode {
    /// The HTTP status a request refused with this code gets.
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::InvalidChannel
            | ErrorCode::InvalidDecision
            | ErrorCode::TooManySubscriptions
            | ErrorCode::TooManySubscribers
            | ErrorCode::BadVersion => 400,
            ErrorCode::MissingCredentials
            | ErrorCode::InvalidKey
            | ErrorCode::InvalidToken
            | ErrorCode::TokenExpired
            | ErrorCode::TokenRevoked => 401,
            ErrorCode::TokensDisabled => 409,
            ErrorCode::Forbidden | ErrorCode::OriginNotAllowed => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::LengthRequired => 411,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::UpgradeRequired => 426,
            ErrorCode::RateLimited | ErrorCode::SlowConsumer | ErrorCode::TooManyConnections => 429,
            ErrorCode::Internal => 500,
            ErrorCode::StorageUnavailable
            | ErrorCode::ShuttingDown
            | ErrorCode::OverCapacity
            | ErrorCode::NotReady
            | ErrorCode::ClusterUnavailable
            | ErrorCode::Overloaded => 503,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// WebSocket close codes the server sends (RFC 6455 section 7.4, and shardcast's own 4xxx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The client closed; answered in kind.
    Normal,
    /// The server is restarting (after `SYSTEM restart`).
    GoingAway,
    /// A frame broke the protocol.
    ProtocolError,
    /// Text that is not UTF-8.
    InvalidData,
    /// The connection read too slowly (policy "close").
    SlowConsumer,
    /// A message over `limits.max_message_bytes`.
    TooBig,
    /// Too many malformed or refused messages.
    BadMessages,
    /// Missing or unknown credentials.
    Unauthorized,
    /// An exclusive session is held by another connection (`[sessions] policy = "reject"`).
    SessionConflict,
    /// An invalid or expired token.
    TokenRefused,
    /// A message left incomplete, or replies left unread, for too long.
    Stalled,
    /// A newer connection took this one's exclusive session (the event gateway's code: the
    /// same as [`Close::Stalled`]'s, told apart by the reason and the SYSTEM before it).
    SessionReplaced,
    /// Over the rate limit, repeatedly.
    RateLimited,
    /// Asked for through the server API (`DELETE /api/connections/{id}?code=`): 1000, 1001,
    /// 1008, or 3000 to 4999.
    Requested(u16),
}

impl Close {
    /// The code as sent.
    pub const fn code(self) -> u16 {
        match self {
            Close::Normal => 1000,
            Close::GoingAway => 1001,
            Close::ProtocolError => 1002,
            Close::InvalidData => 1007,
            Close::SlowConsumer => 1008,
            Close::TooBig => 1009,
            Close::BadMessages => 4400,
            Close::Unauthorized => 4401,
            Close::SessionConflict => 4402,
            Close::TokenRefused => 4403,
            Close::Stalled | Close::SessionReplaced => 4408,
            Close::RateLimited => 4429,
            Close::Requested(code) => code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_wire_strings_and_numbers() {
        assert_eq!(
            ErrorCode::TooManySubscriptions.as_str(),
            "too_many_subscriptions"
        );
        assert_eq!(ErrorCode::BadRequest.to_string(), "bad_request");
        assert_eq!(Close::Stalled.code(), 4408);
        assert_eq!(Close::TooBig.code(), 1009);
    }
}
