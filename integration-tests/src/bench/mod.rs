//! The benchmarks behind `make bench` (`flagmesh-bench`): evaluation load at
//! fixed concurrency and at a fixed rate (open loop), propagation across a
//! scale mesh, PoP memory, PoP cold start, and hub fan-out cost. Each writes
//! machine-readable results to `target/bench-results/` and its table to
//! `BENCHMARKS.md` between markers.

pub mod coldstart;
pub mod fanout;
pub mod load;
pub mod memory;
pub mod peer;
pub mod propagation;
pub mod reconnect;
pub mod writes;

use std::path::Path;

use serde_json::{Value, json};

use crate::flagd_kit::workspace_root;

/// A realistic flag: targeting with several clauses and a fractional split,
/// and metadata (about 450 bytes of JSON).
pub fn realistic_flag(i: usize) -> Value {
    json!({
        "state": "ENABLED",
        "variants": {"on": true, "off": false},
        "defaultVariant": "off",
        "targeting": {"if": [
            {"and": [
                {"in": [{"var": "country"}, ["NL", "DE", "FR", "BE"]]},
                {">=": [{"var": "age"}, 18]},
                {"ends_with": [{"var": "email"}, "@example.com"]}
            ]},
            "on",
            {"fractional": [{"cat": [{"var": "$flagd.flagKey"}, {"var": "targetingKey"}]}, ["on", (i % 50) + 1], ["off", 100]]}
        ]},
        "metadata": {"owner": format!("team-{}", i % 40), "ticket": format!("FLAG-{i}")}
    })
}

/// A realistic flag whose targeting no other flag repeats: the same shape
/// as [`realistic_flag`], with its own literals (a fleet of unrelated
/// flags, where nothing can be shared).
pub fn distinct_flag(i: usize) -> Value {
    let mut f = realistic_flag(i);
    let clause = &mut f["targeting"]["if"][0]["and"];
    clause[0]["in"][1] = json!(["NL", "DE", "FR", format!("X{i}")]);
    clause[1][">="][1] = json!(i);
    clause[2]["ends_with"][1] = json!(format!("@example-{i}.com"));
    f
}

/// A flagd document of `count` realistic flags named `prefix-N`.
pub fn document(set: &str, prefix: &str, start: usize, count: usize) -> String {
    document_of(set, prefix, start, count, realistic_flag)
}

/// A flagd document of `count` flags named `prefix-N`, made by `flag`.
pub fn document_of(
    set: &str,
    prefix: &str,
    start: usize,
    count: usize,
    flag: fn(usize) -> Value,
) -> String {
    let mut flags = serde_json::Map::new();
    for i in start..start + count {
        flags.insert(format!("{prefix}-{i}"), flag(i));
    }
    json!({"metadata": {"flagSetId": set}, "flags": flags}).to_string()
}

/// Request contexts of `n` distinct users.
pub fn contexts(n: usize) -> Vec<Value> {
    let countries = ["NL", "DE", "FR", "US", "BE", "JP"];
    (0..n)
        .map(|i| {
            json!({
                "targetingKey": format!("user-{i:06}"),
                "email": format!("u{i}@{}", if i % 4 == 0 { "example.com" } else { "mail.test" }),
                "country": countries[i % countries.len()],
                "age": 15 + (i % 50),
                "plan": if i % 3 == 0 { "pro" } else { "free" },
            })
        })
        .collect()
}

/// Percentiles of a histogram of microseconds, as JSON.
pub fn percentiles(h: &hdrhistogram::Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

/// The machine the benchmark ran on.
pub fn machine() -> Value {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    json!({"cpus": cpus, "memory_gib": (mem_kb as f64 / 1048576.0 * 10.0).round() / 10.0, "cpu": model})
}

/// Writes `target/bench-results/NAME.json`.
pub fn write_results(name: &str, value: &Value) {
    let dir = workspace_root().join("target/bench-results");
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(
            dir.join(format!("{name}.json")),
            serde_json::to_string_pretty(value).unwrap_or_default(),
        );
    }
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`
/// in BENCHMARKS.md.
pub fn update_section(name: &str, text: &str) {
    let path = workspace_root().join("BENCHMARKS.md");
    update_file(&path, name, text);
}

fn update_file(path: &Path, name: &str, text: &str) {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let Ok(doc) = std::fs::read_to_string(path) else {
        return;
    };
    let (Some(b), Some(e)) = (doc.find(&begin), doc.find(&end)) else {
        eprintln!("BENCHMARKS.md has no {begin} section");
        return;
    };
    let updated = format!("{}{begin}\n{}\n{}", &doc[..b], text.trim_end(), &doc[e..]);
    let _ = std::fs::write(path, updated);
}

/// Resident memory of a process now and at its peak, in KiB (VmRSS, VmHWM).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = proc_status(pid);
    (kib_field(&status, "VmRSS:"), kib_field(&status, "VmHWM:"))
}

/// The file-backed part of a process's resident size, in KiB (`RssFile`:
/// the pages of its binary and shared libraries it has mapped, which the
/// page cache shares with every process mapping the same files).
pub fn rss_file_kib(pid: u32) -> u64 {
    kib_field(&proc_status(pid), "RssFile:")
}

fn proc_status(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()
}

/// The value of a `Name:   1234 kB` line of `/proc/PID/status` (0 if absent).
fn kib_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// CPU time a process has used (user + system), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // fields after the command name (which may hold spaces) start after ')'
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/pid/stat: 12 and 13 here
    (ticks(11) + ticks(12)) / 100.0
}
