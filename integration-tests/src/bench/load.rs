//! Evaluation load against a PoP: gRPC `Evaluate` and OFREP over HTTP, at
//! fixed concurrency (closed loop) and at a fixed request rate (open loop:
//! latency is measured from when each request was due, so a stalled server
//! is not hidden by the load generator waiting for it).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flagmesh_client::BearerToken;
use flagmesh_proto::convert::map_to_struct;
use flagmesh_proto::v1::evaluation_client::EvaluationClient;
use flagmesh_proto::v1::{EvaluateAllRequest, EvaluateRequest};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{contexts, percentiles};

/// What to drive.
#[derive(Debug, Clone)]
pub struct Target {
    /// The PoP's gRPC address.
    pub grpc: SocketAddr,
    /// The PoP's HTTP address.
    pub http: SocketAddr,
    /// The flag set.
    pub flag_set: String,
    /// Flag keys to spread requests over.
    pub keys: Vec<String>,
    /// TLS to the PoP's gRPC listener (`None`: plaintext).
    pub tls: Option<flagmesh_client::ClientTls>,
    /// Evaluation contexts to rotate over.
    pub contexts: Arc<Vec<Value>>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits; the bounds are valid
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// A channel to the PoP's gRPC listener, with the (empty) bearer token.
type Channel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>;

/// One gRPC channel per task.
fn grpc_channel(addr: SocketAddr, tls: Option<&flagmesh_client::ClientTls>) -> Channel {
    // a socket address is a valid URI; TLS files were checked by the caller
    let channel = flagmesh_client::endpoint(&addr.to_string(), tls)
        .map(|e| e.tcp_nodelay(true).connect_lazy())
        .unwrap_or_else(|e| unreachable!("{e}"));
    tonic::service::interceptor::InterceptedService::new(
        channel,
        BearerToken::new(None).unwrap_or_else(|_| unreachable!()),
    )
}

/// An `EvaluateAll` answer as the load tool reads it: each flag's
/// resolution (field 1 of `EvaluateAllResponse`) kept encoded, the other
/// fields skipped. Decoding 100 `EvaluateResponse`s with their `Struct`
/// values cost the tool more CPU than the PoP spent answering, on the same
/// two cores, so the row measured the client; the answers' contents are
/// checked by the tests, not here.
#[derive(Clone, PartialEq, prost::Message)]
struct EncodedFlags {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    flags: Vec<prost::bytes::Bytes>,
}

/// `flagmesh.v1.Evaluation/EvaluateAll`, its answer left encoded per flag.
async fn evaluate_all_encoded(
    grpc: &mut tonic::client::Grpc<Channel>,
    request: EvaluateAllRequest,
) -> Result<EncodedFlags, tonic::Status> {
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<EvaluateAllRequest, EncodedFlags>::default();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/flagmesh.v1.Evaluation/EvaluateAll");
    grpc.unary(tonic::Request::new(request), path, codec)
        .await
        .map(tonic::Response::into_inner)
}

/// A keep-alive HTTP/1.1 connection for OFREP posts.
struct HttpConn {
    stream: BufReader<tokio::net::TcpStream>,
    addr: SocketAddr,
}

impl HttpConn {
    async fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(s),
            addr,
        })
    }

    async fn post(&mut self, path: &str, body: &str) -> std::io::Result<u16> {
        self.post_with(path, body, &[]).await
    }

    /// A POST with extra `headers` (name, value); the status.
    async fn post_with(
        &mut self,
        path: &str,
        body: &str,
        headers: &[(String, String)],
    ) -> std::io::Result<u16> {
        let extra: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.stream.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            line.clear();
            self.stream.read_line(&mut line).await?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await?;
        Ok(status)
    }
}

/// The protocol driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC `flagmesh.v1.Evaluation/Evaluate`.
    Grpc,
    /// OFREP single-flag POST.
    Ofrep,
    /// OFREP bulk POST: every flag of the set for one context.
    OfrepBulk,
    /// gRPC `flagmesh.v1.Evaluation/EvaluateAll`.
    GrpcAll,
}

/// A client of either protocol.
enum Client {
    Grpc(EvaluationClient<Channel>),
    GrpcAll(tonic::client::Grpc<Channel>),
    Http(HttpConn),
}

