//! Managed etcd: aq spawns and supervises etcd processes on free loopback ports. Used by
//! `aq serve` when no backends are configured, and by the tests' shared etcd helper.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::Group;

/// Why an etcd process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The binary is not on PATH.
    #[error("cannot run {binary}: {error}; install etcd (Debian: apt-get install etcd-server) or configure external backends")]
    Binary {
        /// What was run.
        binary: String,
        /// Why it failed.
        error: std::io::Error,
    },
    /// Ports or the data directory.
    #[error("cannot prepare etcd {name}: {error}")]
    Setup {
        /// The member name.
        name: String,
        /// Why.
        error: std::io::Error,
    },
}

/// The file in a managed etcd's directory naming its process.
const PID_FILE: &str = "etcd.pid";

/// Stops an etcd left running on `data_dir` by an aq that died without cleaning up. Only a
/// process whose command line is etcd on this very directory is touched.
fn stop_leftover(data_dir: &Path) {
    let Some(pid) = std::fs::read_to_string(data_dir.join(PID_FILE)).ok().and_then(|p| p.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let member_data = format!("--data-dir={}", data_dir.join("member-data").display());
    if !args.first().is_some_and(|a| a.ends_with("etcd")) || !args.contains(&member_data) {
        return;
    }
    tracing::warn!(pid, dir = %data_dir.display(), "stopping an etcd left running by an earlier aq");
    // SAFETY: kill(2) with a pid checked above to be our own etcd on this directory.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // Wait (up to 5 s) for it to go, so its lock on the data directory is released.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A managed group brought up: its etcd processes (one per member), aq's connection (as its
/// data user) and the credentials of its administrator.
pub struct Secured {
    /// The etcd processes, one per member.
    pub processes: Vec<EtcdProcess>,
    /// The connection requests go through.
    pub group: Group,
    /// Its root user.
    pub admin: super::Credentials,
}

/// How a managed group's etcd runs, as its layout entry says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    /// How many members (1, 3 or 5).
    pub members: usize,
    /// etcd's `--quota-backend-bytes`: past it, etcd raises NOSPACE and refuses writes until
    /// space is freed and the alarm disarmed. `None`: etcd's default (2 GiB).
    pub quota_backend_bytes: Option<u64>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec { members: 1, quota_backend_bytes: None }
    }
}

/// Starts the managed etcd of group `name` on `dir` (its data, logs and credentials) as
/// `spec` says, turns its auth on with credentials of aq's own (made at its first start)
/// and connects to every member as aq's user. Safe on every start of the same directory.
pub async fn start_secured(binary: &str, name: &str, dir: &Path, spec: Spec, timeout: Duration) -> Result<Secured, String> {
    let (processes, _) = start_cluster(binary, name, dir, spec, timeout).await?;
    let urls: Vec<String> = processes.iter().map(|p| p.client_url().to_string()).collect();
    let secrets = super::ownership::ManagedSecrets::load_or_create(dir)?;
    super::ownership::secure(name, &urls[0], &secrets).await?;
    let group = Group::connect_lazy(name, &urls).map_err(|e| e.to_string())?.with_login(secrets.data());
    Ok(Secured { processes, group, admin: secrets.admin() })
}

/// The directory of member `index` of a managed group of several members in `dir`.
pub fn member_dir(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("member-{index}"))
}

/// How many members the managed group in `dir` has on disk: a group keeps the member count it
/// was first started with (0: not started yet).
pub fn members_on_disk(dir: &Path) -> usize {
    if dir.join("member-data").exists() {
        return 1;
    }
    (0..).take_while(|&i| member_dir(dir, i).join("member-data").exists()).count()
}

/// The file in a member's directory holding its ports: a member of several must come back on
/// the ports its peers know it by.
const PORTS_FILE: &str = "ports";

