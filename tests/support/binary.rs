//! The real binary as a child process, for tests that need signals or its logs.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// `cph-cache serve` as a child process with its stderr collected on a thread.
pub struct Sidecar {
    child: Child,
    pub config_path: PathBuf,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    stderr: mpsc::Receiver<String>,
}

impl Sidecar {
    /// Starts it with `config` (listen on port 0) and `RUST_LOG=rust_log`; returns once it
    /// logs that it is serving, with the bound addresses.
    pub fn start(rust_log: &str, config: &str, env: &[(&str, &str)]) -> Sidecar {
        let path = std::env::temp_dir().join(format!(
            "cph-cache-sidecar-{}-{}.toml",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::write(&path, config).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_cph-cache"));
        command
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let serving = wait_for_line(&rx, "serving");
        let field = |name: &str| -> SocketAddr {
            let start = serving.find(&format!(" {name}=")).unwrap() + name.len() + 2;
            serving[start..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        Sidecar {
            child,
            config_path: path,
            proxy: field("listen"),
            admin: field("admin_listen"),
            stderr: rx,
        }
    }

    /// Sends `signal` (e.g. "HUP") with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (bounded) for a log line containing `needle` and returns it.
    pub fn wait_for_log(&self, needle: &str) -> String {
        wait_for_line(&self.stderr, needle)
    }

    /// SIGTERM, wait for exit 0, and return everything it logged after start-up.
    pub fn stop(mut self) -> String {
        self.signal("TERM");
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "exit status {exit:?}");
        let mut logs = String::new();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(5)) {
            logs.push_str(&line);
            logs.push('\n');
        }
        logs
    }
}

fn wait_for_line(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no log line with {needle:?} within 20 s"));
        if line.contains(needle) {
            return line;
        }
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::SeqCst)
}
