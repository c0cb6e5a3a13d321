//! The eBPF side of the agent: loads Ferry's programs once, attaches them per meshed pod, and
//! owns the maps they share with user space.
//!
//! Per pod: connect4/6, getpeername4/6 and sock_ops on the pod's cgroup; sk_lookup on its netns; its
//! netns cookie in `MESHED_NETNS` (with its IPv4 address, which redirected sockets are bound to)
//! and, if it has an IPv6 address, in `POD_IPV6`; its inbound plaintext listeners (IPv4, IPv6) in
//! `INBOUND_LISTENERS`, under each of its addresses.
//!
//! Under the pin directory (a bpffs): `maps/v<layout>/` holds the shared maps, which every agent
//! generation on the node opens instead of creating its own, so during an upgrade the old and the
//! new programs see the same listeners and original destinations; `links/` holds the links of a
//! fail-closed agent, which outlive it. Fail-open links are owned by file descriptors and detach
//! when the agent exits.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{self, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps, links::FdLink, links::PinnedLink},
};
use aya_log::EbpfLogger;
use ferry_common::{
    AF_INET, AF_INET6, COUNTER_SLOTS, ConnKey, Counter, IpKey, MAX_MESHED_PODS, MAX_TRACKED_CONNECTIONS,
    SockAddr, ipv6_octets, ipv6_words, maps as map_names, programs as prog_names,
};
use tokio::io::unix::AsyncFd;

use crate::inpod::PodNetns;

/// The compiled eBPF object, built by agent/build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup { path: String, source: std::io::Error },
    #[error("the pod has no IP address")]
    NoAddress,
    #[error("the pod has IPv6 addresses ({0}) but no IPv6 listener")]
    NoIpv6Listener(String),
    #[error("pinning eBPF objects at {path}: {problem}")]
    Pin { path: String, problem: String },
}

/// A link the agent owns. Pinned links stay attached if the agent dies (fail-closed); unpinned
/// ones detach with the agent's file descriptors (fail-open).
enum OwnedLink {
    Fd(FdLink),
    Pinned(PinnedLink),
}

impl OwnedLink {
    fn new(link: FdLink, pin: Option<PathBuf>) -> Result<OwnedLink, DatapathError> {
        match pin {
            None => Ok(OwnedLink::Fd(link)),
            Some(path) => link
                .pin(&path)
                .map(OwnedLink::Pinned)
                .map_err(|e| DatapathError::Pin { path: path.display().to_string(), problem: e.to_string() }),
        }
    }

    /// Detaches now: unpins (so the kernel drops the link) and closes.
    fn detach(self) {
        match self {
            OwnedLink::Fd(link) => drop(link),
            OwnedLink::Pinned(pinned) => match pinned.unpin() {
                Ok(link) => drop(link),
                Err(e) => tracing::warn!("unpinning a link: {e}"),
            },
        }
    }
}

/// What is attached for one pod, so the pod can be detached alone.
#[derive(Default)]
struct PodLinks {
    /// In attach order; detached in reverse.
    links: Vec<OwnedLink>,
    ips: Vec<IpKey>,
}

/// What happens to capture when the agent dies without a clean shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Links and maps stay (pinned in bpffs): meshed pods' new connections are refused and
    /// inbound to them dropped until an agent is back. Policy is never bypassed.
    Closed,
    /// Capture detaches with the agent: pods talk directly, unmeshed, until it is back.
    Open,
}

pub struct Datapath {
    ebpf: Ebpf,
    meshed_netns: maps::HashMap<MapData, u64, u32>,
    pod_ipv6: maps::HashMap<MapData, u64, [u32; 4]>,
    listeners: SockHash<MapData, IpKey>,
    fail_closed_ips: maps::HashMap<MapData, IpKey, u32>,
    pods: HashMap<u64, PodLinks>,
    fail_mode: FailMode,
    /// Where links are pinned in fail-closed mode.
    links_dir: PathBuf,
    /// Where the shared maps are pinned.
    maps_dir: PathBuf,
}

