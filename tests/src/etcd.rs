//! The one way tests get etcd: real `etcd` processes on free loopback ports with temporary data
//! directories, killed (and their directories removed) on drop. Never a mock. Each runs with
//! etcd auth on, as aq's managed groups do: aq logs in as its user, whose role holds the ranges
//! the layout gives the group, and the tests' direct clients log in as root.

use std::process::Command;
use std::time::Duration;

use aq_host::backend::managed::{EtcdProcess, Spec, start_cluster};
use aq_host::backend::ownership::{ManagedSecrets, secure};
use aq_host::config::Config;
use aq_host::gate::decisions::DecisionSink;
use aq_host::serve::{Running, ServeOptions};

/// How long one etcdctl command may take.
const ETCDCTL_DEADLINE: Duration = Duration::from_secs(30);

/// An etcd cluster for a test: one member, or several ([`TestEtcd::start_members`]).
pub struct TestEtcd {
    processes: Vec<EtcdProcess>,
    secrets: ManagedSecrets,
    _dir: tempfile::TempDir,
}

impl TestEtcd {
    /// Starts a one-member etcd with auth on and waits until it answers (started again on
    /// fresh ports when one was taken).
    pub async fn start(name: &str) -> TestEtcd {
        Self::start_members(name, 1).await
    }

    /// Starts an etcd cluster of `members` members (peers of each other, as aq starts a
    /// managed group with `members = 3`) with auth on, and waits until every member answers.
    pub async fn start_members(name: &str, members: usize) -> TestEtcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = Spec { members, ..Spec::default() };
        let (processes, _) = start_cluster("etcd", name, dir.path(), spec, Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("etcd {name} does not start (is etcd-server installed?): {e}"));
        let secrets = ManagedSecrets::load_or_create(dir.path()).expect("etcd credentials");
        secure(name, processes[0].client_url(), &secrets).await.unwrap_or_else(|e| panic!("etcd {name}: {e}"));
        TestEtcd { processes, secrets, _dir: dir }
    }

    /// Every member's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.processes.iter().map(|p| p.client_url().to_string()).collect()
    }

    /// Kills member `index` (SIGKILL); its data stays, for [`TestEtcd::restart_member`].
    pub fn kill_member(&mut self, index: usize) {
        self.processes[index].kill();
    }

    /// Starts member `index` again on its data and ports after [`TestEtcd::kill_member`] or
    /// [`TestEtcd::stop`].
    pub fn restart_member(&mut self, index: usize) {
        let fresh = EtcdProcess::respawn("etcd", &self.processes[index]).expect("etcd starts again");
        self.processes[index] = fresh;
    }

    /// The member that leads the cluster now, by index, as the members themselves say.
    pub async fn leader(&self) -> Option<usize> {
        let admin = self.secrets.admin();
        for (i, url) in self.urls().iter().enumerate() {
            let options = etcd_client::ConnectOptions::new()
                .with_user(admin.user.clone(), admin.password.clone())
                .with_timeout(Duration::from_secs(2))
                .with_connect_timeout(Duration::from_secs(2));
            let Ok(mut client) = etcd_client::Client::connect([url.as_str()], Some(options)).await else { continue };
            let Ok(status) = client.status().await else { continue };
            if status.leader() != 0 && status.leader() == status.header().map(|h| h.member_id()).unwrap_or(0) {
                return Some(i);
            }
        }
        None
    }

    /// This etcd as a `[[groups]]` table named `name`, with the credentials aq logs in with and
    /// grants ranges with.
    pub fn group(&self, name: &str) -> String {
        let (data, admin) = (self.secrets.data(), self.secrets.admin());
        format!(
            "[[groups]]\nname = \"{name}\"\nendpoints = {:?}\nuser = {:?}\npassword = {:?}\nadmin_user = {:?}\nadmin_password = {:?}\n",
            self.urls(),
            data.user,
            data.password,
            admin.user,
            admin.password
        )
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        self.processes[0].client_url()
    }

    /// Pauses the etcd process (SIGSTOP): it holds every request until [`TestEtcd::resume`].
    pub fn pause(&mut self) {
        self.signal("-STOP");
    }

    /// Resumes a paused etcd (SIGCONT).
    pub fn resume(&mut self) {
        self.signal("-CONT");
    }

    fn signal(&mut self, signal: &str) {
        for process in &mut self.processes {
            let pid = process.pid().expect("etcd is running").to_string();
            let status = Command::new("kill").args([signal, &pid]).status().expect("kill runs");
            assert!(status.success(), "kill {signal} {pid} failed");
        }
    }

    /// Stops every etcd process (the data stays until the helper drops).
    pub fn stop(&mut self) {
        for process in &mut self.processes {
            process.kill();
        }
    }

    /// Starts every member again on its data and ports after [`TestEtcd::stop`].
    pub fn restart(&mut self) {
        for index in 0..self.processes.len() {
            self.restart_member(index);
        }
    }

    /// etcd's root user here, which grants and revokes aq's ranges.
    pub fn admin_credentials(&self) -> aq_host::backend::Credentials {
        self.secrets.admin()
    }

    /// A client straight to this etcd, bypassing aq, as etcd's root user.
    pub async fn client(&self) -> etcd_client::Client {
        let admin = self.secrets.admin();
        let options = etcd_client::ConnectOptions::new().with_user(admin.user, admin.password);
        etcd_client::Client::connect(self.urls(), Some(options)).await.expect("connect to etcd")
    }

    /// A client straight to this etcd without credentials, as any local process could open.
    pub async fn anonymous_client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url()], None).await.expect("connect to etcd")
    }
}

