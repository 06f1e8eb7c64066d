//! A mesh of real processes on one machine: one `flagmesh-control`, hubs
//! (in parallel, or chained control → hub → hub), and PoPs, each with its
//! own data directory under a root folder, on `127.0.0.1` ports chosen by
//! the OS. Optionally a controllable [`Relay`] sits on every link, so tests
//! can cut, stall, delay or slow any of them. Nodes can be stopped by
//! SIGTERM or SIGKILL and restarted on the same data and ports.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flagmesh_client::{BearerToken, hash_token};
use flagmesh_proto::v1::admin_client::AdminClient;
use flagmesh_proto::v1::evaluation_client::EvaluationClient;
use flagmesh_proto::v1::sync_client::SyncClient;
use flagmesh_proto::v1::{
    GetRevisionRequest, GetRevisionResponse, SubscribeRequest, sync_event::Event,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::process::NodeProcess;
use crate::relay::Relay;

/// An Admin client with a token.
pub type Admin = AdminClient<InterceptedService<Channel, BearerToken>>;
/// An Evaluation client with a token.
pub type Eval = EvaluationClient<InterceptedService<Channel, BearerToken>>;

/// The admin token of a secured test mesh.
pub const ADMIN_TOKEN: &str = "admin-secret";
/// The mesh credential of a secured test mesh.
pub const MESH_TOKEN: &str = "mesh-secret";
/// The evaluation key of a secured test mesh.
pub const EVAL_TOKEN: &str = "eval-secret";
/// A read-only credential of a secured test mesh.
pub const READ_TOKEN: &str = "read-secret";
/// A write credential of a secured test mesh.
pub const WRITE_TOKEN: &str = "write-secret";
/// An evaluation key of a secured test mesh scoped to flag set `a`.
pub const EVAL_A_TOKEN: &str = "eval-a-secret";

/// The shape of a mesh.
#[derive(Debug, Clone)]
pub struct TopologySpec {
    /// Where every node keeps its data (and its log).
    pub root: PathBuf,
    /// Where the node binaries are.
    pub bin_dir: PathBuf,
    /// How many hubs.
    pub hubs: usize,
    /// How many PoPs per hub.
    pub pops_per_hub: usize,
    /// Hubs in a chain (control → hub 0 → hub 1 → …; PoPs follow the last).
    pub chained: bool,
    /// A relay on every link.
    pub relays: bool,
    /// Tokens (admin, mesh, evaluation) instead of development mode.
    pub secure: bool,
    /// Heartbeat interval of every node, ms.
    pub heartbeat_ms: u64,
    /// Stall timeout of every subscriber, ms.
    pub stall_ms: u64,
    /// The control plane's change-log window.
    pub retain_revisions: u64,
    /// Worker threads per hub/PoP process (`TOKIO_WORKER_THREADS`).
    pub worker_threads: Option<usize>,
    /// The gRPC port of the control plane (0: any).
    pub control_port: u16,
    /// The PoPs' default flag set.
    pub default_flag_set: String,
    /// Deltas each hub keeps in its fan-out ring (None: the default).
    pub hub_ring_revisions: Option<usize>,
    /// Environment variables for every node process.
    pub envs: Vec<(String, String)>,
    /// Keep control's state in this PostgreSQL database and run a second
    /// control instance on it; hubs follow both (None: sled).
    pub database_url: Option<String>,
}

impl TopologySpec {
    /// A small mesh for tests under `root`: fast heartbeats, relays, tokens.
    pub fn test(root: &Path, hubs: usize, pops_per_hub: usize) -> Self {
        Self {
            root: root.to_path_buf(),
            bin_dir: bin_dir(),
            hubs,
            pops_per_hub,
            chained: false,
            relays: true,
            secure: true,
            heartbeat_ms: 200,
            stall_ms: 1_000,
            retain_revisions: 10_000,
            worker_threads: Some(1),
            control_port: 0,
            default_flag_set: "demo".into(),
            hub_ring_revisions: None,
            envs: Vec::new(),
            database_url: None,
        }
    }
}

/// The folder of the node binaries: `$FLAGMESH_BIN_DIR`, else the cargo
/// target folder this program runs from.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FLAGMESH_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Which tier a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeRef {
    /// The control plane.
    Control,
    /// Hub `i`.
    Hub(usize),
    /// PoP `i`.
    Pop(usize),
}

