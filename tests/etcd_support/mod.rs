//! Helpers for the etcd tests: etcd processes of a test's own (single or a
//! 3-member cluster on loopback, ports chosen at run time, temporary data
//! directories), a TCP proxy that can delay, cut or swallow one
//! controller's link, and etcd's request counters.
//!
//! Every process is killed and every directory removed when its handle
//! drops, so a failing test leaves nothing behind.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use session_lifecycle::etcd::EtcdPayload;
use session_lifecycle::etcd::client::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Duration, timeout};

/// The endpoints of the etcd the suite runs against
/// (`SESSION_LIFECYCLE_ETCD`, comma-separated), or `None` (after saying so)
/// when the tests cannot run.
pub fn endpoints() -> Option<Vec<String>> {
    match std::env::var("SESSION_LIFECYCLE_ETCD") {
        Ok(endpoints) if !endpoints.is_empty() => {
            Some(endpoints.split(',').map(str::to_owned).collect())
        }
        _ => {
            assert!(
                std::env::var_os("SESSION_LIFECYCLE_ETCD_REQUIRED").is_none(),
                "SESSION_LIFECYCLE_ETCD_REQUIRED is set but SESSION_LIFECYCLE_ETCD is not"
            );
            eprintln!(
                "etcd test DID NOT RUN: set SESSION_LIFECYCLE_ETCD (scripts/test-etcd.sh does)"
            );
            None
        }
    }
}

/// A prefix no other test (or earlier run) uses.
pub fn unique_prefix(test: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "/session-lifecycle-test/{test}-{nanos}-{}/",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A loopback port free right now (the OS picks it), never one this
/// process was handed before: the port is released until its etcd binds
/// it, and the OS may hand a released port out again meanwhile (to a
/// concurrent test's cluster).
pub fn free_port() -> u16 {
    static HANDED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let port = listener.local_addr().expect("its address").port();
        let mut handed = HANDED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !handed.contains(&port) {
            handed.push(port);
            return port;
        }
    }
}

/// A temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sl-etcd-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One etcd process.
pub struct Member {
    pub name: String,
    pub client: u16,
    pub peer: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl Member {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer)
    }

    /// Starts (or restarts, on its data directory) the process.
    pub fn start(&mut self) {
        let bin = std::env::var("SESSION_LIFECYCLE_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let child = Command::new(bin)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the etcd binary (set SESSION_LIFECYCLE_ETCD_BIN)");
        self.child = Some(child);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: a hung member (its sockets stay open, nothing answers).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            // The shell's `kill` builtin: no procps needed.
            let status = Command::new("sh")
                .args(["-c", &format!("kill {signal} {}", child.id())])
                .status()
                .expect("sh");
            assert!(status.success(), "kill {signal} failed");
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.resume();
        self.kill();
    }
}

/// etcd processes on loopback forming one cluster.
pub struct Cluster {
    pub members: Vec<Member>,
    _dir: TempDir,
}