/// aq serving the etcd API in-process over two real etcd groups, `main` and `events`.
pub struct TestGateway {
    /// The running gateway.
    pub running: Running,
    /// The `main` group.
    pub main: TestEtcd,
    /// The `events` group.
    pub events: TestEtcd,
    layout: String,
    data: tempfile::TempDir,
}

/// Options for an in-process aq with its data in `data`; decisions, allows included, are
/// logged to `<data>/decisions.log`.
pub fn serve_options(data: &std::path::Path, tls: Option<aq_host::tls::TlsFiles>) -> ServeOptions {
    ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        data_dir: data.to_path_buf(),
        etcd_binary: "etcd".into(),
        decision_log: DecisionSink::File(data.join("decisions.log")),
        log_allows: true,
        tls,
        name: None,
        advertise_admin_url: None,
        checkpoint_interval: Duration::from_secs(1),
        warm_instances: aq_host::engine::EngineConfig::default().warm_per_binding,
        advise_interval: Duration::from_secs(10),
        auth_token_ttl: aq_host::auth::DEFAULT_TOKEN_TTL,
    }
}

/// aq over groups it manages itself (a layout whose groups have no endpoints), in process, with
/// its data in a temporary directory returned beside it.
pub async fn serve_managed(layout: &str) -> (Running, tempfile::TempDir) {
    let config = Config::parse(layout, "test layout").expect("layout parses");
    let data = tempfile::tempdir().unwrap();
    let running = aq_host::serve::start(config, serve_options(data.path(), None)).await.expect("aq starts");
    (running, data)
}

/// Another aq replica over the same etcd groups, with its own data directory.
pub struct Replica {
    /// The running replica.
    pub running: Running,
    data: tempfile::TempDir,
}

impl Replica {
    /// Its data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        self.data.path()
    }
}

/// The default layout's scopes with test groups: catch-all, registry (quota), secrets
/// (critical), events and leases (ephemeral, on `events`).
pub fn layout(main: &TestEtcd, events: &TestEtcd) -> String {
    let default = aq_host::config::DEFAULT_LAYOUT;
    let groups_end = default.find("[[scopes]]").expect("scopes in the default layout");
    format!("{}\n{}\n{}", main.group("main"), events.group("events"), &default[groups_end..])
}

impl TestGateway {
    /// Starts two etcd groups and aq over them with [`layout`].
    pub async fn start() -> TestGateway {
        Self::start_with(layout).await
    }

    /// Starts two etcd groups and aq over them with a layout built from their URLs.
    pub async fn start_with(layout: impl FnOnce(&TestEtcd, &TestEtcd) -> String) -> TestGateway {
        Self::start_with_options(layout, None, |_| {}).await
    }

    /// Starts two etcd groups and aq over them with [`layout`], both APIs over TLS.
    pub async fn start_tls(tls: aq_host::tls::TlsFiles) -> TestGateway {
        Self::start_with_options(layout, Some(tls), |_| {}).await
    }