/// One node of the mesh.
#[derive(Debug)]
pub struct MeshNode {
    /// Its name (also its node id).
    pub name: String,
    binary: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    /// The running process, if any.
    pub process: Option<NodeProcess>,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its HTTP address.
    pub http: Option<SocketAddr>,
    log: PathBuf,
}

impl MeshNode {
    fn launch(&mut self) -> std::io::Result<()> {
        let mut args = self.args.clone();
        if self.grpc.port() != 0 {
            // restarts keep their addresses
            args.extend(["--listen".into(), self.grpc.to_string()]);
            if let Some(h) = self.http {
                args.extend(["--http-listen".into(), h.to_string()]);
            }
        } else {
            args.extend([
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--http-listen".into(),
                "127.0.0.1:0".into(),
            ]);
        }
        let envs: Vec<(&str, &str)> = self
            .envs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let p = NodeProcess::start(&self.binary, &args, &envs, &self.log)?;
        self.grpc = p.grpc;
        self.http = p.http;
        self.process = Some(p);
        Ok(())
    }

    /// A node like this one, not started.
    fn clone_spec(&self) -> Self {
        Self {
            name: self.name.clone(),
            binary: self.binary.clone(),
            args: self.args.clone(),
            envs: self.envs.clone(),
            process: None,
            grpc: self.grpc,
            http: self.http,
            log: self.log.clone(),
        }
    }

    /// The arguments it was started with (without its listen addresses).
    pub fn args_for_restart(&self) -> Vec<String> {
        self.args.clone()
    }

    /// The arguments of its next start (its listen addresses are added).
    pub fn set_args(&mut self, args: Vec<String>) {
        self.args = args;
    }

    /// Whether it runs.
    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }
}

/// A running mesh. Dropping it kills every process.
pub struct Mesh {
    /// Its shape.
    pub spec: TopologySpec,
    /// The control plane.
    pub control: MeshNode,
    /// A second control instance on the same database (PostgreSQL only).
    pub control_b: Option<MeshNode>,
    /// The hubs.
    pub hubs: Vec<MeshNode>,
    /// The PoPs.
    pub pops: Vec<MeshNode>,
    /// Relays between each hub and its upstream.
    pub hub_links: Vec<Relay>,
    /// Relays between each PoP and each of its hubs: `pop_links[pop][k]`.
    pub pop_links: Vec<Vec<Relay>>,
    /// Which hub each PoP link goes to: `pop_upstreams[pop][k]`.
    pub pop_upstreams: Vec<Vec<usize>>,
}

fn token_args(spec: &TopologySpec, tokens_file: &Path, node: bool) -> Vec<String> {
    if !spec.secure {
        return vec!["--insecure-dev".into()];
    }
    // plaintext on loopback, said explicitly (TLS has its own tests)
    let mut a = vec![
        "--plaintext".into(),
        "--tokens-file".into(),
        tokens_file.display().to_string(),
    ];
    if node {
        a.extend(["--mesh-token".into(), MESH_TOKEN.into()]);
    }
    a
}

