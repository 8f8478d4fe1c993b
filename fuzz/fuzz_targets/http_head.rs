//! The HTTP request head as the server reads it, then what the server does with its parts:
//! the upgrade checks, the Origin verdict, percent-decoding, and the API's query parsing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::auth::{Principal, Scopes};
use shardcast::config::Scope;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((request, len))) = shardcast::http::parse(data) else {
        return;
    };
    assert!(len <= data.len());
    if let Ok(key) = shardcast::http::check_upgrade(&request) {
        let _ = shardcast::http::upgrade_response(key);
    }
    let patterns = [
        "https://app.example.com".to_string(),
        "https://*.corp.test".to_string(),
    ];
    let verdict = shardcast::routes::cors::judge(&patterns, request.origin.as_deref());
    // An origin echoed in a header must never break the response head.
    let exposed = shardcast::routes::cors::exposing(&patterns, verdict);
    assert_eq!(exposed.matches("\r\n").count(), exposed.lines().count());
    let _ = shardcast::http::percent_decode(&request.path);
    let admin = Principal {
        org: "ops".into(),
        user: None,
        key_id: None,
        scopes: Scopes::from_list(&[Scope::Admin]),
        exclusive: false,
        expires_ms: None,
        grant: None,
    };
    let _ = shardcast::routes::api::decisions_query(&admin, &request.query);
    let categories = ["decisions".to_string(), "usage".to_string()];
    if let Some(name) = request.path.strip_prefix("/api/channels/") {
        let name = shardcast::http::percent_decode(name);
        let _ = shardcast::routes::api::history_query(&admin, &name, &categories, &request.query);
    }
});