    /// Starts two etcd groups and aq over them with a layout built from their URLs, both APIs
    /// over TLS.
    pub async fn start_tls_with(
        layout: impl FnOnce(&TestEtcd, &TestEtcd) -> String,
        tls: aq_host::tls::TlsFiles,
    ) -> TestGateway {
        Self::start_with_options(layout, Some(tls), |_| {}).await
    }

    /// Starts two etcd groups and aq over them with a layout built from their URLs, with
    /// `change` made to aq's options.
    pub async fn start_tuned(
        layout: impl FnOnce(&TestEtcd, &TestEtcd) -> String,
        change: impl FnOnce(&mut ServeOptions),
    ) -> TestGateway {
        Self::start_with_options(layout, None, change).await
    }

    /// Starts aq over the default layout with `main` a cluster of `main_members` members and
    /// `events` of `events_members`.
    pub async fn start_members(main_members: usize, events_members: usize) -> TestGateway {
        Self::start_full((main_members, events_members), layout, None, |_| {}).await
    }

    async fn start_with_options(
        layout: impl FnOnce(&TestEtcd, &TestEtcd) -> String,
        tls: Option<aq_host::tls::TlsFiles>,
        change: impl FnOnce(&mut ServeOptions),
    ) -> TestGateway {
        Self::start_full((1, 1), layout, tls, change).await
    }

    async fn start_full(
        members: (usize, usize),
        layout: impl FnOnce(&TestEtcd, &TestEtcd) -> String,
        tls: Option<aq_host::tls::TlsFiles>,
        change: impl FnOnce(&mut ServeOptions),
    ) -> TestGateway {
        let (main, events) = tokio::join!(TestEtcd::start_members("main", members.0), TestEtcd::start_members("events", members.1));
        let layout = layout(&main, &events);
        let config = Config::parse(&layout, "test layout").expect("layout parses");
        let data = tempfile::tempdir().unwrap();
        let mut options = serve_options(data.path(), tls);
        change(&mut options);
        let running = aq_host::serve::start(config, options).await.expect("aq starts");
        TestGateway { running, main, events, layout, data }
    }

    /// Starts a second aq replica on the same groups and layout.
    pub async fn replica(&self) -> Replica {
        self.replica_with(|_| {}).await
    }

    /// Starts another aq replica on the same groups and layout, with `change` made to its
    /// options.
    pub async fn replica_with(&self, change: impl FnOnce(&mut ServeOptions)) -> Replica {
        let config = Config::parse(&self.layout, "test layout").expect("layout parses");
        let data = tempfile::tempdir().unwrap();
        let mut options = serve_options(data.path(), None);
        change(&mut options);
        let running = aq_host::serve::start(config, options).await.expect("replica starts");
        Replica { running, data }
    }

    /// Takes `scope`'s keys away from the `main` group, as a hand-off's revoke does: main's role
    /// then holds the layout's ranges as if `scope` lived on another group.
    pub async fn revoke_from_main(&self, scope: &str) -> aq_host::backend::ownership::Changes {
        let mut scopes: Vec<aq_host::index::Scope> = Config::parse(&self.layout, "test layout")
            .expect("layout parses")
            .scopes
            .iter()
            .map(|s| s.to_scope().expect("a scope"))
            .collect();
        scopes.iter_mut().find(|s| s.id == scope).expect("the scope is in the layout").group = "elsewhere".into();
        let wanted = aq_host::index::ScopeIndex::new(scopes).expect("an index").group_ranges("main");
        let admin = self.main.admin_credentials();
        let mut owners = aq_host::backend::ownership::Owners::connect("main", &[self.main.url().to_string()], &admin)
            .await
            .expect("root logs into main");
        owners.reconcile(&wanted).await.expect("main's role changes")
    }

    /// The layout aq was started with.
    pub fn layout(&self) -> String {
        self.layout.clone()
    }