impl Client {
    async fn new(t: &Target, p: Protocol) -> std::io::Result<Self> {
        Ok(match p {
            Protocol::Grpc => {
                Client::Grpc(EvaluationClient::new(grpc_channel(t.grpc, t.tls.as_ref())))
            }
            Protocol::GrpcAll => Client::GrpcAll(tonic::client::Grpc::new(grpc_channel(
                t.grpc,
                t.tls.as_ref(),
            ))),
            Protocol::Ofrep | Protocol::OfrepBulk => Client::Http(HttpConn::open(t.http).await?),
        })
    }

    async fn call(&mut self, t: &Target, p: Protocol, key: &str, ctx: &Value) -> bool {
        match self {
            Client::GrpcAll(c) => evaluate_all_encoded(
                c,
                EvaluateAllRequest {
                    flag_set: t.flag_set.clone(),
                    context: ctx.as_object().map(map_to_struct),
                },
            )
            .await
            .is_ok_and(|r| !r.flags.is_empty()),
            Client::Http(c) if p == Protocol::OfrepBulk => {
                let body = json!({"context": ctx}).to_string();
                let path = format!("/ofrep/v1/evaluate/flags?flagSet={}", t.flag_set);
                c.post(&path, &body).await.is_ok_and(|s| s == 200)
            }
            Client::Grpc(c) => c
                .evaluate(EvaluateRequest {
                    flag_set: t.flag_set.clone(),
                    flag_key: key.to_owned(),
                    context: ctx.as_object().map(map_to_struct),
                    expected_type: 0,
                })
                .await
                .is_ok_and(|r| r.get_ref().error_code == 0),
            Client::Http(c) => {
                let body = json!({"context": ctx}).to_string();
                let path = format!("/ofrep/v1/evaluate/flags/{key}?flagSet={}", t.flag_set);
                c.post(&path, &body).await.is_ok_and(|s| s == 200)
            }
        }
    }
}