impl Mesh {
    /// Starts control, then the hubs, then the PoPs (in parallel), and the
    /// relays between them; returns once every process printed its ready line.
    pub async fn start(spec: TopologySpec) -> std::io::Result<Self> {
        std::fs::create_dir_all(&spec.root)?;
        let tokens_file = spec.root.join("tokens.toml");
        if spec.secure {
            let mut t = String::new();
            for (name, role, secret, sets) in [
                ("admin", "admin", ADMIN_TOKEN, ""),
                ("mesh", "mesh", MESH_TOKEN, ""),
                ("app", "evaluate", EVAL_TOKEN, ""),
                ("reader", "read", READ_TOKEN, ""),
                ("writer", "write", WRITE_TOKEN, ""),
                ("app-a", "evaluate", EVAL_A_TOKEN, "flag_sets = [\"a\"]\n"),
            ] {
                t.push_str(&format!(
                    "[[token]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n{sets}\n",
                    hash_token(secret)
                ));
            }
            std::fs::write(&tokens_file, t)?;
        }
        let hb = spec.heartbeat_ms.to_string();
        let mut node_envs: Vec<(String, String)> = spec
            .worker_threads
            .map(|n| vec![("TOKIO_WORKER_THREADS".to_owned(), n.to_string())])
            .unwrap_or_default();
        node_envs.extend(spec.envs.iter().cloned());
        let store_args: Vec<String> = match &spec.database_url {
            Some(url) => vec!["--database-url".into(), url.clone()],
            None => vec![
                "--data-dir".into(),
                spec.root.join("control").display().to_string(),
            ],
        };
        let mut control_args = vec![
            // a new mesh on first start; a restart finds its store
            "--init".into(),
            "--retain-revisions".into(),
            spec.retain_revisions.to_string(),
            "--heartbeat-ms".into(),
            hb.clone(),
            "--drain-ms".into(),
            "1000".into(),
        ];
        control_args.extend(token_args(&spec, &tokens_file, false));
        control_args.extend(store_args);
        let mut control = MeshNode {
            name: "control".into(),
            binary: spec.bin_dir.join("flagmesh-control"),
            args: control_args,
            envs: spec.envs.clone(),
            process: None,
            grpc: SocketAddr::from(([127, 0, 0, 1], spec.control_port)),
            http: None,
            log: spec.root.join("control.log"),
        };
        if spec.control_port != 0 {
            control.http = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        }
        control.launch()?;
        let control_b = match &spec.database_url {
            Some(_) => {
                let mut b = MeshNode {
                    name: "control-b".into(),
                    log: spec.root.join("control-b.log"),
                    grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
                    http: None,
                    process: None,
                    ..control.clone_spec()
                };
                b.launch()?;
                Some(b)
            }
            None => None,
        };

        let relay_args = |upstreams: Vec<String>, name: &str, data: &Path| -> Vec<String> {
            let mut a = vec![
                "--data-dir".into(),
                data.display().to_string(),
                "--node-id".into(),
                name.into(),
                "--upstream".into(),
                upstreams.join(","),
                "--heartbeat-ms".into(),
                hb.clone(),
                "--stall-ms".into(),
                spec.stall_ms.to_string(),
                "--backoff-max-ms".into(),
                "1000".into(),
                "--drain-ms".into(),
                "1000".into(),
            ];
            a.extend(token_args(&spec, &tokens_file, true));
            a
        };

        let mut hubs: Vec<MeshNode> = Vec::new();
        let mut hub_links = Vec::new();
        for i in 0..spec.hubs {
            let target = if spec.chained && i > 0 {
                hubs[i - 1].grpc
            } else {
                control.grpc
            };
            let upstream = if spec.relays {
                let r = Relay::start(target).await?;
                let a = r.addr;
                hub_links.push(r);
                a
            } else {
                target
            };
            let name = format!("hub-{i}");
            let mut upstreams = vec![upstream.to_string()];
            if let Some(b) = control_b.as_ref().filter(|_| !(spec.chained && i > 0)) {
                upstreams.push(b.grpc.to_string());
            }
            let mut args = relay_args(upstreams, &name, &spec.root.join(&name));
            args.extend(["--region".into(), format!("region-{i}")]);
            if let Some(ring) = spec.hub_ring_revisions {
                args.extend(["--ring-revisions".into(), ring.to_string()]);
            }
            let mut hub = MeshNode {
                name: name.clone(),
                binary: spec.bin_dir.join("flagmesh-hub"),
                args,
                envs: node_envs.clone(),
                process: None,
                grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
                http: None,
                log: spec.root.join(format!("{name}.log")),
            };
            hub.launch()?;
            hubs.push(hub);
        }

        // without hubs, `pops_per_hub` PoPs follow control directly
        let pop_count = if spec.hubs == 0 {
            spec.pops_per_hub
        } else {
            spec.hubs * spec.pops_per_hub
        };
        let serving_hubs: Vec<usize> = if spec.chained {
            vec![spec.hubs.saturating_sub(1)]
        } else {
            (0..spec.hubs).collect()
        };
        let mut pops = Vec::with_capacity(pop_count);
        let mut pop_links = Vec::with_capacity(pop_count);
        let mut pop_upstreams = Vec::with_capacity(pop_count);
        for j in 0..pop_count {
            let mut links = Vec::new();
            let mut addrs = Vec::new();
            if serving_hubs.is_empty() {
                addrs.push(control.grpc.to_string());
            }
            for &h in &serving_hubs {
                if spec.relays {
                    let r = Relay::start(hubs[h].grpc).await?;
                    addrs.push(r.addr.to_string());
                    links.push(r);
                } else {
                    addrs.push(hubs[h].grpc.to_string());
                }
            }
            let name = format!("pop-{j}");
            let mut args = relay_args(addrs, &name, &spec.root.join(&name));
            args.extend(["--default-flag-set".into(), spec.default_flag_set.clone()]);
            pops.push(MeshNode {
                name: name.clone(),
                binary: spec.bin_dir.join("flagmesh-pop"),
                args,
                envs: node_envs.clone(),
                process: None,
                grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
                http: None,
                log: spec.root.join(format!("{name}.log")),
            });
            pop_links.push(links);
            pop_upstreams.push(serving_hubs.clone());
        }
        // start PoPs in parallel batches
        let mut started = Vec::with_capacity(pop_count);
        let mut pending: Vec<MeshNode> = pops;
        while !pending.is_empty() {
            let batch: Vec<MeshNode> = pending.drain(..pending.len().min(16)).collect();
            let handles: Vec<_> = batch
                .into_iter()
                .map(|mut n| {
                    tokio::task::spawn_blocking(move || {
                        n.launch()?;
                        Ok::<_, std::io::Error>(n)
                    })
                })
                .collect();
            for h in handles {
                started.push(h.await.map_err(std::io::Error::other)??);
            }
        }
        Ok(Self {
            spec,
            control,
            control_b,
            hubs,
            pops: started,
            hub_links,
            pop_links,
            pop_upstreams,
        })
    }