    /// aq's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        self.data.path()
    }

    /// The admin token aq generated in its data directory.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(aq_host::serve::admin_token_path(self.data_dir())).expect("admin token").trim().to_string()
    }

    /// One JSON request to aq's admin router in process, with the generated admin token; a
    /// `null` body sends none. Answers the status and the JSON body (`null` if not JSON).
    pub async fn admin(
        &self,
        method: axum::http::Method,
        path: &str,
        body: serde_json::Value,
    ) -> (axum::http::StatusCode, serde_json::Value) {
        let body = if body.is_null() { Vec::new() } else { serde_json::to_vec(&body).expect("JSON") };
        self.admin_bytes(method, path, body).await
    }

    /// [`TestGateway::admin`] with a raw body (a component to push).
    pub async fn admin_bytes(
        &self,
        method: axum::http::Method,
        path: &str,
        body: Vec<u8>,
    ) -> (axum::http::StatusCode, serde_json::Value) {
        use tower::ServiceExt;
        let router = aq_host::admin::router(self.running.admin.clone());
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {}", self.admin_token()))
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .expect("a request");
        let response = router.oneshot(request).await.expect("the router answers");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 24).await.expect("a body");
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    /// The decision log's lines so far, parsed.
    pub fn decisions(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.data_dir().join("decisions.log")).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).expect("decision lines are JSON")).collect()
    }

    /// `127.0.0.1:<port>` of aq's etcd API.
    pub fn endpoint(&self) -> String {
        self.running.addr.to_string()
    }

    /// An etcd client connected to aq.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint()], None).await.expect("connect to aq")
    }

    /// Runs Debian's `etcdctl` against aq; returns (success, stdout, stderr).
    pub fn etcdctl(&self, args: &[&str]) -> (bool, String, String) {
        self.etcdctl_with_input(args, None)
    }

    /// Runs `etcdctl` with standard input (for `txn`). Blocks the calling worker in place, so
    /// the in-process gateway keeps serving on the others (tests use the multi-thread runtime).
    pub fn etcdctl_with_input(&self, args: &[&str], input: Option<&str>) -> (bool, String, String) {
        tokio::task::block_in_place(|| self.run_etcdctl(args, input))
    }

    fn run_etcdctl(&self, args: &[&str], input: Option<&str>) -> (bool, String, String) {
        use std::io::Write;
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .arg("--command-timeout=10s")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("etcdctl runs (is etcd-client installed?)");
        let mut stdin = child.stdin.take().unwrap();
        if let Some(input) = input {
            stdin.write_all(input.as_bytes()).unwrap();
        }
        drop(stdin);
        // A hung etcdctl fails its test instead of stalling the suite.
        let deadline = std::time::Instant::now() + ETCDCTL_DEADLINE;
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "etcdctl {args:?} did not finish within {ETCDCTL_DEADLINE:?}; it printed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A long-running etcdctl (such as `watch`) whose output is read line by line; killed on drop.
pub struct EtcdctlStream {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl EtcdctlStream {
    /// Waits for `n` more output lines, up to 30 s.
    pub fn lines(&self, n: usize) -> Vec<String> {
        let deadline = std::time::Instant::now() + ETCDCTL_DEADLINE;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => out.push(line),
                Err(_) => panic!("etcdctl printed {} of {n} expected lines within {ETCDCTL_DEADLINE:?}: {out:?}", out.len()),
            }
        }
        out
    }
}

impl Drop for EtcdctlStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EtcdctlStream {
    /// The next output line if one is there already, without waiting.
    pub fn try_line(&self) -> Option<String> {
        self.lines.try_recv().ok()
    }

    /// Interrupts etcdctl (SIGINT), as Ctrl-C does: `lock` and `elect` then give up what they hold.
    pub fn interrupt(&self) {
        // SAFETY: kill(2) on the pid of a child this value owns and has not yet reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
    }
}

impl TestGateway {
    /// Starts `etcdctl` (e.g. `watch`) against aq and streams its standard output.
    pub fn etcdctl_stream(&self, args: &[&str]) -> EtcdctlStream {
        etcdctl_stream_at(&self.endpoint(), args)
    }
}

/// Starts `etcdctl` against the etcd API at `endpoint` (an aq replica) and streams its standard
/// output.
pub fn etcdctl_stream_at(endpoint: &str, args: &[&str]) -> EtcdctlStream {
    use std::io::BufRead;
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("etcdctl runs");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    EtcdctlStream { child, lines }
}