/// Closed loop: `concurrency` tasks each sending requests back to back for `duration`.
pub async fn closed_loop(t: &Target, p: Protocol, concurrency: usize, duration: Duration) -> Value {
    let ctxs = t.contexts.clone();
    let merged = Arc::new(Mutex::new(histogram()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (t, ctxs, merged, errors) = (t.clone(), ctxs.clone(), merged.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(mut client) = Client::new(&t, p).await else {
                return;
            };
            let mut h = histogram();
            let mut i = w * 7919;
            while started.elapsed() < duration {
                i += 1;
                let key = &t.keys[i % t.keys.len()];
                let ctx = &ctxs[i % ctxs.len()];
                let t0 = Instant::now();
                if !client.call(&t, p, key, ctx).await {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let _ = h.record(t0.elapsed().as_micros().max(1) as u64);
            }
            if let Ok(mut m) = merged.lock() {
                let _ = m.add(&h);
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let h = merged
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    let mut out = percentiles(&h);
    out["throughput_rps"] = json!((h.len() as f64 / elapsed).round());
    out["errors"] = json!(errors.load(std::sync::atomic::Ordering::Relaxed));
    out["concurrency"] = json!(concurrency);
    out
}

/// Granularity of tokio's timer: releases later than this count as delay.
const TIMER_SLACK: Duration = Duration::from_millis(2);

/// Open loop: requests due every `1/rate` s for `duration`, each latency
/// measured from when it was due (less the timer's own granularity).
pub async fn open_loop(t: &Target, p: Protocol, rate: u64, duration: Duration) -> Value {
    // a pool of clients; each request takes one, so slow answers queue up
    // requests (and that waiting counts in their latency)
    let pool = pool_of(|| Client::new(t, p)).await;
    let t = Arc::new(t.clone());
    open_loop_with(pool, rate, duration, move |mut client: Client, n| {
        let t = t.clone();
        async move {
            let (key, ctx) = (&t.keys[n % t.keys.len()], &t.contexts[n % t.contexts.len()]);
            let ok = client.call(&t, p, key, ctx).await;
            (client, ok)
        }
    })
    .await
}

/// Open loop over HTTP POSTs rotating over `calls` (path, body), each
/// with `headers`, against any server (answers other than 200 count as
/// errors): two servers can be driven at the same rate.
pub async fn open_loop_http(
    addr: SocketAddr,
    calls: Vec<(String, String)>,
    headers: Vec<(String, String)>,
    rate: u64,
    duration: Duration,
) -> Value {
    let pool = pool_of(|| HttpConn::open(addr)).await;
    let shared = Arc::new((calls, headers));
    open_loop_with(pool, rate, duration, move |mut conn: HttpConn, n| {
        let shared = shared.clone();
        async move {
            let (calls, headers) = &*shared;
            let (path, body) = &calls[n % calls.len().max(1)];
            let ok = conn
                .post_with(path, body, headers)
                .await
                .is_ok_and(|s| s == 200);
            (conn, ok)
        }
    })
    .await
}

/// Clients kept open by an open loop.
const POOL: usize = 64;

/// Up to [`POOL`] clients made by `open` (those that fail are left out).
async fn pool_of<C, Fut>(open: impl Fn() -> Fut) -> Vec<C>
where
    Fut: std::future::Future<Output = std::io::Result<C>>,
{
    let mut pool = Vec::with_capacity(POOL);
    for _ in 0..POOL {
        if let Ok(c) = open().await {
            pool.push(c);
        }
    }
    pool
}

/// Drives `call` (request number → a client back, and whether it
/// succeeded) at `rate` per second for `duration` over a pool of clients.
async fn open_loop_with<C, F, Fut>(pool: Vec<C>, rate: u64, duration: Duration, call: F) -> Value
where
    C: Send + 'static,
    F: Fn(C, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = (C, bool)> + Send,
{
    let (tx, rx) = tokio::sync::mpsc::channel(pool.len().max(1));
    for c in pool {
        let _ = tx.send(c).await;
    }
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let merged = Arc::new(Mutex::new(histogram()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let start = tokio::time::Instant::now();
    let total = (duration.as_secs_f64() * rate as f64) as u64;
    let mut handles = Vec::with_capacity(total as usize);
    for n in 0..total {
        let due = start + interval * (n as u32);
        tokio::time::sleep_until(due).await;
        let (call, merged, errors, tx, rx) = (
            call.clone(),
            merged.clone(),
            errors.clone(),
            tx.clone(),
            rx.clone(),
        );
        handles.push(tokio::spawn(async move {
            // the timer releases a request up to its granularity late; only
            // lateness beyond that (the generator or server falling behind)
            // counts against the request
            let released = tokio::time::Instant::now();
            let from = if released.duration_since(due) < TIMER_SLACK {
                released
            } else {
                due
            };
            let Some(client) = rx.lock().await.recv().await else {
                return;
            };
            let (client, ok) = call(client, n as usize).await;
            let latency = from.elapsed();
            let _ = tx.send(client).await;
            if !ok {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if let Ok(mut h) = merged.lock() {
                let _ = h.record(latency.as_micros().max(1) as u64);
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let h = merged
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    let mut out = percentiles(&h);
    out["target_rps"] = json!(rate);
    out["achieved_rps"] = json!((h.len() as f64 / elapsed).round());
    out["errors"] = json!(errors.load(std::sync::atomic::Ordering::Relaxed));
    out
}

/// `wrk` (the HTTP load generator, `apt-get install wrk`) driving OFREP
/// with `connections` keep-alive connections over two threads for
/// `duration`: the same tool and shape as figures quoted for other flag
/// servers, so they can be set side by side. Single-flag requests rotate
/// over the target's keys; every request rotates over 1,024 contexts.
/// `Err` when wrk is missing or its output cannot be read.
pub fn wrk(
    t: &Target,
    p: Protocol,
    connections: usize,
    duration: Duration,
    dir: &std::path::Path,
) -> Result<Value, String> {
    let calls = contexts(1024)
        .iter()
        .enumerate()
        .map(|(i, ctx)| {
            let path = match p {
                Protocol::OfrepBulk => format!("/ofrep/v1/evaluate/flags?flagSet={}", t.flag_set),
                _ => format!(
                    "/ofrep/v1/evaluate/flags/{}?flagSet={}",
                    t.keys[i % t.keys.len()],
                    t.flag_set
                ),
            };
            (path, json!({ "context": ctx }).to_string())
        })
        .collect::<Vec<_>>();
    let script = dir.join(format!("wrk-{p:?}.lua"));
    run_wrk(t.http, &calls, &[], connections, duration, &script)
}

/// Runs wrk against `addr` with JSON POSTs rotating over `calls` (path,
/// body), each with `headers`; the Lua script wrk runs is written to
/// `script`.
pub fn run_wrk(
    addr: SocketAddr,
    calls: &[(String, String)],
    headers: &[(&str, &str)],
    connections: usize,
    duration: Duration,
    script: &std::path::Path,
) -> Result<Value, String> {
    // Lua long brackets hold any text without "]=]"
    let long = |text: &str| -> Result<String, String> {
        if text.contains("]=]") {
            return Err(format!("cannot quote {text:?} for wrk"));
        }
        Ok(format!("[=[{text}]=]"))
    };
    let mut lua = String::from("local calls = {\n");
    for (path, body) in calls {
        lua.push_str(&format!("  {{{}, {}}},\n", long(path)?, long(body)?));
    }
    lua.push_str("}\nlocal headers = { [\"Content-Type\"] = \"application/json\" }\n");
    for (name, value) in headers {
        lua.push_str(&format!("headers[ {} ] = {}\n", long(name)?, long(value)?));
    }
    lua.push_str(
        "local n = 0\nrequest = function()\n  n = n + 1\n  local c = calls[(n % #calls) + 1]\n  \
         return wrk.format(\"POST\", c[1], headers, c[2])\nend\n",
    );
    if let Some(dir) = script.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    std::fs::write(script, lua).map_err(|e| e.to_string())?;
    let out = std::process::Command::new("wrk")
        .arg("-t2")
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(format!("http://{addr}"))
        .output()
        .map_err(|e| format!("wrk: {e} (make bench-load installs it)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse_wrk(&text).ok_or_else(|| format!("unreadable wrk output: {text}"))
}

/// Throughput, latency percentiles (µs) and errors from wrk's `--latency`
/// report.
fn parse_wrk(text: &str) -> Option<Value> {
    let mut out = json!({});
    let micros = |v: &str| -> Option<f64> {
        let (number, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = number.parse().ok()?;
        Some(match unit {
            "us" => n,
            "ms" => n * 1e3,
            "s" => n * 1e6,
            "m" => n * 60e6,
            _ => return None,
        })
    };
    let mut errors = 0u64;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => out["p50_us"] = json!(micros(v)?.round()),
            ["99%", v] => out["p99_us"] = json!(micros(v)?.round()),
            ["Requests/sec:", v] => out["throughput_rps"] = json!(v.parse::<f64>().ok()?.round()),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    out["errors"] = json!(errors);
    (out.get("throughput_rps").is_some() && out.get("p99_us").is_some()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::{EncodedFlags, parse_wrk};
    use flagmesh_proto::v1::{EvaluateAllResponse, EvaluateResponse};
    use prost::Message as _;

    #[test]
    fn an_evaluate_all_answer_reads_as_its_flags_left_encoded() {
        let flags: Vec<EvaluateResponse> = (0..3)
            .map(|i| EvaluateResponse {
                flag_key: format!("flag-{i}"),
                variant: "on".into(),
                ..Default::default()
            })
            .collect();
        let answer = EvaluateAllResponse {
            flags: flags.clone(),
            revision: 7,
            pop_id: "pop-0".into(),
            stale: true,
            metadata: None,
        };
        let read = EncodedFlags::decode(answer.encode_to_vec().as_slice()).expect("decodes");
        let back: Vec<EvaluateResponse> = read
            .flags
            .iter()
            .map(|b| EvaluateResponse::decode(b.as_ref()).expect("a flag"))
            .collect();
        assert_eq!(back, flags);
    }

    #[test]
    fn reads_wrk_latency_reports() {
        let report = "Running 5s test @ http://127.0.0.1:4000\n  2 threads and 16 connections\n\
            \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
            \x20   Latency   720.12us  301.40us   9.80ms   80.00%\n\
            \x20 Latency Distribution\n     50%  635.00us\n     75%    1.01ms\n     90%    1.45ms\n     99%    3.47ms\n\
            \x20 108000 requests in 5.00s, 80.00MB read\n\
            \x20 Socket errors: connect 0, read 2, write 0, timeout 1\n\
            \x20 Non-2xx or 3xx responses: 4\n\
            Requests/sec:  21797.40\nTransfer/sec:     16.00MB\n";
        let r = parse_wrk(report).expect("parsed");
        assert_eq!(r["p50_us"], 635.0);
        assert_eq!(r["p99_us"], 3470.0);
        assert_eq!(r["throughput_rps"], 21797.0);
        assert_eq!(r["errors"], 7);
        assert!(parse_wrk("wrk: connection refused").is_none());
    }
}
