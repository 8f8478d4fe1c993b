//! HTTP/1.1 on the WebSocket port: request heads (httparse) and how long their bodies are,
//! the upgrade handshake's checks, and responses. Which path answers what is `routes/`.

use crate::auth::Credentials;

use crate::codes::ErrorCode;

/// Largest request head accepted (browsers behind proxies and with cookies send 8 KiB and more).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header lines accepted.
pub const MAX_HEADERS: usize = 64;

/// The parts of a request the server uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The query string (after `?`), as sent.
    pub query: String,
    /// Credentials from the query string or headers.
    pub credentials: Credentials,
    /// True when the request asks for a WebSocket upgrade.
    pub upgrade: bool,
    /// `Sec-WebSocket-Key`.
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version` is 13.
    pub ws_version_ok: bool,
    /// HTTP/1.1 or later (an upgrade needs it).
    pub http11: bool,
    /// `Origin`, sent by browsers.
    pub origin: Option<String>,
    /// A CORS preflight: `OPTIONS` with `Access-Control-Request-Method`.
    pub preflight: bool,
    /// The connection may carry another request after this one (HTTP/1.1 without
    /// `Connection: close`, or HTTP/1.0 with `keep-alive`).
    pub keep_alive: bool,
    /// `Content-Type`, as sent (`None` when absent).
    pub content_type: Option<String>,
    /// `Content-Length` (0 when absent).
    pub content_length: usize,
    /// A `Transfer-Encoding` was sent (not supported: bodies need `Content-Length`).
    pub transfer_encoding: bool,
    /// The body (filled in once `content_length` bytes have arrived).
    pub body: Vec<u8>,
    /// The connection's socket, for its peer's address (set by the connection; 0 or -1:
    /// none known).
    pub socket: i32,
}

/// Why a request head could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Not valid HTTP/1.x.
    #[error("malformed HTTP request")]
    Malformed,
    /// Head larger than [`MAX_HEAD`].
    #[error("request head too large")]
    TooLarge,
    /// `Content-Length` is not a number, or is sent twice with different values.
    #[error("invalid Content-Length")]
    BadLength,
}

/// Parse a request head from the front of `buf`: `Ok(None)` while incomplete, otherwise the
/// request and the head's length (bytes after it already belong to the WebSocket stream).
pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut out = Request {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query: query.to_string(),
        http11: req.version.is_some_and(|v| v >= 1),
        ..Request::default()
    };
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        match name {
            "key" => out.credentials.key = Some(percent_decode(value)),
            "token" => out.credentials.token = Some(percent_decode(value)),
            _ => {}
        }
    }
    let mut connection_upgrade = false;
    let mut upgrade_websocket = false;
    let (mut close, mut keep_alive) = (false, false);
    let mut content_length: Option<usize> = None;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade_websocket = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                connection_upgrade |= token.eq_ignore_ascii_case("upgrade");
                close |= token.eq_ignore_ascii_case("close");
                keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            // Two different lengths would let a proxy and this server split requests
            // differently (request smuggling): refused.
            let length = value.parse().map_err(|_| HeadError::BadLength)?;
            if content_length.is_some_and(|l| l != length) {
                return Err(HeadError::BadLength);
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            out.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case("content-type") {
            out.content_type = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("origin") {
            out.origin = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("access-control-request-method") {
            out.preflight = out.method == "OPTIONS";
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            out.ws_key = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            out.ws_version_ok = value == "13";
        } else if name.eq_ignore_ascii_case("x-api-key") {
            out.credentials.key = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("authorization") {
            if let Some(token) = value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
            {
                out.credentials.token = Some(token.trim().to_string());
            }
        }
    }
    out.upgrade = connection_upgrade && upgrade_websocket;
    out.keep_alive = if out.http11 { !close } else { keep_alive };
    out.content_length = content_length.unwrap_or(0);
    Ok(Some((out, len)))
}

/// True when a `Sec-WebSocket-Key` is what RFC 6455 4.1 asks for: 16 bytes, base64-encoded
/// (22 characters of the alphabet, then `==`).
pub fn ws_key_valid(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b.ends_with(b"==")
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/'))
}

/// Decode `%XX` escapes and `+` (a query string's spelling).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `101 Switching Protocols` response for a `Sec-WebSocket-Key`.
pub fn upgrade_response(ws_key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// Why an upgrade request cannot be upgraded: the response that says so.
pub fn check_upgrade(request: &Request) -> Result<&str, Response> {
    if !request.upgrade {
        let message = "this endpoint speaks WebSocket only";
        let response = Response::error(426, ErrorCode::UpgradeRequired, message);
        return Err(response.header("Upgrade", "websocket"));
    }
    if !request.ws_version_ok {
        let message = "unsupported WebSocket version";
        let response = Response::error(426, ErrorCode::BadVersion, message);
        return Err(response.header("Sec-WebSocket-Version", "13"));
    }
    if !request.http11 {
        let message = "a WebSocket upgrade needs HTTP/1.1";
        return Err(Response::error(400, ErrorCode::BadRequest, message));
    }
    match request.ws_key.as_deref().filter(|k| ws_key_valid(k)) {
        Some(key) => Ok(key),
        None => {
            let message = "Sec-WebSocket-Key must be 16 bytes, base64-encoded";
            Err(Response::error(400, ErrorCode::BadRequest, message))
        }
    }
}

/// A response, written out by the connection (which knows whether it stays open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: u16,
    content_type: &'static str,
    /// Extra header lines, each ending in CRLF.
    headers: String,
    body: Vec<u8>,
}

impl Response {
    /// A response with a body.
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type,
            headers: String::new(),
            body: body.into(),
        }
    }

    /// A JSON response.
    pub fn json(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self::new(status, "application/json", body)
    }

    /// A response without a body.
    pub fn empty(status: u16) -> Self {
        Self::new(status, "", Vec::new())
    }

    /// A JSON error: `{"error":code,"message":…}`.
    pub fn error(status: u16, code: ErrorCode, message: &str) -> Self {
        let mut body = Vec::new();
        body.extend_from_slice(br#"{"error":"#);
        crate::json::push_str(&mut body, code.as_str());
        body.extend_from_slice(br#","message":"#);
        crate::json::push_str(&mut body, message);
        body.push(b'}');
        Self::json(status, body)
    }

    /// The same response with one more header (`value` is the server's, never a client's).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push_str(name);
        self.headers.push_str(": ");
        self.headers.push_str(value);
        self.headers.push_str("\r\n");
        self
    }

    /// The same response with more header lines (each ending in CRLF).
    pub fn raw_headers(mut self, lines: &str) -> Self {
        self.headers.push_str(lines);
        self
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The bytes to send; `keep_alive` says whether the connection stays open after it.
    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            202 => "Accepted",
            204 => "No Content",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            409 => "Conflict",
            411 => "Length Required",
            413 => "Content Too Large",
            415 => "Unsupported Media Type",
            426 => "Upgrade Required",
            429 => "Too Many Requests",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let mut out = format!("HTTP/1.1 {} {reason}\r\n", self.status);
        if !self.content_type.is_empty() {
            out.push_str("Content-Type: ");
            out.push_str(self.content_type);
            out.push_str("\r\n");
        }
        if self.status != 204 {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("Cache-Control: no-store\r\nConnection: ");
        out.push_str(connection);
        out.push_str("\r\n");
        out.push_str(&self.headers);
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upgrade_with_credentials() {
        let head = b"GET /ws?org=x&key=a%2Bb%20c HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nrest";
        let (req, len) = parse(head).unwrap().unwrap();
        assert_eq!(&head[len..], b"rest");
        assert_eq!(req.path, "/ws");
        assert!(req.upgrade && req.ws_version_ok);
        assert_eq!(req.credentials.key.as_deref(), Some("a+b c"));
        let resp = String::from_utf8(upgrade_response(check_upgrade(&req).unwrap())).unwrap();
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    }

    #[test]
    fn headers_carry_key_and_bearer_token() {
        let head = b"GET /ws HTTP/1.1\r\nX-API-Key: k\r\nAuthorization: Bearer t.t.t\r\n\r\n";
        let (req, _) = parse(head).unwrap().unwrap();
        assert_eq!(req.credentials.key.as_deref(), Some("k"));
        assert_eq!(req.credentials.token.as_deref(), Some("t.t.t"));
        assert!(!req.upgrade);
    }

    #[test]
    fn incomplete_oversized_and_malformed_heads() {
        assert_eq!(parse(b"GET /health HTTP/1.1\r\nHost"), Ok(None));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(vec![b'a'; MAX_HEAD + 1]);
        assert_eq!(parse(&big), Err(HeadError::TooLarge));
        assert_eq!(
            parse(b"\x16\x03\x01 hello\r\n\r\n"),
            Err(HeadError::Malformed)
        );
    }

    #[test]
    fn websocket_keys_are_16_bytes_of_base64() {
        assert!(ws_key_valid("dGhlIHNhbXBsZSBub25jZQ=="));
        for bad in [
            "",
            "c2hvcnQ=",
            "dGhlIHNhbXBsZSBub25jZQ",
            "!GhlIHNhbXBsZSBub25jZQ==",
        ] {
            assert!(!ws_key_valid(bad), "{bad}");
        }
        let head = b"GET /ws HTTP/1.0\r\nHost: h\r\n\r\n";
        assert!(!parse(head).unwrap().unwrap().0.http11);
    }

    #[test]
    fn percent_decoding_tolerates_bad_escapes() {
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
        assert_eq!(percent_decode("%41%42"), "AB");
    }
}
