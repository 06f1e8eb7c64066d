//! flagmesh's PoP and Unleash Edge (offline mode) side by side under wrk,
//! in one run on one machine: the same 100 flags in each one's own format
//! (country in 5 values AND email ends with a domain AND version above a
//! semantic version, then a 10% rollout), the same 1,024 users, 16
//! connections. Both the all-flags answer (the browser bootstrap path:
//! OFREP bulk against Edge's frontend `all` endpoint) and one flag (OFREP
//! single-flag against Edge's frontend feature endpoint).
//!
//! Edge's API shapes (`POST /api/frontend/all`, `POST
//! /api/frontend/features/{name}`, its `Authorization` token, the
//! `flexibleRollout` strategy and its constraint operators) are taken from
//! its published documentation and crate; Edge itself is installed by
//! `make bench-peer` with `cargo install`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::load::{self, run_wrk};
use crate::topology::http_post;

/// Flags in the comparison.
pub const FLAGS: usize = 100;
/// Users the requests rotate over.
const USERS: usize = 1024;
/// The frontend token Edge is started with (offline mode accepts any).
const FRONTEND_TOKEN: &str = "*:development.flagmesh-bench-frontend";
const CLIENT_TOKEN: &str = "*:development.flagmesh-bench-client";

const COUNTRIES: [&str; 5] = ["IN", "NL", "DE", "FR", "BR"];

/// Flag `i` as flagd targeting: the three clauses, then 10% `on`.
pub fn flagd_flag(i: usize) -> Value {
    json!({
        "state": "ENABLED",
        "variants": {"on": true, "off": false},
        "defaultVariant": "off",
        "targeting": {"if": [
            {"and": [
                {"in": [{"var": "country"}, COUNTRIES]},
                {"ends_with": [{"var": "email"}, "@example.com"]},
                {"sem_ver": [{"var": "version"}, ">", format!("1.{}.0", i % 5)]}
            ]},
            {"fractional": [["on", 10], ["off", 90]]},
            "off"
        ]},
        "metadata": {"owner": format!("team-{}", i % 40)}
    })
}

/// Flag `i` as an Unleash feature: one flexible rollout of 10% by user id
/// behind the same three constraints.
pub fn unleash_feature(i: usize) -> Value {
    json!({
        "name": format!("flag-{i}"),
        "type": "release",
        "enabled": true,
        "project": "default",
        "strategies": [{
            "name": "flexibleRollout",
            "parameters": {"rollout": "10", "stickiness": "default", "groupId": format!("flag-{i}")},
            "constraints": [
                {"contextName": "country", "operator": "IN", "values": COUNTRIES, "inverted": false, "caseInsensitive": false},
                {"contextName": "email", "operator": "STR_ENDS_WITH", "values": ["@example.com"], "inverted": false, "caseInsensitive": false},
                {"contextName": "version", "operator": "SEMVER_GT", "value": format!("1.{}.0", i % 5), "inverted": false, "caseInsensitive": false}
            ]
        }],
        "variants": []
    })
}

/// The flagd document of the comparison's flags, as flag set `set`.
pub fn flagd_document(set: &str) -> String {
    let flags: serde_json::Map<String, Value> = (0..FLAGS)
        .map(|i| (format!("flag-{i}"), flagd_flag(i)))
        .collect();
    json!({"metadata": {"flagSetId": set}, "flags": flags}).to_string()
}

/// The users: about half match every clause of a flag (before its 10%).
fn users() -> Vec<(String, &'static str, String, String)> {
    let countries = ["IN", "NL", "US", "DE", "JP", "FR"];
    (0..USERS)
        .map(|i| {
            let domain = if i % 3 == 0 {
                "mail.test"
            } else {
                "example.com"
            };
            (
                format!("user-{i:05}"),
                countries[i % countries.len()],
                format!("u{i}@{domain}"),
                format!("{}.{}.{}", 1 + i % 2, i % 7, i % 3),
            )
        })
        .collect()
}

/// The users' evaluation contexts (as the OFREP and Edge calls carry them).
pub fn contexts() -> Vec<Value> {
    users()
        .into_iter()
        .map(|(id, country, email, version)| {
            json!({"targetingKey": id, "country": country, "email": email, "version": version})
        })
        .collect()
}

/// OFREP calls of the users: every flag, or one flag each (rotating).
pub fn ofrep_calls(set: &str, bulk: bool) -> Vec<(String, String)> {
    contexts()
        .into_iter()
        .enumerate()
        .map(|(i, ctx)| {
            let path = if bulk {
                format!("/ofrep/v1/evaluate/flags?flagSet={set}")
            } else {
                format!("/ofrep/v1/evaluate/flags/flag-{}?flagSet={set}", i % FLAGS)
            };
            (path, json!({ "context": ctx }).to_string())
        })
        .collect()
}

