//! The configuration loader on arbitrary TOML, with an environment override taken from the
//! input: errors are fine, panics are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A line "ENV NAME=VALUE" at the start becomes an override.
    let (env, toml) = match text.strip_prefix("ENV ").and_then(|t| t.split_once('\n')) {
        Some((line, rest)) => match line.split_once('=') {
            Some((k, v)) => (vec![(format!("SHARDCAST_{k}"), v.to_string())], rest),
            None => (Vec::new(), text),
        },
        None => (Vec::new(), text),
    };
    let _ = shardcast::config::Config::parse(toml, "fuzz", env);
});
