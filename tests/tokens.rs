//! Tokens signed with public-key algorithms, as identity providers issue them: RS256 and
//! ES256 with a PEM public key, RS256 from a JWKS file chosen by `kid` (Auth0, Supabase),
//! and the `aud`, `iss` and missing-`org` rules. Keys are made by `openssl`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// A private key made with `genpkey` options, and its public key: (private PEM, public path).
fn key_pair(dir: &Path, name: &str, genpkey: &[&str]) -> (Vec<u8>, PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let private_s = private.to_str().unwrap();
    let mut args = vec!["genpkey", "-out", private_s];
    args.extend_from_slice(genpkey);
    openssl(&args);
    openssl(&[
        "pkey",
        "-in",
        private_s,
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (std::fs::read(&private).unwrap(), public)
}

fn rsa(dir: &Path, name: &str) -> (Vec<u8>, PathBuf) {
    key_pair(
        dir,
        name,
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    )
}

/// base64url without padding.
fn b64url(bytes: &[u8]) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| n << 8 | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The JWKS entry of an RSA public key, with `kid`.
fn rsa_jwk(public: &Path, kid: &str) -> Value {
    let modulus = openssl(&[
        "rsa",
        "-pubin",
        "-in",
        public.to_str().unwrap(),
        "-noout",
        "-modulus",
    ]);
    let hex = modulus.trim().strip_prefix("Modulus=").unwrap();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64url(&bytes), "e": "AQAB"})
}

fn sign(algorithm: Algorithm, kid: Option<&str>, private: &[u8], claims: Value) -> String {
    let key = match algorithm {
        Algorithm::ES256 => EncodingKey::from_ec_pem(private),
        _ => EncodingKey::from_rsa_pem(private),
    }
    .unwrap();
    let mut header = Header::new(algorithm);
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn claims(extra: Value) -> Value {
    let mut claims = json!({"sub": "u1", "exp": unix_now() + 300, "scopes": ["subscribe"]});
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    claims
}

/// Whether `token` is accepted: READY, or closed with 4403.
fn accepted(server: &Server, token: &str) -> bool {
    let mut c = Client::connect(server.addr, &format!("/ws?token={token}")).expect("upgrade");
    match c.recv_close_or_text() {
        Ok(ready) if ready["type"] == "READY" => true,
        Err(Some(4403)) => false,
        other => panic!("{other:?}"),
    }
}

#[test]
fn rs256_and_es256_tokens_are_checked_with_a_pem_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let (rsa_private, rsa_public) = rsa(dir.path(), "rsa");
    let (other_private, _) = rsa(dir.path(), "other");
    let server = Server::start(&format!(
        "[auth]\njwt_public_key = \"{}\"\n",
        rsa_public.display()
    ));
    let token = sign(
        Algorithm::RS256,
        None,
        &rsa_private,
        claims(json!({"org": "acme"})),
    );
    let mut c = server.client(&format!("/ws?token={token}"));
    // Exactly its rights: its own channel, not another user's.
    c.subscribe(&["user:u1:notifications"]);
    c.send(json!({"type":"SUB","channels":["user:u2:notifications"]}));
    assert_eq!(c.recv()["code"], "forbidden");
    // Another key's signature, and an HS256 token (the secret is set too): each by its own key.
    let forged = sign(
        Algorithm::RS256,
        None,
        &other_private,
        claims(json!({"org": "acme"})),
    );
    assert!(!accepted(&server, &forged));
    assert!(accepted(&server, &jwt(300, &["subscribe"])));

    let (ec_private, ec_public) = key_pair(
        dir.path(),
        "ec",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let server = Server::start(&format!(
        "[auth]\njwt_public_key = \"{}\"\n",
        ec_public.display()
    ));
    let token = sign(
        Algorithm::ES256,
        None,
        &ec_private,
        claims(json!({"org": "acme"})),
    );
    assert!(accepted(&server, &token));
    // An RS256 token where only an EC key is configured: no key for it.
    let rs = sign(
        Algorithm::RS256,
        None,
        &rsa_private,
        claims(json!({"org": "acme"})),
    );
    assert!(!accepted(&server, &rs));
}

#[test]
fn jwks_keys_are_chosen_by_kid_and_aud_iss_and_org_rules_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (one_private, one_public) = rsa(dir.path(), "one");
    let (two_private, two_public) = rsa(dir.path(), "two");
    let jwks = dir.path().join("jwks.json");
    let set = json!({"keys": [rsa_jwk(&one_public, "k1"), rsa_jwk(&two_public, "k2")]});
    std::fs::write(&jwks, set.to_string()).unwrap();
    let server = Server::start(&format!(
        "[auth]\njwks_file = \"{}\"\njwt_audience = [\"authenticated\"]\n\
         jwt_issuer = [\"https://example.supabase.co/auth/v1\"]\njwt_default_org = \"acme\"\n",
        jwks.display()
    ));
    // As Supabase issues them: aud, iss, no org (the default org's).
    let good =
        claims(json!({"aud": "authenticated", "iss": "https://example.supabase.co/auth/v1"}));
    let token = sign(Algorithm::RS256, Some("k2"), &two_private, good.clone());
    let mut c = server.client(&format!("/ws?token={token}"));
    c.subscribe(&["org:acme:usage"]);
    assert!(accepted(
        &server,
        &sign(Algorithm::RS256, Some("k1"), &one_private, good.clone())
    ));
    // Signed by k1 but naming k2; an unknown kid.
    assert!(!accepted(
        &server,
        &sign(Algorithm::RS256, Some("k2"), &one_private, good.clone())
    ));
    assert!(!accepted(
        &server,
        &sign(Algorithm::RS256, Some("k9"), &one_private, good.clone())
    ));
    // The wrong audience, the wrong issuer, neither.
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("someone-else");
    assert!(!accepted(
        &server,
        &sign(Algorithm::RS256, Some("k1"), &one_private, wrong_aud)
    ));
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("https://evil.example/");
    assert!(!accepted(
        &server,
        &sign(Algorithm::RS256, Some("k1"), &one_private, wrong_iss)
    ));
    let bare = claims(json!({}));
    assert!(!accepted(
        &server,
        &sign(Algorithm::RS256, Some("k1"), &one_private, bare)
    ));
    // An HS256 token needs `aud` and `iss` now too.
    assert!(!accepted(&server, &jwt(300, &["subscribe"])));

    // Without a default org, a token with no org is refused.
    let strict = Server::start(&format!("[auth]\njwks_file = \"{}\"\n", jwks.display()));
    let no_org = sign(Algorithm::RS256, Some("k1"), &one_private, good);
    assert!(!accepted(&strict, &no_org));
    let with_org = claims(json!({"org": "acme", "aud": "anything"}));
    assert!(accepted(
        &strict,
        &sign(Algorithm::RS256, Some("k1"), &one_private, with_org)
    ));
}

#[test]
fn an_unreadable_or_wrong_key_file_stops_the_server_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shardcast.toml");
    let not_a_key = dir.path().join("key.pem");
    std::fs::write(&not_a_key, "hello").unwrap();
    for (setting, path) in [
        ("jwt_public_key", not_a_key.display().to_string()),
        ("jwks_file", not_a_key.display().to_string()),
        ("jwks_file", "/nonexistent/jwks.json".to_owned()),
    ] {
        std::fs::write(&file, format!("[auth]\n{setting} = \"{path}\"\n")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_shardcast"))
            .args(["check-config", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(setting), "{err}");
    }
}
