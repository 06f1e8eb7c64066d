//! A node process under test: started with its arguments, waited for until
//! it prints `flagmesh ready grpc=ADDR http=ADDR`, its stderr kept in a log
//! file, and stopped by SIGTERM (graceful) or SIGKILL. Dropping it kills it.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a node may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running node process.
#[derive(Debug)]
pub struct NodeProcess {
    child: Child,
    /// The bound gRPC address.
    pub grpc: SocketAddr,
    /// The bound HTTP address, if it has an HTTP listener.
    pub http: Option<SocketAddr>,
    /// Where its stderr goes.
    pub log: PathBuf,
}

/// Parses a ready line into its addresses.
pub fn parse_ready(line: &str) -> Option<(SocketAddr, Option<SocketAddr>)> {
    let rest = line.trim().strip_prefix("flagmesh ready ")?;
    let mut grpc = None;
    let mut http = None;
    for part in rest.split_whitespace() {
        match part.split_once('=') {
            Some(("grpc", a)) => grpc = a.parse().ok(),
            Some(("http", a)) => http = a.parse().ok(),
            _ => {}
        }
    }
    Some((grpc?, http))
}

impl NodeProcess {
    /// Starts `binary` with `args` (and `envs`), its stderr appended to
    /// `log`, and waits for its ready line.
    pub fn start(
        binary: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> std::io::Result<Self> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout pipe"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addrs) = parse_ready(&line) {
                    let _ = tx.send(addrs);
                }
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok((grpc, http)) => {
                    return Ok(Self {
                        child,
                        grpc,
                        http,
                        log: log.to_path_buf(),
                    });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(std::io::Error::other(format!(
                            "{} exited with {status} before it was ready; log:\n{}",
                            binary.display(),
                            tail(log)
                        )));
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        return Err(std::io::Error::other(format!(
                            "{} was not ready within {READY_TIMEOUT:?}; log:\n{}",
                            binary.display(),
                            tail(log)
                        )));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(std::io::Error::other(format!(
                        "{} closed stdout before it was ready; log:\n{}",
                        binary.display(),
                        tail(log)
                    )));
                }
            }
        }
    }

    /// The gRPC endpoint as a URI.
    pub fn grpc_uri(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// SIGKILL: no chance to flush or drain.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `deadline` for a clean exit (SIGKILL after).
    /// Returns whether it exited by itself.
    pub fn terminate(&mut self, deadline: Duration) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let until = Instant::now() + deadline;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        false
    }

    /// Whether it still runs (it has not exited or died).
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// The last lines of a log file, for failure messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_lines() {
        let (g, h) =
            parse_ready("flagmesh ready grpc=127.0.0.1:5000 http=-").expect("a ready line");
        assert_eq!(g.port(), 5000);
        assert_eq!(h, None);
        assert!(parse_ready("something else").is_none());
    }
}