/// Starts managed group `name` in `dir` as `spec.members` etcd members (1: one process in
/// `dir` itself, as [`EtcdProcess::start`]; more: one per [`member_dir`], peers of each other,
/// each on ports kept in its directory), and waits up to `timeout` until every member answers.
/// A group already on disk keeps its member count; a different count is reported and ignored.
/// A first start that fails because a port was taken is tried again on fresh ports.
pub async fn start_cluster(binary: &str, name: &str, dir: &Path, spec: Spec, timeout: Duration) -> Result<(Vec<EtcdProcess>, Group), String> {
    let (members, quota) = (spec.members, spec.quota_backend_bytes);
    let on_disk = members_on_disk(dir);
    let members = match on_disk {
        0 => members.max(1),
        n if n != members => {
            tracing::warn!(
                group = name,
                on_disk = n,
                layout = members,
                "the group was created with {n} member(s) and keeps them; a new member count applies to a new group only"
            );
            n
        }
        n => n,
    };
    if members == 1 {
        let (process, group) = EtcdProcess::start_with(binary, name, dir, timeout, quota).await?;
        return Ok((vec![process], group));
    }
    let fresh = on_disk == 0;
    let mut last_log = String::new();
    for _ in 0..3 {
        let ports = (0..members)
            .map(|i| if fresh { fresh_ports() } else { saved_ports(dir, i) })
            .collect::<Result<Vec<(u16, u16)>, String>>()?;
        let names: Vec<String> = (0..members).map(|i| format!("{name}-{i}")).collect();
        let initial = names
            .iter()
            .zip(&ports)
            .map(|(member, (_, peer))| format!("{member}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut processes = Vec::with_capacity(members);
        for (i, member) in names.iter().enumerate() {
            let mdir = member_dir(dir, i);
            let setup = |error: std::io::Error| format!("cannot prepare etcd {member}: {error}");
            std::fs::create_dir_all(&mdir).map_err(setup)?;
            std::fs::write(mdir.join(PORTS_FILE), format!("{} {}\n", ports[i].0, ports[i].1)).map_err(setup)?;
            let cluster = Some(Cluster { member: member.clone(), initial: initial.clone() });
            processes.push(EtcdProcess::spawn_on(binary, name, &mdir, ports[i], cluster, quota).map_err(|e| e.to_string())?);
        }
        let urls: Vec<String> = processes.iter().map(|p| p.client_url.clone()).collect();
        let group = Group::connect_lazy(name, &urls).map_err(|e| e.to_string())?;
        let each = urls.iter().map(|url| group.member(url)).collect::<Result<Vec<Group>, _>>().map_err(|e| e.to_string())?;
        let deadline = Instant::now() + timeout;
        loop {
            let mut all = true;
            for member in &each {
                all &= member.wait_ready(Duration::from_millis(300)).await.is_ok();
            }
            if all && processes.iter_mut().all(|p| p.exited().is_none()) {
                return Ok((processes, group));
            }
            if let Some(gone) = processes.iter_mut().position(|p| p.exited().is_some()) {
                last_log = processes[gone].log_tail(20);
                break;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> =
                    processes.iter().map(|p| format!("etcd log ({}):\n{}", p.data_dir.join("etcd.log").display(), p.log_tail(10))).collect();
                return Err(format!("etcd group {name} ({members} members) did not answer within {} s\n{}", timeout.as_secs(), logs.join("\n")));
            }
        }
        drop(processes);
        if !fresh {
            break;
        }
        // A port of a first start was taken: start over on fresh ports, from nothing.
        for i in 0..members {
            let _ = std::fs::remove_dir_all(member_dir(dir, i));
        }
    }
    Err(format!("etcd group {name} ({members} members): a member exited at start\nits log:\n{last_log}"))
}

/// A client and a peer port for a new member.
fn fresh_ports() -> Result<(u16, u16), String> {
    Ok((free_port().map_err(|e| e.to_string())?, free_port().map_err(|e| e.to_string())?))
}

/// The client and peer port member `index` of the group in `dir` was created on.
fn saved_ports(dir: &Path, index: usize) -> Result<(u16, u16), String> {
    let saved = std::fs::read_to_string(member_dir(dir, index).join(PORTS_FILE)).unwrap_or_default();
    let parsed = saved.trim().split_once(' ').and_then(|(c, p)| Some((c.parse().ok()?, p.parse().ok()?)));
    parsed.ok_or_else(|| {
        format!(
            "member {index} of the managed etcd in {} has no readable {PORTS_FILE} file (client and peer port); restore it or remove the group's directory",
            dir.display()
        )
    })
}

/// How a member of a group of several is started: its fixed name and the whole cluster's peer
/// URLs (`name=url,…`).
#[derive(Clone, Debug)]
struct Cluster {
    member: String,
    initial: String,
}

/// One etcd process (a one-member cluster, or one member of a managed group of several),
/// killed when dropped.
#[derive(Debug)]
pub struct EtcdProcess {
    child: Child,
    name: String,
    /// This process's etcd member name: the group's name and a tag of this start, which tells
    /// it apart from another etcd answering on its port.
    member: String,
    client_url: String,
    data_dir: PathBuf,
    ports: (u16, u16),
    /// For a member of a group of several: its name and its peers.
    cluster: Option<Cluster>,
    /// Its `--quota-backend-bytes`, when not etcd's default.
    quota: Option<u64>,
}

/// A free loopback TCP port. Another process may take it before etcd binds it; a start that
/// fails on a taken port is retried by the caller.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdProcess {
    /// Starts `etcd` (from `binary`, usually just `etcd` on PATH) as a one-member cluster named
    /// `name` with its data in `data_dir`, listening on free loopback ports. Its output goes to
    /// `data_dir/etcd.log`. Returns at once; see [`crate::backend::Group::wait_ready`].
    pub fn spawn(binary: &str, name: &str, data_dir: &Path) -> Result<Self, SpawnError> {
        let setup = |error| SpawnError::Setup { name: name.to_string(), error };
        let ports = (free_port().map_err(setup)?, free_port().map_err(setup)?);
        Self::spawn_on(binary, name, data_dir, ports, None, None)
    }

    /// Starts etcd as [`EtcdProcess::spawn`] does and waits up to `timeout` until it answers;
    /// returns it with a connection. A free port can be taken by another process between being
    /// picked and etcd binding it: an etcd that exits before answering is started again on
    /// fresh ports, up to three times.
    pub async fn start(binary: &str, name: &str, data_dir: &Path, timeout: Duration) -> Result<(Self, Group), String> {
        Self::start_with(binary, name, data_dir, timeout, None).await
    }

    /// [`EtcdProcess::start`] with etcd's `--quota-backend-bytes` at `quota` (`None`: etcd's
    /// default).
    async fn start_with(binary: &str, name: &str, data_dir: &Path, timeout: Duration, quota: Option<u64>) -> Result<(Self, Group), String> {
        let mut last_log = String::new();
        for _ in 0..3 {
            let mut process = Self::spawn_on(binary, name, data_dir, fresh_ports()?, None, quota).map_err(|e| e.to_string())?;
            let group = Group::connect_lazy(name, &[process.client_url.clone()]).map_err(|e| e.to_string())?;
            let deadline = Instant::now() + timeout;
            loop {
                if group.wait_ready(Duration::from_millis(500)).await.is_ok() && process.answers(&group).await {
                    return Ok((process, group));
                }
                if process.exited().is_some() {
                    last_log = process.log_tail(20);
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "etcd {name} did not answer within {} s\netcd log ({}):\n{}",
                        timeout.as_secs(),
                        data_dir.join("etcd.log").display(),
                        process.log_tail(20)
                    ));
                }
            }
        }
        Err(format!("etcd {name} exited at start three times\nlast etcd log:\n{last_log}"))
    }

    /// Whether the etcd answering on this process's client port is this process: another
    /// etcd (of another aq, or a test) may have taken the port between its pick and this one
    /// binding it, and then this one exits while the other answers. Its member carries this
    /// start's name once it has published itself.
    async fn answers(&mut self, group: &Group) -> bool {
        let ours = match group.member_list().await {
            Ok(members) => members.members.iter().any(|m| m.name == self.member),
            Err(_) => false,
        };
        ours && self.exited().is_none()
    }

    /// Starts a process again after it exited: same name, data and ports, so clients
    /// reconnect to the same URL.
    pub fn respawn(binary: &str, previous: &EtcdProcess) -> Result<Self, SpawnError> {
        Self::spawn_on(binary, &previous.name, &previous.data_dir, previous.ports, previous.cluster.clone(), previous.quota)
    }

    fn spawn_on(
        binary: &str,
        name: &str,
        data_dir: &Path,
        ports: (u16, u16),
        cluster: Option<Cluster>,
        quota: Option<u64>,
    ) -> Result<Self, SpawnError> {
        let setup = |error| SpawnError::Setup { name: name.to_string(), error };
        std::fs::create_dir_all(data_dir).map_err(setup)?;
        stop_leftover(data_dir);
        let (client, peer) = ports;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let (member, initial) = match &cluster {
            Some(cluster) => (cluster.member.clone(), cluster.initial.clone()),
            None => {
                let mut tag = [0u8; 4];
                getrandom::fill(&mut tag).map_err(|e| setup(std::io::Error::other(e.to_string())))?;
                let member = format!("{name}-{}", hex::encode(tag));
                let initial = format!("{member}={peer_url}");
                (member, initial)
            }
        };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(data_dir.join("etcd.log")).map_err(setup)?;
        let log_err = log.try_clone().map_err(setup)?;
        let mut command = Command::new(binary);
        // etcd goes when aq goes, however aq ends (SIGKILL, OOM): the kernel kills it when the
        // thread that started it exits, and aq starts etcd only on threads that live as long
        // as aq (its runtime's). An aq that died before the child set this is detected too.
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (prctl, getppid).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("aq exited while starting etcd"));
                }
                Ok(())
            });
        }
        let child = command
            .arg(format!("--name={member}"))
            .arg(format!("--data-dir={}", data_dir.join("member-data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={initial}"))
            .arg("--initial-cluster-state=new")
            // aq's etcd passwords are 192 random bits, which no hash strength makes harder to
            // guess; the lowest bcrypt cost keeps each login (one per connection) cheap.
            .arg("--bcrypt-cost=4")
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .args(quota.map(|bytes| format!("--quota-backend-bytes={bytes}")))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|error| SpawnError::Binary { binary: binary.to_string(), error })?;
        // Recorded so that an aq killed without cleaning up (SIGKILL, OOM) can stop this process
        // when it starts again: otherwise it would hold the data directory's lock forever.
        std::fs::write(data_dir.join(PID_FILE), child.id().to_string()).map_err(setup)?;
        Ok(EtcdProcess { child, name: name.to_string(), member, client_url, data_dir: data_dir.to_path_buf(), ports, cluster, quota })
    }

    /// The member name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `http://127.0.0.1:<port>`.
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The process id, while it runs.
    pub fn pid(&mut self) -> Option<u32> {
        self.exited().is_none().then(|| self.child.id())
    }

    /// The exit status, if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines etcd logged, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.data_dir.join("etcd.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
