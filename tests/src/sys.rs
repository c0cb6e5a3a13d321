//! Kernel objects of the sandbox, each removed when its guard drops.

use std::{
    fs::File,
    io,
    net::{SocketAddr, TcpStream},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub(crate) fn require_root() -> Result<()> {
    // SAFETY: trivial syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the Ferry sandbox needs root (network namespaces, cgroups, eBPF); run as root");
    }
    Ok(())
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !output.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

pub(crate) fn signal(child: &Child, signal: libc::c_int) -> Result<()> {
    // SAFETY: signalling our own child by pid.
    if unsafe { libc::kill(child.id() as libc::pid_t, signal) } != 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(())
}

/// Sends SIGTERM to a process and waits up to 5 s for it to go, then SIGKILL.
pub(crate) fn terminate_pid(pid: libc::pid_t) {
    // SAFETY: plain signals; a stale pid at worst gets ESRCH.
    unsafe {
        if libc::kill(pid, libc::SIGTERM) != 0 {
            return;
        }
        for _ in 0..250 {
            if libc::kill(pid, 0) != 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        libc::kill(pid, libc::SIGKILL);
    }
}

/// SIGKILLs every process in a cgroup directory.
pub(crate) fn kill_cgroup(path: &Path) {
    let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<libc::pid_t>().ok()) {
        // SAFETY: plain signal.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Kills every process in a cgroup and its descendants, then removes them, deepest first.
pub(crate) fn kill_cgroup_tree(path: &Path) {
    for child in std::fs::read_dir(path).into_iter().flatten().flatten().filter(|e| e.path().is_dir()) {
        kill_cgroup_tree(&child.path());
    }
    kill_cgroup(path);
    let _ = std::fs::remove_dir(path);
}

pub(crate) fn delete_netns_with_prefix(prefix: &str) {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with(prefix) {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// A named network namespace (/run/netns/NAME), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    pub fn create(name: &str) -> Result<Netns> {
        // A leftover from a killed run of the same name would make `add` fail: clear it first.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run(Command::new("ip").args(["netns", "add", name]))?;
        Ok(Netns { name: name.to_owned(), path: Path::new("/run/netns").join(name) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ]))
    }

    /// Connects to `addr` from inside this netns (a socket keeps the netns it was made in).
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        let file = File::open(&self.path)?;
        let stream = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<TcpStream> {
                setns(&file)?;
                TcpStream::connect_timeout(&addr, timeout)
            })
            .join()
            .expect("connect thread panicked")
        })?;
        Ok(stream)
    }

    /// Spawns `cmd` inside this netns and, if given, inside `cgroup` (before it runs any code).
    /// Uses setns instead of `ip netns exec`, which would hide the host's cgroup2 mount.
    pub fn spawn(&self, cmd: Command, cgroup: Option<&Cgroup>) -> Result<Child> {
        spawn_in(&self.path, cmd, cgroup)
    }
}

/// [`Netns::spawn`] for a netns known by its path (e.g. /run/netns/NAME).
pub(crate) fn spawn_in(path: &Path, mut cmd: Command, cgroup: Option<&Cgroup>) -> Result<Child> {
    let netns: OwnedFd = File::open(path)?.into();
    let procs: Option<OwnedFd> = match cgroup {
        Some(cg) => Some(File::options().write(true).open(cg.path().join("cgroup.procs"))?.into()),
        None => None,
    };
    // SAFETY: the closure only makes async-signal-safe syscalls on fds opened beforehand.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                let mut digits = [0u8; 20];
                let text = format_pid(libc::getpid() as u32, &mut digits);
                if libc::write(procs.as_raw_fd(), text.as_ptr().cast(), text.len()) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("spawning {cmd:?} in netns {}", path.display()))
}

fn setns(file: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd; only this thread moves.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Decimal digits of `pid` without allocating (runs between fork and exec).
fn format_pid(mut pid: u32, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            return &buf[start..];
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A cgroup v2 directory, removed on drop (once its processes are gone).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn create(path: &Path) -> Result<Cgroup> {
        std::fs::create_dir_all(path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup { path: path.to_owned() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes may take a moment to leave after being killed.
        for _ in 0..50 {
            if remove_empty_tree(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("cannot remove cgroup {}", self.path.display());
    }
}

/// Removes a cgroup and the (process-free) cgroups below it, deepest first.
fn remove_empty_tree(path: &Path) -> io::Result<()> {
    for child in std::fs::read_dir(path)?.flatten().filter(|e| e.path().is_dir()) {
        remove_empty_tree(&child.path())?;
    }
    std::fs::remove_dir(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_pids() {
        let mut buf = [0u8; 20];
        assert_eq!(super::format_pid(0, &mut buf), b"0");
        assert_eq!(super::format_pid(4_194_304, &mut buf), b"4194304");
    }
}

/// A process killed when dropped, so that a test failing midway leaves none behind.
pub struct Process(Option<Child>);

impl Process {
    pub fn new(child: Child) -> Process {
        Process(Some(child))
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("a process is only taken by finish()")
    }

    /// Waits for it to exit; the last line it printed (its stdout must be piped).
    pub fn finish(mut self) -> Result<String> {
        let child = self.0.take().expect("a process is only taken by finish()");
        let output = child.wait_with_output()?;
        Ok(String::from_utf8_lossy(&output.stdout).lines().last().unwrap_or_default().to_owned())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a process uses, from /proc (zero for what cannot be read, e.g. it exited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcUsage {
    /// User + system CPU time, in clock ticks (1/100 s).
    pub cpu_ticks: u64,
    /// The user part of `cpu_ticks`: the process's own code, not the kernel's work for it.
    pub user_ticks: u64,
    pub rss_kib: u64,
    pub open_fds: usize,
}

impl ProcUsage {
    pub fn of(pid: u32) -> ProcUsage {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime is 14th, stime 15th overall.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:")?.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
        ProcUsage { cpu_ticks: field(11) + field(12), user_ticks: field(11), rss_kib, open_fds }
    }
}
