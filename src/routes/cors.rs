//! Which browser origins may use the server: the `Origin` allow-list (`[http]
//! allowed_origins`) for WebSocket upgrades and HTTP requests, and the CORS headers that let a
//! page on an allowed origin read the HTTP API.
//!
//! A request without `Origin` is not from a browser page and is never refused here.

use crate::http::Response;

/// Methods the HTTP API answers (what a preflight is told).
pub const METHODS: &str = "GET, POST, DELETE, OPTIONS";
/// Request headers a page may send.
const HEADERS: &str = "Authorization, X-API-Key, Content-Type";
/// How long a browser may cache a preflight answer, in seconds.
const MAX_AGE_SECS: u32 = 600;

/// Why a pattern of `allowed_origins` is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "allowed_origins: {0:?} is not \"*\", an origin (scheme://host[:port]) or scheme://*.domain"
)]
pub struct BadPattern(pub String);

/// Check the patterns of `allowed_origins`: `*`, an origin such as `https://app.example.com`
/// or `http://localhost:3000`, or a scheme and any subdomain, `https://*.example.com`.
pub fn validate(patterns: &[String]) -> Result<(), BadPattern> {
    for pattern in patterns {
        let valid = pattern == "*"
            || pattern.split_once("://").is_some_and(|(scheme, host)| {
                !scheme.is_empty()
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'+')
                    && !host.is_empty()
                    && !host.contains('/')
                    && host.strip_prefix("*.").map_or(!host.contains('*'), |rest| {
                        !rest.is_empty() && !rest.contains('*')
                    })
            });
        if !valid {
            return Err(BadPattern(pattern.clone()));
        }
    }
    Ok(())
}

/// Whether a page on `origin` may use the server: any, when `patterns` is empty or holds
/// `*`; otherwise an exact match (ASCII case-insensitive) or a subdomain of a `*.` pattern.
pub fn allowed(patterns: &[String], origin: &str) -> bool {
    if patterns.is_empty() {
        return true;
    }
    patterns.iter().any(|pattern| {
        if pattern == "*" || pattern.eq_ignore_ascii_case(origin) {
            return true;
        }
        let Some((scheme, domain)) = pattern.split_once("://*.") else {
            return false;
        };
        let Some((their_scheme, host)) = origin.split_once("://") else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        let domain = domain.to_ascii_lowercase();
        their_scheme.eq_ignore_ascii_case(scheme)
            && host.len() > domain.len() + 1
            && host.ends_with(&domain)
            && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
    })
}

/// What a request's `Origin` means for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// No `Origin`: not a browser page.
    NoOrigin,
    /// A page on an allowed origin.
    Allowed(&'a str),
    /// A page on an origin that is not allowed.
    Refused,
}

/// Judge `origin` against `patterns`.
pub fn judge<'a>(patterns: &[String], origin: Option<&'a str>) -> Verdict<'a> {
    match origin {
        None => Verdict::NoOrigin,
        // Echoed in a header: printable ASCII only.
        Some(origin)
            if origin.bytes().all(|b| b.is_ascii_graphic()) && allowed(patterns, origin) =>
        {
            Verdict::Allowed(origin)
        }
        Some(_) => Verdict::Refused,
    }
}

/// The header lines that let a page on an allowed origin read a response (none for other
/// requests).
pub fn exposing(patterns: &[String], verdict: Verdict<'_>) -> String {
    let Verdict::Allowed(origin) = verdict else {
        return String::new();
    };
    if patterns.is_empty() || patterns.iter().any(|p| p == "*") {
        // Any origin: one cacheable answer for all (no cookies are used, so `*` is enough).
        return "Access-Control-Allow-Origin: *\r\n".to_string();
    }
    format!("Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n")
}

/// The answer to a CORS preflight (`OPTIONS` with `Access-Control-Request-Method`).
pub fn preflight(patterns: &[String], verdict: Verdict<'_>) -> Response {
    Response::empty(204)
        .header("Access-Control-Allow-Methods", METHODS)
        .header("Access-Control-Allow-Headers", HEADERS)
        .header("Access-Control-Max-Age", &MAX_AGE_SECS.to_string())
        .raw_headers(&exposing(patterns, verdict))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(patterns: &[&str]) -> Vec<String> {
        patterns.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn an_empty_list_or_a_star_allows_any_origin() {
        assert!(allowed(&[], "https://anything.example"));
        assert!(allowed(&list(&["*"]), "null"));
    }

    #[test]
    fn origins_match_exactly_or_as_subdomains() {
        let patterns = list(&["https://app.example.com", "http://*.corp.test"]);
        assert!(allowed(&patterns, "https://app.example.com"));
        assert!(allowed(&patterns, "HTTPS://App.Example.com"));
        assert!(!allowed(&patterns, "https://app.example.com:8443"));
        assert!(!allowed(&patterns, "http://app.example.com"));
        assert!(!allowed(&patterns, "https://evil-app.example.com"));
        assert!(allowed(&patterns, "http://a.corp.test"));
        assert!(allowed(&patterns, "http://a.b.corp.test"));
        assert!(
            !allowed(&patterns, "http://corp.test"),
            "the apex is not a subdomain"
        );
        assert!(!allowed(&patterns, "http://evilcorp.test"));
        assert!(
            !allowed(&patterns, "https://a.corp.test"),
            "the scheme must match"
        );
        assert!(!allowed(&patterns, "null"));
    }

    #[test]
    fn patterns_are_checked() {
        assert!(validate(&list(&["*", "https://a.b", "http://localhost:3000"])).is_ok());
        assert!(validate(&list(&["https://*.example.com"])).is_ok());
        for bad in [
            "example.com",
            "https://",
            "https://a/b",
            "https://a.*.com",
            "*.x.com",
        ] {
            assert!(validate(&list(&[bad])).is_err(), "{bad}");
        }
    }
}