/// Edge frontend calls of the same users.
pub fn edge_calls(bulk: bool) -> Vec<(String, String)> {
    users()
        .into_iter()
        .enumerate()
        .map(|(i, (id, country, email, version))| {
            let path = if bulk {
                "/api/frontend/all".to_owned()
            } else {
                format!("/api/frontend/features/flag-{}", i % FLAGS)
            };
            let ctx = json!({"userId": id, "properties": {"country": country, "email": email, "version": version}});
            (path, ctx.to_string())
        })
        .collect()
}

/// A running Unleash Edge, stopped when dropped.
pub struct Edge {
    child: Child,
    /// Where it serves HTTP.
    pub addr: SocketAddr,
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Edge {
    /// Starts `binary` in offline mode on the comparison's features
    /// (written under `dir`) and waits until it answers.
    pub async fn start(binary: &Path, dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let features: Vec<Value> = (0..FLAGS).map(unleash_feature).collect();
        let file = dir.join("features.json");
        std::fs::write(
            &file,
            json!({"version": 2, "features": features}).to_string(),
        )
        .map_err(|e| e.to_string())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let log = std::fs::File::create(dir.join("edge.log")).map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .args(["--interface", "127.0.0.1", "--port", &port.to_string()])
            .arg("offline")
            .arg("--bootstrap-file")
            .arg(&file)
            .args(["--client-tokens", CLIENT_TOKEN])
            .args(["--frontend-tokens", FRONTEND_TOKEN])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e} (make bench-peer installs it)", binary.display()))?;
        let edge = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let (path, body) = edge_calls(true).swap_remove(0);
        loop {
            if let Ok((200, _, answer)) = http_post(
                edge.addr,
                &path,
                &body,
                &[("Authorization", FRONTEND_TOKEN)],
            )
            .await
                && answer.contains("\"toggles\"")
            {
                return Ok(edge);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "Unleash Edge did not answer within 30 s; see {}",
                    dir.join("edge.log").display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// wrk against Edge's frontend API (all flags, or one).
    pub fn wrk(&self, bulk: bool, duration: Duration, dir: &Path) -> Result<Value, String> {
        run_wrk(
            self.addr,
            &edge_calls(bulk),
            &[("Authorization", FRONTEND_TOKEN)],
            16,
            duration,
            &dir.join(format!("wrk-edge-{bulk}.lua")),
        )
    }

    /// The same calls as [`Edge::wrk`] at a fixed `rate` (the project's
    /// open-loop HTTP driver).
    pub async fn open_loop(&self, bulk: bool, rate: u64, duration: Duration) -> Value {
        load::open_loop_http(
            self.addr,
            edge_calls(bulk),
            vec![("Authorization".into(), FRONTEND_TOKEN.into())],
            rate,
            duration,
        )
        .await
    }
}

/// Flags on for every user at each server: (flagmesh, Edge). The clauses
/// are the same, the rollouts bucket users by different hashes, so the
/// counts agree only roughly (about 10% of the users who match).
pub async fn flags_on(pop: SocketAddr, set: &str, edge: &Edge) -> Result<(usize, usize), String> {
    let mut ours = 0;
    for (path, body) in ofrep_calls(set, true) {
        let v = answer(pop, &path, &body, &[]).await?;
        ours += v["flags"].as_array().map_or(0, |f| {
            f.iter().filter(|f| f["value"] == json!(true)).count()
        });
    }
    let mut theirs = 0;
    for (path, body) in edge_calls(true) {
        let v = answer(
            edge.addr,
            &path,
            &body,
            &[("Authorization", FRONTEND_TOKEN)],
        )
        .await?;
        theirs += v["toggles"].as_array().map_or(0, |t| {
            t.iter().filter(|t| t["enabled"] == json!(true)).count()
        });
    }
    Ok((ours, theirs))
}

/// The JSON a server answers a POST with; `Err` unless it answers 200.
async fn answer(
    addr: SocketAddr,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Result<Value, String> {
    let (status, _, answer) = http_post(addr, path, body, headers)
        .await
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{addr} answered {status}: {answer}"));
    }
    serde_json::from_str(&answer).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_carry_the_same_clauses() {
        let f = flagd_flag(7);
        let u = unleash_feature(7);
        let clauses = &f["targeting"]["if"][0]["and"];
        assert_eq!(clauses[0]["in"][1], json!(COUNTRIES));
        assert_eq!(
            u["strategies"][0]["constraints"][0]["values"],
            json!(COUNTRIES)
        );
        assert_eq!(clauses[2]["sem_ver"][2], json!("1.2.0"));
        assert_eq!(
            u["strategies"][0]["constraints"][2]["value"],
            json!("1.2.0")
        );
        assert_eq!(u["strategies"][0]["parameters"]["rollout"], json!("10"));
        assert_eq!(f["targeting"]["if"][1]["fractional"][0], json!(["on", 10]));
        assert_eq!(ofrep_calls("s", true).len(), USERS);
        assert_eq!(edge_calls(false)[3].0, "/api/frontend/features/flag-3");
    }
}