impl Cluster {
    /// Starts `size` members (ports chosen at run time) with `extra`
    /// arguments each, and waits until the cluster has a leader.
    pub async fn start(name: &str, size: usize, extra: &[&str]) -> Self {
        let dir = TempDir::new(name);
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let token = format!("{name}-{}", std::process::id());
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, &(client, peer))| {
                let client_url = format!("http://127.0.0.1:{client}");
                let peer_url = format!("http://127.0.0.1:{peer}");
                let mut args: Vec<String> = [
                    "--name",
                    &format!("m{i}"),
                    "--data-dir",
                    &dir.0.join(format!("m{i}")).to_string_lossy(),
                    "--listen-client-urls",
                    &client_url,
                    "--advertise-client-urls",
                    &client_url,
                    "--listen-peer-urls",
                    &peer_url,
                    "--initial-advertise-peer-urls",
                    &peer_url,
                    "--initial-cluster",
                    &initial.join(","),
                    "--initial-cluster-token",
                    &token,
                    "--log-level",
                    "error",
                ]
                .into_iter()
                .map(str::to_owned)
                .collect();
                args.extend(extra.iter().map(|&a| a.to_owned()));
                let mut member = Member {
                    name: format!("m{i}"),
                    client,
                    peer,
                    args,
                    child: None,
                };
                member.start();
                member
            })
            .collect();
        let cluster = Self { members, _dir: dir };
        cluster.wait_for_leader(Duration::from_secs(60)).await;
        cluster
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::url).collect()
    }

    /// The member that leads now, among the running ones.
    pub async fn leader(&self) -> Option<usize> {
        for (i, member) in self.members.iter().enumerate() {
            if !member.is_running() {
                continue;
            }
            let Ok(Ok(mut client)) = timeout(
                Duration::from_secs(2),
                Client::connect([member.url()], None),
            )
            .await
            else {
                continue;
            };
            let Ok(Ok(status)) = timeout(Duration::from_secs(2), client.status()).await else {
                continue;
            };
            let me = status.header().map(|h| h.member_id());
            if status.leader() != 0 && Some(status.leader()) == me {
                return Some(i);
            }
        }
        None
    }

    /// Waits (bounded) until the running members have a leader; panics
    /// after `limit`.
    pub async fn wait_for_leader(&self, limit: Duration) -> usize {
        timeout(limit, async {
            loop {
                if let Some(leader) = self.leader().await {
                    return leader;
                }
                // Polling etcd's state, bounded by the timeout above.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the etcd cluster elects a leader")
    }
}

/// How a [`Proxy`] treats the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Bytes pass both ways.
    Pass,
    /// Every chunk waits this long each way.
    Delay(Duration),
    /// Requests reach etcd, answers are swallowed.
    SwallowAnswers,
    /// Connections are dropped and new ones refused.
    Cut,
}

/// TCP proxies, one per upstream etcd member, sharing one [`Link`] mode:
/// one controller's link to the cluster.
pub struct Proxy {
    ports: Vec<u16>,
    mode: watch::Sender<Link>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(upstreams: &[String]) -> Self {
        let (mode, _) = watch::channel(Link::Pass);
        let mut ports = Vec::new();
        let mut tasks = Vec::new();
        for upstream in upstreams {
            // The port is held by a socket bound for the proxy's whole
            // life (never listening): see `serve`.
            let reserve = shared_port(0).expect("a proxy port");
            let port = reserve.local_addr().expect("its address").port();
            let listener = shared_port(port)
                .and_then(|socket| socket.listen(1024))
                .expect("a listener on the proxy port");
            ports.push(port);
            let target = upstream
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_owned();
            tasks.push(tokio::spawn(serve(
                reserve,
                listener,
                port,
                target,
                mode.subscribe(),
            )));
        }
        Self { ports, mode, tasks }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("http://127.0.0.1:{port}"))
            .collect()
    }

    pub fn set(&self, link: Link) {
        self.mode.send_replace(link);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A socket bound to loopback `port` (0: any) that other sockets of this
/// process may bind too (`SO_REUSEPORT`).
fn shared_port(port: u16) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))?;
    Ok(socket)
}

