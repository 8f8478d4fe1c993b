//! The real socket.io-client 4 (pinned in tests/socketio/package.json), installed once into
//! the tests' target directory and driven through tests/socketio/driver.mjs: one JSON line
//! per command and per thing the client saw.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;

use serde_json::{json, Value};

use super::{Server, WAIT};

/// Where the client is installed, or why it could not be.
fn installed() -> &'static Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/socketio");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("socketio-client");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        for file in ["package.json", "driver.mjs"] {
            std::fs::copy(source.join(file), dir.join(file)).map_err(|e| e.to_string())?;
        }
        let marker = dir.join("node_modules/socket.io-client/package.json");
        let pinned = std::fs::read_to_string(source.join("package.json")).unwrap_or_default();
        let have = std::fs::read_to_string(&marker).unwrap_or_default();
        let version = |text: &str, key: &str| {
            serde_json::from_str::<Value>(text).ok().and_then(|v| {
                let v = if key.is_empty() {
                    v["version"].clone()
                } else {
                    v[key]["socket.io-client"].clone()
                };
                v.as_str().map(String::from)
            })
        };
        if version(&have, "").is_none() || version(&have, "") != version(&pinned, "dependencies") {
            let status = Command::new("npm")
                .args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--no-package-lock",
                    "--silent",
                ])
                .current_dir(&dir)
                .status()
                .map_err(|e| format!("npm: {e}"))?;
            if !status.success() {
                return Err(format!("npm install failed: {status}"));
            }
        }
        Command::new("node")
            .arg("--version")
            .output()
            .map_err(|e| format!("node: {e}"))?;
        Ok(dir)
    })
}

/// Whether the client can run here; `false` (with a loud note) when node or npm is
/// missing and CI is not set; under CI=true they must be there.
pub fn available(test: &str) -> bool {
    match installed() {
        Ok(_) => true,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPED {test}: socket.io-client cannot run here ({e})");
            false
        }
        Err(e) => panic!("socket.io-client must run under CI=true: {e}"),
    }
}

/// One socket.io-client in a node process of its own.
pub struct SioClient {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Value>,
    /// Reports received and not yet taken.
    pub backlog: std::collections::VecDeque<Value>,
}

impl SioClient {
    /// `io(http://server/, opts)`, with reconnection off unless `opts` turns it on.
    pub fn connect(server: &Server, opts: Value) -> SioClient {
        Self::connect_to(&format!("http://{}", server.addr), opts)
    }

    /// `io(url, opts)`.
    pub fn connect_to(url: &str, opts: Value) -> SioClient {
        let dir = installed().as_ref().expect("socket.io-client installed");
        let mut child = Command::new("node")
            .arg(dir.join("driver.mjs"))
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).unwrap_or(json!({ "raw": line }));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let mut client = SioClient {
            child,
            stdin,
            lines,
            backlog: Default::default(),
        };
        client.send(json!({ "op": "connect", "url": url, "opts": opts }));
        client
    }

    /// Send the driver a command.
    pub fn send(&mut self, command: Value) {
        writeln!(self.stdin, "{command}").expect("driver takes commands");
    }

    /// `socket.emit(event, ...args)`, with an ack callback when `ack`.
    pub fn emit(&mut self, event: &str, args: Value, ack: bool) {
        self.send(json!({ "op": "emit", "event": event, "args": args, "ack": ack }));
    }

    /// The first report for which `wanted` holds, among those not yet taken (so reports
    /// whose order does not matter may be waited for in any order).
    pub fn wait(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        if let Some(at) = self.backlog.iter().position(&wanted) {
            return self.backlog.remove(at).unwrap_or_default();
        }
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(report) if wanted(&report) => return report,
                Ok(report) => self.backlog.push_back(report),
                Err(_) => panic!(
                    "no {what} from the socket.io client in time; it reported {:?}",
                    self.backlog
                ),
            }
        }
    }

    /// Whether a report already received and not taken matches `wanted`.
    pub fn backlog_has(&mut self, wanted: impl Fn(&Value) -> bool) -> bool {
        while let Ok(report) = self.lines.try_recv() {
            self.backlog.push_back(report);
        }
        self.backlog.iter().any(wanted)
    }

    /// The arguments of the next `event`.
    pub fn event(&mut self, event: &str) -> Vec<Value> {
        let report = self.wait(event, |r| r["event"] == event);
        report["args"].as_array().cloned().unwrap_or_default()
    }

    /// The client's connect report (`{id, recovered}`); panics on `connect_error`.
    pub fn connected(&mut self) -> Value {
        let report = self.wait("connect", |r| {
            r.get("connect").is_some() || r.get("connect_error").is_some()
        });
        assert!(report.get("connect").is_some(), "refused: {report}");
        report["connect"].clone()
    }
}

impl Drop for SioClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
