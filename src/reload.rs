//! Watching the configuration file: a thread that looks at it every so often and calls back
//! when its content changed. Polling, not inotify: editors replace files by renaming and
//! Kubernetes swaps a ConfigMap's symlink, both of which a watch on the file misses; reading
//! a small file once a second costs nothing.

use std::path::PathBuf;
use std::time::Duration;

/// Call `changed` whenever the content of `path` differs from what it was at the last look
/// (the first look is now). A file that cannot be read (being replaced) is looked at again
/// next time.
pub fn watch(path: PathBuf, every: Duration, changed: impl Fn() + Send + 'static) {
    let mut seen = std::fs::read(&path).ok();
    let shown = path.display().to_string();
    let spawned = std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let Ok(now) = std::fs::read(&path) else {
                continue;
            };
            if seen.as_ref() != Some(&now) {
                seen = Some(now);
                changed();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch {shown} ({e}): reload with SIGHUP");
    }
}