/// Original destinations of redirected connections, shared with the outbound proxy.
#[derive(Clone)]
pub struct OrigDstTable(Arc<Mutex<maps::HashMap<MapData, ConnKey, SockAddr>>>);

/// The programs' per-CPU event counters.
#[derive(Clone)]
pub struct Counters(Arc<PerCpuArray<MapData, u64>>);

impl Datapath {
    /// Loads the programs into the kernel, opening the shared maps pinned under `pin_dir` (or
    /// creating and pinning them), and starts forwarding the programs' log lines to `tracing`.
    /// Nothing is attached yet.
    pub fn load(
        fail_mode: FailMode,
        pin_dir: &Path,
    ) -> Result<(Datapath, OrigDstTable, Counters), DatapathError> {
        let links_dir = pin_dir.join("links");
        let maps_dir = pin_dir.join("maps").join(format!("v{}", map_names::LAYOUT_VERSION));
        prepare_pin_dir(pin_dir, &[&links_dir, &maps_dir])?;
        let mut loader = EbpfLoader::new();
        let map_paths: Vec<(&str, PathBuf)> =
            map_names::SHARED.iter().map(|&name| (name, maps_dir.join(name))).collect();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_forwarder(logger),
            Err(e) => tracing::warn!("eBPF log forwarding unavailable: {e}"),
        }
        for name in prog_names::SOCK_ADDR {
            program::<CgroupSockAddr>(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        program::<SockOps>(&mut ebpf, prog_names::SOCK_OPS)?
            .load()
            .map_err(|source| DatapathError::Program { name: prog_names::SOCK_OPS, source })?;
        program::<SkLookup>(&mut ebpf, prog_names::SK_LOOKUP)?
            .load()
            .map_err(|source| DatapathError::Program { name: prog_names::SK_LOOKUP, source })?;

        let meshed_netns = take_map(&mut ebpf, map_names::MESHED_NETNS)?;
        let pod_ipv6 = take_map(&mut ebpf, map_names::POD_IPV6)?;
        let listeners = take_map(&mut ebpf, map_names::INBOUND_LISTENERS)?;
        let fail_closed_ips = take_map(&mut ebpf, map_names::FAIL_CLOSED_IPS)?;
        let orig_dst = take_map(&mut ebpf, map_names::ORIG_DST)?;
        let counters = take_map(&mut ebpf, map_names::COUNTERS)?;
        let datapath = Datapath {
            ebpf,
            meshed_netns,
            pod_ipv6,
            listeners,
            fail_closed_ips,
            pods: HashMap::new(),
            fail_mode,
            links_dir,
            maps_dir,
        };
        Ok((datapath, OrigDstTable(Arc::new(Mutex::new(orig_dst))), Counters(Arc::new(counters))))
    }

    /// Starts capturing a pod: registers its netns and inbound listeners (IPv4, and IPv6 if it has
    /// an IPv6 address), then attaches the programs.
    /// On error nothing of the pod stays attached. Links a previous agent left pinned for this pod
    /// are replaced once the new ones are attached, so capture never lapses.
    pub fn attach_pod(
        &mut self,
        netns: &PodNetns,
        cgroup: &Path,
        ips: &[IpAddr],
        inbound_listeners: (BorrowedFd<'_>, Option<BorrowedFd<'_>>),
    ) -> Result<(), DatapathError> {
        let mut links = PodLinks::default();
        let result = self.attach_links(&mut links, netns, cgroup, ips, inbound_listeners);
        match result {
            Ok(()) => {
                self.pods.insert(netns.cookie(), links);
                Ok(())
            }
            Err(e) => {
                self.detach_links(links);
                self.forget_netns(netns.cookie());
                Err(e)
            }
        }
    }

    fn attach_links(
        &mut self,
        links: &mut PodLinks,
        netns: &PodNetns,
        cgroup: &Path,
        ips: &[IpAddr],
        (inbound_v4, inbound_v6): (BorrowedFd<'_>, Option<BorrowedFd<'_>>),
    ) -> Result<(), DatapathError> {
        let map_err = |name| move |source| DatapathError::Map { name, source };
        let cgroup_dir = File::open(cgroup)
            .map_err(|source| DatapathError::Cgroup { path: cgroup.display().to_string(), source })?;

        // Listeners and netns first: a connection captured a moment later must find them.
        if ips.is_empty() {
            return Err(DatapathError::NoAddress);
        }
        for ip in ips {
            let (key, listener) = match ip {
                IpAddr::V4(v4) => (IpKey::v4(u32::from_ne_bytes(v4.octets())), inbound_v4),
                IpAddr::V6(v6) => {
                    let listener = inbound_v6.ok_or_else(|| {
                        let ips: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
                        DatapathError::NoIpv6Listener(ips.join(", "))
                    })?;
                    (IpKey::v6(ipv6_words(v6.octets())), listener)
                }
            };
            self.listeners
                .insert(key, listener.as_raw_fd(), 0)
                .map_err(map_err(map_names::INBOUND_LISTENERS))?;
            if self.fail_mode == FailMode::Closed {
                self.fail_closed_ips.insert(key, 0, 0).map_err(map_err(map_names::FAIL_CLOSED_IPS))?;
            }
            links.ips.push(key);
        }
        // Redirected sockets are bound to the pod's first address of their family; 0 (IPv4)
        // means none. A pod with an IPv6 address has its IPv6 connections captured.
        let first =
            |family: u16| links.ips.iter().find(|key| key.family == u32::from(family)).map(|key| key.ip);
        if let Some(ipv6) = first(AF_INET6) {
            self.pod_ipv6.insert(netns.cookie(), ipv6, 0).map_err(map_err(map_names::POD_IPV6))?;
        }
        let ipv4 = first(AF_INET).map_or(0, |ip| ip[0]);
        self.meshed_netns.insert(netns.cookie(), ipv4, 0).map_err(map_err(map_names::MESHED_NETNS))?;

        let cookie = netns.cookie();
        let attach_err = |name| move |source| DatapathError::Program { name, source };
        let sk_lookup = program::<SkLookup>(&mut self.ebpf, prog_names::SK_LOOKUP)?;
        let id = sk_lookup.attach(netns.as_fd()).map_err(attach_err(prog_names::SK_LOOKUP))?;
        let link = sk_lookup.take_link(id).map_err(attach_err(prog_names::SK_LOOKUP))?;
        let sk_lookup_link: FdLink = link.into();
        let mut attached = vec![(prog_names::SK_LOOKUP, sk_lookup_link)];
        for name in prog_names::ALL.into_iter().filter(|&name| name != prog_names::SK_LOOKUP) {
            let link = if name == prog_names::SOCK_OPS {
                let prog = program::<SockOps>(&mut self.ebpf, name)?;
                let id = prog.attach(&cgroup_dir, CgroupAttachMode::Single).map_err(attach_err(name))?;
                FdLink::try_from(prog.take_link(id).map_err(attach_err(name))?)
            } else {
                let prog = program::<CgroupSockAddr>(&mut self.ebpf, name)?;
                let id = prog.attach(&cgroup_dir, CgroupAttachMode::Single).map_err(attach_err(name))?;
                FdLink::try_from(prog.take_link(id).map_err(attach_err(name))?)
            };
            let link =
                link.map_err(|e| DatapathError::Pin { path: name.to_owned(), problem: e.to_string() })?;
            attached.push((name, link));
        }
        // Now both generations are attached; the old one (left by a crashed agent, or held by
        // the agent this one upgrades) can go: without its pins it detaches when its fds close.
        self.remove_stale_pins(cookie);
        for (name, link) in attached {
            let pin =
                (self.fail_mode == FailMode::Closed).then(|| self.links_dir.join(format!("{cookie}-{name}")));
            links.links.push(OwnedLink::new(link, pin)?);
        }
        Ok(())
    }

    /// Removes pins a previous agent left for the pod with this netns cookie.
    fn remove_stale_pins(&self, cookie: u64) {
        let prefix = format!("{cookie}-");
        for entry in std::fs::read_dir(&self.links_dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Removes what a previous agent left for pods this agent does not capture (gone while no
    /// agent ran, or dropped from the config): their pinned links and shared-map entries.
    pub fn remove_orphans(&mut self) {
        self.remove_orphan_entries();
        for entry in std::fs::read_dir(&self.links_dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name.split('-').next().and_then(|c| c.parse::<u64>().ok());
            if owner.is_none_or(|cookie| !self.pods.contains_key(&cookie)) {
                tracing::info!(pin = %name, "removing a link left by a previous agent");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn remove_orphan_entries(&mut self) {
        let owned_ips: HashSet<IpKey> = self.pods.values().flat_map(|p| p.ips.iter().copied()).collect();
        let stale_netns: Vec<u64> =
            self.meshed_netns.keys().flatten().filter(|c| !self.pods.contains_key(c)).collect();
        let stale_ipv6: Vec<u64> =
            self.pod_ipv6.keys().flatten().filter(|c| !self.pods.contains_key(c)).collect();
        for cookie in stale_netns.into_iter().chain(stale_ipv6) {
            self.forget_netns(cookie);
        }
        let stale_ips: Vec<IpKey> =
            self.fail_closed_ips.keys().flatten().filter(|k| !owned_ips.contains(k)).collect();
        for key in &stale_ips {
            let _ = self.fail_closed_ips.remove(key);
        }
        let stale_listeners: Vec<IpKey> =
            self.listeners.keys().flatten().filter(|k| !owned_ips.contains(k)).collect();
        for key in &stale_listeners {
            let _ = self.listeners.remove(key);
        }
    }

    /// After a clean stop (every pod detached): removes the shared maps' pins, so nothing of
    /// Ferry stays in the kernel.
    pub fn unpin_maps(&self) {
        for name in map_names::SHARED {
            let _ = std::fs::remove_file(self.maps_dir.join(name));
        }
    }

    /// Stops capturing a pod (new connections go direct; open ones are not touched).
    pub fn detach_pod(&mut self, netns_cookie: u64) {
        if let Some(links) = self.pods.remove(&netns_cookie) {
            self.detach_links(links);
            self.forget_netns(netns_cookie);
        }
    }

    fn forget_netns(&mut self, netns_cookie: u64) {
        let _ = self.meshed_netns.remove(&netns_cookie);
        let _ = self.pod_ipv6.remove(&netns_cookie);
    }

    fn detach_links(&mut self, links: PodLinks) {
        // Reverse order of attach: stop redirecting before the listener goes away.
        for link in links.links.into_iter().rev() {
            link.detach();
        }
        for key in &links.ips {
            let _ = self.listeners.remove(key);
            let _ = self.fail_closed_ips.remove(key);
        }
    }

    /// Number of pods currently captured.
    pub fn attached_pods(&self) -> usize {
        self.pods.len()
    }

    /// Programs, attachments and maps, for the admin API.
    pub fn view(&self) -> DatapathView {
        let pods = self.pods.len();
        let program = |name, kind, attached_to| ProgramView { name, kind, attached_to, links: pods };
        let map = |name, kind, max_entries, entries| MapView { name, kind, max_entries, entries };
        DatapathView {
            programs: vec![
                program(prog_names::CONNECT4, "cgroup_sock_addr", "pod cgroup (connect4)"),
                program(prog_names::CONNECT6, "cgroup_sock_addr", "pod cgroup (connect6)"),
                program(prog_names::GETPEERNAME4, "cgroup_sock_addr", "pod cgroup (getpeername4)"),
                program(prog_names::GETPEERNAME6, "cgroup_sock_addr", "pod cgroup (getpeername6)"),
                program(prog_names::SOCK_OPS, "sock_ops", "pod cgroup"),
                program(prog_names::SK_LOOKUP, "sk_lookup", "pod netns"),
            ],
            maps: vec![
                map(map_names::MESHED_NETNS, "hash", MAX_MESHED_PODS, Some(self.meshed_netns.keys().count())),
                map(map_names::POD_IPV6, "hash", MAX_MESHED_PODS, Some(self.pod_ipv6.keys().count())),
                map(
                    map_names::INBOUND_LISTENERS,
                    "sockhash",
                    MAX_MESHED_PODS,
                    Some(self.listeners.keys().count()),
                ),
                map(map_names::ORIG_DST_BY_SOCKET, "lru_hash", MAX_TRACKED_CONNECTIONS, None),
                map(map_names::ORIG_DST, "lru_hash", MAX_TRACKED_CONNECTIONS, None),
                map(map_names::COUNTERS, "percpu_array", COUNTER_SLOTS, None),
            ],
        }
    }
}

/// The eBPF side as the admin API shows it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DatapathView {
    pub programs: Vec<ProgramView>,
    pub maps: Vec<MapView>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProgramView {
    pub name: &'static str,
    pub kind: &'static str,
    pub attached_to: &'static str,
    /// One link per captured pod.
    pub links: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MapView {
    pub name: &'static str,
    pub kind: &'static str,
    pub max_entries: u32,
    /// Current entries, where counting them is cheap.
    pub entries: Option<usize>,
}

/// The pin directory must be on a bpffs; /sys/fs/bpf is mounted as one if it is not yet.
fn prepare_pin_dir(pin_dir: &Path, subdirs: &[&Path]) -> Result<(), DatapathError> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let pin_err = |problem: String| DatapathError::Pin { path: pin_dir.display().to_string(), problem };
    let bpffs = Path::new("/sys/fs/bpf");
    let is_bpffs = |path: &Path| {
        let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
        // SAFETY: valid C string and an out-parameter of the right type.
        let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
        unsafe { libc::statfs(c_path.as_ptr(), &mut stat) == 0 && stat.f_type as i64 == BPF_FS_MAGIC }
    };
    if pin_dir.starts_with(bpffs) && !is_bpffs(bpffs) {
        std::fs::create_dir_all(bpffs).map_err(|e| pin_err(e.to_string()))?;
        // SAFETY: constant C strings.
        let rc = unsafe {
            libc::mount(c"bpf".as_ptr(), c"/sys/fs/bpf".as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null())
        };
        if rc != 0 {
            return Err(pin_err(format!(
                "mounting bpffs on /sys/fs/bpf: {}",
                std::io::Error::last_os_error()
            )));
        }
        tracing::info!("mounted bpffs on /sys/fs/bpf");
    }
    std::fs::create_dir_all(pin_dir).map_err(|e| pin_err(e.to_string()))?;
    if !is_bpffs(pin_dir) {
        return Err(pin_err("not on a bpffs".into()));
    }
    for dir in subdirs {
        std::fs::create_dir_all(dir).map_err(|e| pin_err(format!("{}: {e}", dir.display())))?;
    }
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(DatapathError::Missing(name))?;
    program.try_into().map_err(|source| DatapathError::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::Missing(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

fn spawn_log_forwarder(logger: EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's fd, which lives as long as the AsyncFd.
    let Ok(mut fd) = (unsafe { AsyncFd::register(logger) }) else {
        tracing::warn!("eBPF log forwarding unavailable: cannot poll the log ring");
        return;
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

impl OrigDstTable {
    /// Takes (reads and removes) the original destination of a connection accepted on a pod's
    /// outbound listener, keyed by the pod's netns, the client's port and the listener's family.
    pub fn take(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        let key = ConnKey::new(netns_cookie, client.port(), client.is_ipv6());
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let dst = map.get(&key, 0).ok()?;
        // Removing keeps a stale entry from ever naming the destination of a later connection.
        let _ = map.remove(&key);
        let ip = if dst.family == AF_INET6 {
            IpAddr::from(ipv6_octets(dst.ip))
        } else {
            IpAddr::from(dst.ip[0].to_ne_bytes())
        };
        Some(SocketAddr::new(ip, dst.port))
    }
}

impl Counters {
    /// Each counter summed over all CPUs.
    pub fn read(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let sum = self.0.get(&(c as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
                (c, sum)
            })
            .collect()
    }
}