/// Accepts on `port` while the link is not cut: a cut link closes the
/// listener too, so connecting is refused. `reserve`, bound to the port
/// and never listening, keeps it ours meanwhile: released, the port could
/// be handed to another test's etcd (any bind to port 0, `free_port`), and
/// the client would reconnect to that foreign etcd (CI once saw a count
/// answered over a cut link, most likely that way).
async fn serve(
    reserve: tokio::net::TcpSocket,
    first: tokio::net::TcpListener,
    port: u16,
    target: String,
    mut mode: watch::Receiver<Link>,
) {
    let _held = reserve;
    let mut listener = Some(first);
    loop {
        let Some(open) = listener.take() else {
            if mode.wait_for(|link| *link != Link::Cut).await.is_err() {
                return;
            }
            // The port is still ours (`reserve`): listen on it again.
            match shared_port(port).and_then(|socket| socket.listen(1024)) {
                Ok(open) => listener = Some(open),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
            continue;
        };
        let accepted = tokio::select! {
            accepted = open.accept() => accepted,
            cut = mode.wait_for(|link| *link == Link::Cut) => {
                if cut.is_err() {
                    return;
                }
                continue; // `open` dropped: refused until the link is back
            }
        };
        listener = Some(open);
        let Ok((client, _)) = accepted else { continue };
        let target = target.clone();
        let mode = mode.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(&target).await else {
                return;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let up = pipe(client_read, server_write, mode.clone(), false);
            let down = pipe(server_read, client_write, mode, true);
            // Either direction ending ends the connection.
            tokio::select! {
                () = up => {}
                () = down => {}
            }
        });
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Link>,
    answers: bool,
) {
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = mode.wait_for(|link| *link == Link::Cut) => {
                let _ = changed;
                return;
            }
        };
        let Ok(n) = read else { return };
        if n == 0 {
            return;
        }
        let link = *mode.borrow();
        match link {
            Link::Cut => return,
            Link::SwallowAnswers if answers => continue,
            Link::Delay(delay) => tokio::time::sleep(delay).await,
            _ => {}
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// The sum of a counter of etcd's Prometheus metrics at `endpoint`, over
/// every label set.
pub async fn metric(endpoint: &str, name: &str) -> f64 {
    let address = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = TcpStream::connect(address).await.expect("etcd's metrics");
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await
        .expect("a metrics request");
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .await
        .expect("a metrics answer");
    body.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A test payload: a number, big-endian on the wire, with a plain `Drop`.
pub struct Calm(pub u64);

impl EtcdPayload for Calm {
    fn encode(&self, out: &mut Vec<u8>) {
        encode_u64(self.0, out);
    }

    fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        decode_u64(bytes).map(Calm)
    }
}

/// [`Calm`]'s encoding, for test payloads that are a number too.
pub fn encode_u64(n: u64, out: &mut Vec<u8>) {
    out.extend_from_slice(&n.to_be_bytes());
}

/// [`Calm`]'s decoding, for test payloads that are a number too.
pub fn decode_u64(bytes: &[u8]) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    Ok(u64::from_be_bytes(bytes.try_into()?))
}

/// Panics left to fire in [`Armed`]'s `Drop` (each test binary has its own).
pub static ARMED: AtomicUsize = AtomicUsize::new(0);
/// How many [`Armed`] drops panicked.
pub static FIRED: AtomicUsize = AtomicUsize::new(0);

/// A payload (its id) whose `Drop` panics while [`ARMED`] counts down, a
/// careless user's payload; ids from 100 on never panic.
pub struct Armed(pub u64);

impl Drop for Armed {
    fn drop(&mut self) {
        if self.0 < 100
            && ARMED
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            FIRED.fetch_add(1, Ordering::SeqCst);
            panic!("payload {}'s Drop panics", self.0);
        }
    }
}

impl EtcdPayload for Armed {
    fn encode(&self, out: &mut Vec<u8>) {
        encode_u64(self.0, out);
    }

    fn decode(bytes: &[u8]) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        decode_u64(bytes).map(Armed)
    }
}

/// A store on the suite's etcd (`SESSION_LIFECYCLE_ETCD`) under `prefix`,
/// with 5 s request and write timeouts (the user-code suites').
pub async fn store_on_suite<P: EtcdPayload>(prefix: &str) -> session_lifecycle::etcd::EtcdStore<P> {
    session_lifecycle::etcd::EtcdStore::builder()
        .endpoints(endpoints().expect("the suite's etcd"))
        .prefix(prefix)
        .request_timeout(Duration::from_secs(5))
        .write_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("etcd is reachable")
}
