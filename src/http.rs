//! HTTP/1.1 on the WebSocket port: request parsing (httparse), the upgrade, and plain responses.

use crate::auth::Credentials;

use crate::codes::ErrorCode;

/// Largest request head accepted (browsers behind proxies and with cookies send 8 KiB and more).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header lines accepted.
pub const MAX_HEADERS: usize = 64;

/// The parts of a request the server uses.
#[derive(Debug, Default, PartialEq, Eq)]
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
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade_websocket = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade = value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
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

/// A complete response that closes the connection.
pub fn response(status: u16, content_type: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Content Too Large",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A JSON error response: `{"error":code,"message":…}`.
pub fn error_response(status: u16, code: ErrorCode, message: &str, extra_headers: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(br#"{"error":"#);
    crate::json::push_str(&mut body, code.as_str());
    body.extend_from_slice(br#","message":"#);
    crate::json::push_str(&mut body, message);
    body.push(b'}');
    response(
        status,
        "application/json",
        extra_headers,
        &String::from_utf8_lossy(&body),
    )
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
        let resp = String::from_utf8(upgrade_response(req.ws_key.as_deref().unwrap())).unwrap();
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
