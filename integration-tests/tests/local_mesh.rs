//! `flagmesh-topology`, the local mesh `make run` starts, as a process: a
//! stop by SIGTERM (a service manager's, a CI runner's) stops every node it
//! started, as Ctrl-C does, and leaves none running.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The processes whose command line names `dir`.
fn processes_under(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn the_local_mesh_stops_its_nodes_on_sigterm() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("mesh");
    let flags = dir.path().join("flags.json");
    std::fs::write(
        &flags,
        r#"{"metadata":{"flagSetId":"demo"},"flags":{"f":{"state":"ENABLED","variants":{"on":true,"off":false},"defaultVariant":"on"}}}"#,
    )?;
    let mut mesh = Command::new(env!("CARGO_BIN_EXE_flagmesh-topology"))
        .arg("--data")
        .arg(&data)
        .args(["--hubs", "1", "--pops-per-hub", "1", "--control-port", "0"])
        .arg("--flags")
        .arg(&flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    // running once it says how to stop it (bounded: the reader ends with
    // the process)
    let stdout = mesh.stdout.take().ok_or("no stdout")?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("Press Ctrl-C to stop") {
                let _ = ready_tx.send(());
            }
        }
    });
    if ready_rx.recv_timeout(Duration::from_secs(120)).is_err() {
        let _ = mesh.kill();
        return Err("the local mesh did not start within 120 s".into());
    }
    let nodes: Vec<i32> = processes_under(&data)
        .into_iter()
        .filter(|pid| i64::from(*pid) != i64::from(mesh.id()))
        .collect();
    assert_eq!(nodes.len(), 3, "control, hub and PoP run: {nodes:?}");

    let pid = nix::unistd::Pid::from_raw(i32::try_from(mesh.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if mesh.try_wait()?.is_some() && processes_under(&data).is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let left = processes_under(&data);
            for p in &left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = mesh.kill();
            panic!("30 s after SIGTERM, still running under {data:?}: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