    /// A node.
    pub fn node(&mut self, n: NodeRef) -> &mut MeshNode {
        match n {
            NodeRef::Control => &mut self.control,
            NodeRef::Hub(i) => &mut self.hubs[i],
            NodeRef::Pop(i) => &mut self.pops[i],
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self, n: NodeRef) {
        if let Some(mut p) = self.node(n).process.take() {
            p.kill();
        }
    }

    /// SIGTERM, waiting for a clean exit; returns whether it exited cleanly.
    pub fn stop(&mut self, n: NodeRef) -> bool {
        match self.node(n).process.take() {
            Some(mut p) => p.terminate(Duration::from_secs(10)),
            None => true,
        }
    }

    /// Starts a stopped node again on the same data and addresses.
    pub fn restart(&mut self, n: NodeRef) -> std::io::Result<()> {
        let node = self.node(n);
        if node.process.is_none() {
            node.launch()?;
        }
        Ok(())
    }

    /// Stops every node: PoPs, then hubs, then control.
    pub fn stop_all(&mut self) {
        for i in 0..self.pops.len() {
            self.stop(NodeRef::Pop(i));
        }
        for i in 0..self.hubs.len() {
            self.stop(NodeRef::Hub(i));
        }
        if let Some(mut p) = self.control_b.as_mut().and_then(|b| b.process.take()) {
            p.terminate(Duration::from_secs(10));
        }
        self.stop(NodeRef::Control);
    }

    fn token(&self, t: &'static str) -> Option<&'static str> {
        self.spec.secure.then_some(t)
    }

    /// A plaintext channel to `addr`.
    pub async fn channel(addr: SocketAddr) -> Result<Channel, tonic::Status> {
        Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))
    }

    /// An Admin client of the control plane.
    pub async fn admin(&self) -> Result<Admin, tonic::Status> {
        let ch = Self::channel(self.control.grpc).await?;
        Ok(AdminClient::with_interceptor(
            ch,
            BearerToken::new(self.token(ADMIN_TOKEN))?,
        ))
    }

    /// An Evaluation client of PoP `i`.
    pub async fn eval(&self, i: usize) -> Result<Eval, tonic::Status> {
        let ch = Self::channel(self.pops[i].grpc).await?;
        Ok(EvaluationClient::with_interceptor(
            ch,
            BearerToken::new(self.token(EVAL_TOKEN))?,
        ))
    }

    /// The control plane's (revision, digest).
    pub async fn control_head(&self) -> Result<(u64, u64), tonic::Status> {
        let r = self.control_revision().await?;
        Ok((r.revision, r.digest))
    }

    /// The control plane's head: history, revision and digest.
    async fn control_revision(&self) -> Result<GetRevisionResponse, tonic::Status> {
        Ok(self
            .admin()
            .await?
            .get_revision(GetRevisionRequest {})
            .await?
            .into_inner())
    }

    /// A Sync client of node `n`, with the mesh's token.
    async fn sync_client(
        &self,
        n: NodeRef,
    ) -> Result<SyncClient<InterceptedService<Channel, BearerToken>>, tonic::Status> {
        let addr = match n {
            NodeRef::Control => self.control.grpc,
            NodeRef::Hub(i) => self.hubs[i].grpc,
            NodeRef::Pop(i) => self.pops[i].grpc,
        };
        let ch = Self::channel(addr).await?;
        Ok(
            SyncClient::with_interceptor(ch, BearerToken::new(self.token(MESH_TOKEN))?)
                .max_decoding_message_size(64 << 20),
        )
    }

