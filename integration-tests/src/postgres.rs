//! A private PostgreSQL cluster for tests: Debian's server binaries
//! (`/usr/lib/postgresql/N/bin`), `initdb` in a temporary directory, the
//! server started by `pg_ctl` on a free loopback port with its socket in
//! that directory, as the `postgres` user when the tests run as root (the
//! server refuses to run as root). Stopped and removed when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running (or stopped) private cluster.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    as_postgres: bool,
}

fn other(message: String) -> std::io::Error {
    std::io::Error::other(message)
}

/// The newest installed server's binaries.
fn server_bin() -> std::io::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| {
            other(format!(
                "PostgreSQL's server is not installed (/usr/lib/postgresql: {e}); `make test` installs Debian's postgresql package"
            ))
        })?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, p)| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .ok_or_else(|| other("no PostgreSQL server under /usr/lib/postgresql".into()))
}

impl PgCluster {
    /// Initialises and starts a cluster; its superuser is `flagmesh`.
    pub fn start() -> std::io::Result<Self> {
        let bin = server_bin()?;
        let dir = tempfile::Builder::new().prefix("flagmesh-pg-").tempdir()?;
        let as_postgres = nix::unistd::geteuid().is_root();
        if as_postgres {
            // the server runs as postgres: it must own its folder
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()?;
            if !status.success() {
                return Err(other("chown of the cluster folder failed".into()));
            }
        }
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let cluster = Self {
            dir,
            bin,
            port,
            as_postgres,
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data().display().to_string(),
                "-U",
                "flagmesh",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        cluster.resume()?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Its folder (socket, log, data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A connection URL for its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://flagmesh@127.0.0.1:{}/postgres", self.port)
    }

    fn run(&self, tool: &str, args: &[&str]) -> std::io::Result<()> {
        let program = self.bin.join(tool);
        let output = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&program)
                .args(args)
                .output()?
        } else {
            Command::new(&program).args(args).output()?
        };
        if output.status.success() {
            Ok(())
        } else {
            Err(other(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )))
        }
    }

    /// Starts the server (again), waiting until it accepts connections.
    pub fn resume(&self) -> std::io::Result<()> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.dir.path().join("server.log").display().to_string(),
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
        )
    }

    /// Stops the server (a clean, fast shutdown), waiting until it is down.
    pub fn pause(&self) -> std::io::Result<()> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-w",
                "-m",
                "fast",
                "stop",
            ],
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-w",
                "-m",
                "immediate",
                "stop",
            ],
        );
    }
}