    /// How many flags the snapshot node `n` sends a fresh subscriber
    /// following `flag_sets` (empty: every set) holds, read to its end.
    pub async fn snapshot_flags(
        &self,
        n: NodeRef,
        flag_sets: &[&str],
    ) -> Result<usize, tonic::Status> {
        let request = SubscribeRequest {
            node_id: "harness-snapshot".into(),
            flag_sets: flag_sets.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        };
        let mut flags = 0;
        self.read_stream(
            n,
            request,
            Duration::from_secs(60),
            "the snapshot's end",
            |ev| match ev {
                Event::Snapshot(s) => {
                    flags += s.flags.len();
                    s.last.then_some(Ok(flags))
                }
                _ => None,
            },
        )
        .await
    }

    /// Subscribes to node `n` with `request` and shows each event to `take`
    /// until it answers, all within `within` (heartbeats keep coming from a
    /// node that holds no state yet: the wait is bounded as a whole, not
    /// per message).
    async fn read_stream<T>(
        &self,
        n: NodeRef,
        request: SubscribeRequest,
        within: Duration,
        what: &str,
        mut take: impl FnMut(Event) -> Option<Result<T, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let mut stream = self
            .sync_client(n)
            .await?
            .subscribe(request)
            .await?
            .into_inner();
        let deadline = tokio::time::Instant::now() + within;
        while let Some(ev) = tokio::time::timeout_at(deadline, stream.message())
            .await
            .map_err(|_| {
                tonic::Status::deadline_exceeded(format!("no {what} within {within:?}"))
            })??
        {
            if let Some(answer) = ev.event.and_then(&mut take) {
                return answer;
            }
        }
        Err(tonic::Status::unavailable(format!(
            "stream ended before {what}"
        )))
    }

    /// The (revision, digest) a hub or PoP serves, read from the snapshot
    /// its own Sync service sends a fresh subscriber.
    pub async fn served_state(&self, n: NodeRef) -> Result<(u64, u64), tonic::Status> {
        let request = SubscribeRequest {
            node_id: "harness-check".into(),
            ..Default::default()
        };
        self.read_stream(
            n,
            request,
            Duration::from_secs(10),
            "snapshot",
            |ev| match ev {
                // a node's unfiltered snapshot always carries its digest
                Event::Snapshot(s) if s.last => Some(
                    s.digest
                        .map(|d| (s.revision, d))
                        .ok_or_else(|| tonic::Status::data_loss("a snapshot without a digest")),
                ),
                _ => None,
            },
        )
        .await
    }

    /// A node's metrics, by series (`name{labels}` → value).
    pub async fn metrics(&self, n: NodeRef) -> std::io::Result<HashMap<String, f64>> {
        let addr = match n {
            NodeRef::Control => self.control.http,
            NodeRef::Hub(i) => self.hubs[i].http,
            NodeRef::Pop(i) => self.pops[i].http,
        }
        .ok_or_else(|| std::io::Error::other("no HTTP listener"))?;
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let headers: &[(&str, &str)] = if self.spec.secure {
            &[("Authorization", auth.as_str())]
        } else {
            &[]
        };
        let (status, _, body) = http_request(addr, "GET", "/metrics", "", headers).await?;
        if status != 200 {
            return Err(std::io::Error::other(format!(
                "/metrics: HTTP {status}: {body}"
            )));
        }
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect())
    }

    /// One series of a node's metrics (`NaN` when absent).
    pub async fn metric(&self, n: NodeRef, series: &str) -> f64 {
        match self.metrics(n).await {
            Ok(m) => m.get(series).copied().unwrap_or(f64::NAN),
            Err(_) => f64::NAN,
        }
    }

    /// Waits until every running hub and PoP serves control's revision with
    /// control's digest (the convergence check), at most `timeout`. Each
    /// check reads a node's whole state (the snapshot a fresh subscriber
    /// gets); [`Mesh::converged_at_head`] reads none.
    pub async fn converged(&self, timeout: Duration) -> Result<(u64, u64), String> {
        let (revision, digest) = self.control_head().await.map_err(|e| e.to_string())?;
        self.each_node_serves(timeout, revision, digest, |n| self.served_state(n))
            .await?;
        Ok((revision, digest))
    }

    /// [`Mesh::converged`] without making any node read its store: each
    /// check resumes at control's revision and takes the digest from the
    /// node's progress event (one heartbeat later), so a node holds only
    /// what it received. For measuring a node's memory.
    pub async fn converged_at_head(&self, timeout: Duration) -> Result<(u64, u64), String> {
        let head = self.control_revision().await.map_err(|e| e.to_string())?;
        let (history, revision, digest) = (head.history_id, head.revision, head.digest);
        self.each_node_serves(timeout, revision, digest, |n| {
            self.progress_at(n, &history, revision)
        })
        .await?;
        Ok((revision, digest))
    }

    async fn each_node_serves<F, Fut>(
        &self,
        timeout: Duration,
        revision: u64,
        digest: u64,
        served: F,
    ) -> Result<(), String>
    where
        F: Fn(NodeRef) -> Fut,
        Fut: std::future::Future<Output = Result<(u64, u64), tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut nodes: Vec<NodeRef> = (0..self.hubs.len())
            .filter(|i| self.hubs[*i].is_running())
            .map(NodeRef::Hub)
            .collect();
        nodes.extend(
            (0..self.pops.len())
                .filter(|i| self.pops[*i].is_running())
                .map(NodeRef::Pop),
        );
        for n in nodes {
            loop {
                match served(n).await {
                    Ok(s) if s == (revision, digest) => break,
                    other => {
                        if tokio::time::Instant::now() > deadline {
                            return Err(format!(
                                "{n:?} serves {other:?}, control is at revision {revision} digest {digest:016x}"
                            ));
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// The (revision, digest) node `n` reports to a subscriber resuming at
    /// `revision` of `history`: from its first progress event at its head.
    /// `UNAVAILABLE` while the node is behind that revision.
    async fn progress_at(
        &self,
        n: NodeRef,
        history: &str,
        revision: u64,
    ) -> Result<(u64, u64), tonic::Status> {
        let request = SubscribeRequest {
            node_id: "harness-check".into(),
            history_id: history.into(),
            resume_revision: revision,
            ..Default::default()
        };
        self.read_stream(
            n,
            request,
            Duration::from_secs(10),
            "progress",
            |ev| match ev {
                Event::Progress(p) if p.revision == p.head_revision => {
                    Some(p.head_digest.map(|d| (p.revision, d)).ok_or_else(|| {
                        tonic::Status::data_loss("progress at the head without a digest")
                    }))
                }
                // another history: the node's state, whatever it is
                Event::Snapshot(s) if s.last => Some(Ok((s.revision, s.digest.unwrap_or(0)))),
                _ => None,
            },
        )
        .await
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // NodeProcess kills on drop; relays close on drop
        for p in self.pops.iter_mut().chain(self.hubs.iter_mut()) {
            p.process.take();
        }
        if let Some(b) = self.control_b.as_mut() {
            b.process.take();
        }
        self.control.process.take();
    }
}

/// A minimal HTTP/1.1 GET on loopback; returns the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    Ok(http_request(addr, "GET", path, "", &[]).await?.2)
}

/// A minimal HTTP/1.1 POST on loopback; returns status, headers
/// (lower-case names) and body.
pub async fn http_post(
    addr: SocketAddr,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, HashMap<String, String>, String)> {
    http_request(addr, "POST", path, body, headers).await
}

/// A minimal HTTP/1.1 request on loopback (a JSON body when not empty);
/// returns status, headers (lower-case names) and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, HashMap<String, String>, String)> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    http_exchange(addr, req.as_bytes()).await
}

/// Sends raw request bytes and parses the response: status, headers
/// (lower-case names), body.
pub async fn http_exchange(
    addr: SocketAddr,
    request: &[u8],
) -> std::io::Result<(u16, HashMap<String, String>, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("HTTP read timed out"))??;
    Ok(parse_response(&buf))
}

/// Status, headers (lower-case names) and body of an HTTP/1.1 response.
pub fn parse_response(buf: &[u8]) -> (u16, HashMap<String, String>, String) {
    let text = String::from_utf8_lossy(buf).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, dechunk(rest))
}

/// Decodes a chunked body (or returns it as is).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if n == 0 {
            return out;
        }
        if after.len() < n {
            return body.to_owned();
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

/// Polls `check` every 50 ms until it holds, failing the test after `secs`.
///
/// # Panics
/// When `check` has not held within `secs` seconds.
pub async fn eventually<F, Fut>(what: &str, secs: u64, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::dechunk;

    #[test]
    fn reads_chunked_bodies() {
        assert_eq!(dechunk("5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n"), "{\"a\":1}");
        assert_eq!(dechunk("{\"a\":1}"), "{\"a\":1}");
    }
}
