//! Ferry's eBPF programs: in-pod, socket-level capture (see docs/architecture.md).
//!
//! - `ferry_connect4` (cgroup/connect4): rewrites a meshed pod's outbound TCP connect to the pod's
//!   outbound listener and remembers the original destination under the socket cookie.
//! - `ferry_connect6` (cgroup/connect6): the same for IPv6 sockets connecting to an IPv4 address
//!   (`::ffff:a.b.c.d`, as Java and .NET dual-stack sockets do), which connect4 never sees.
//! - `ferry_sock_ops` (sockops): when that connection is established, re-keys the destination by
//!   (netns cookie, client port), which is what the agent knows after `accept()`.
//! - `ferry_getpeername4`, `ferry_getpeername6`: the app's `getpeername()` sees the original
//!   destination.
//! - `ferry_sk_lookup` (sk_lookup, per pod netns): steers inbound connections to the pod's plaintext
//!   listener, and refuses inbound IPv6, which is not meshed, so policy cannot be bypassed over it.
//!
//! Rare events are logged through aya-log, each kind at most once per CPU every 10 s (the counters
//! have every occurrence); nothing is logged per packet or per connection.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SK_LOOKUP_F_REPLACE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{bpf_bind, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use ferry_common::{
    AF_INET, AF_INET6, AGENT_MARK, COUNTER_SLOTS, ConnKey, Counter, HBONE_PORT, IpKey, MAX_MESHED_PODS,
    MAX_TRACKED_CONNECTIONS, OUTBOUND_PORT, SockAddr,
};

const IPPROTO_TCP: u32 = 6;
/// cgroup/connect4 and getpeername4 verdict: let the call proceed.
const ALLOW: i32 = 1;
/// 127.0.0.1 as the kernel stores it (network byte order).
const LOOPBACK: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 as the kernel stores it.
const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// The third word of an IPv4-mapped IPv6 address, `::ffff:a.b.c.d` (the fourth is the IPv4 one).
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Netns cookies of meshed pods; the value is the pod's IPv4 address (network order, 0 if it has
/// none), which redirected sockets are bound to.
#[map]
static MESHED_NETNS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_MESHED_PODS, 0);

/// Original destination by socket cookie: written on connect, read by sock_ops and getpeername.
#[map]
static ORIG_DST_BY_SOCKET: LruHashMap<u64, SockAddr> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

/// Original destination by (netns cookie, client port): read and deleted by the agent on accept.
#[map]
static ORIG_DST: LruHashMap<ConnKey, SockAddr> = LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

/// Each meshed pod's inbound plaintext listener, keyed by pod IP.
#[map]
static INBOUND_LISTENERS: SockHash<IpKey> = SockHash::with_max_entries(MAX_MESHED_PODS, 0);

/// Pod IPs whose inbound traffic must not reach the app unproxied: with the agent gone (no
/// listener in INBOUND_LISTENERS), connections to them are dropped instead of passed.
#[map]
static FAIL_CLOSED_IPS: HashMap<IpKey, u32> = HashMap::with_max_entries(MAX_MESHED_PODS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// The warnings, each of which a burst of connections could repeat (a full map, dual-stack
/// clients trying IPv6 first): each is logged at most once per CPU per [`WARN_INTERVAL_NS`], while
/// the counters have every occurrence.
#[derive(Clone, Copy)]
#[repr(u32)]
enum Warning {
    ConnectMapFull,
    OrigDstMissing,
    OrigDstUpdateFailed,
    NoListener,
    Ipv6Refused,
    SourceBindFailed,
    Ipv6NotCaptured,
}
const WARNINGS: u32 = Warning::Ipv6NotCaptured as u32 + 1;
const WARN_INTERVAL_NS: u64 = 10_000_000_000;

/// When this CPU last logged each warning (ns since boot). Not shared between agent
/// generations: each starts logging afresh.
#[map]
static WARNED_AT: PerCpuArray<u64> = PerCpuArray::with_max_entries(WARNINGS, 0);

#[inline(always)]
fn may_warn(warning: Warning) -> bool {
    let Some(warned_at) = WARNED_AT.get_ptr_mut(warning as u32) else { return false };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot, no concurrent writer.
    let last = unsafe { *warned_at };
    if last != 0 && now.wrapping_sub(last) < WARN_INTERVAL_NS {
        return false;
    }
    unsafe { *warned_at = now };
    true
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn is_loopback(ip_be: u32) -> bool {
    u32::from_be(ip_be) >> 24 == 127
}

#[cgroup_sock_addr(connect4)]
pub fn ferry_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let addr = unsafe { &mut *ctx.sock_addr };
    if let Some(pod_ip) = capturable(&ctx)
        && remember_destination(&ctx, addr.user_ip4, addr.user_port)
    {
        keep_pod_address(&ctx, pod_ip);
        addr.user_ip4 = LOOPBACK;
        addr.user_port = u32::from(OUTBOUND_PORT.to_be());
        count(Counter::Redirected);
    }
    ALLOW
}

/// An IPv6 socket connecting to an IPv4 address (`::ffff:a.b.c.d`) is an IPv4 connection on the
/// wire: captured like one, redirected to the same listener (`::ffff:127.0.0.1`). Connections to
/// IPv6 addresses are not meshed: they pass, counted and (rate-limited) logged, so that an
/// operator sees traffic leaving a meshed pod around the mesh.
#[cgroup_sock_addr(connect6)]
pub fn ferry_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let addr = unsafe { &mut *ctx.sock_addr };
    let dst = addr.user_ip6;
    let Some(pod_ip) = capturable(&ctx) else { return ALLOW };
    if dst[0] != 0 || dst[1] != 0 || dst[2] != V4_MAPPED {
        if dst == LOOPBACK6 {
            count(Counter::Passed);
        } else {
            ipv6_not_meshed(&ctx, dst, addr.user_port);
        }
        return ALLOW;
    }
    if remember_destination(&ctx, dst[3], addr.user_port) {
        keep_pod_address(&ctx, pod_ip);
        addr.user_ip6[3] = LOOPBACK;
        addr.user_port = u32::from(OUTBOUND_PORT.to_be());
        count(Counter::Redirected);
    }
    ALLOW
}

#[inline(always)]
fn ipv6_not_meshed(ctx: &SockAddrContext, dst: [u32; 4], user_port: u32) {
    count(Counter::OutboundIpv6Passed);
    if may_warn(Warning::Ipv6NotCaptured) {
        // SAFETY: four u32 in network byte order are the address's sixteen bytes.
        let address: [u8; 16] = unsafe { core::mem::transmute(dst) };
        let port = u16::from_be(user_port as u16);
        warn!(ctx, "connect6: connection to [{:i}]:{} not captured: IPv6 is not meshed", address, port);
    }
}

/// A TCP connect from a meshed pod by anything but the agent: the pod's IPv4 address (0 if
/// unknown).
#[inline(always)]
fn capturable(ctx: &SockAddrContext) -> Option<u32> {
    // SAFETY: the context pointer is valid for the program's run.
    let addr = unsafe { &*ctx.sock_addr };
    if addr.protocol != IPPROTO_TCP {
        count(Counter::Passed);
        return None;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(pod_ip) = (unsafe { MESHED_NETNS.get(&netns) }).copied() else {
        count(Counter::Passed);
        return None;
    };
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    if !sk.is_null() && unsafe { (*sk).mark } == AGENT_MARK {
        count(Counter::ExemptByMark);
        return None;
    }
    Some(pod_ip)
}

/// `struct sockaddr_in`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

/// `struct sockaddr_in6`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

/// Binds a socket about to be redirected to loopback to its pod's address (port 0: the port is
/// still chosen at connect), so that the app's own address (`getsockname()`) and the source of its
/// connection stay the pod's, as without capture. A socket the app bound itself is left alone.
#[inline(always)]
fn keep_pod_address(ctx: &SockAddrContext, pod_ip: u32) {
    if pod_ip == 0 {
        return;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let addr = unsafe { &*ctx.sock_addr };
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let (family, src_port, src_ip4, src_ip6) =
        unsafe { ((*sk).family, (*sk).src_port, (*sk).src_ip4, (*sk).src_ip6) };
    if src_port != 0 || src_ip4 != 0 || src_ip6 != [0; 4] {
        return;
    }
    let rc = if family == u32::from(AF_INET6) {
        let mut sa = SockaddrIn6 {
            family: AF_INET6,
            port: 0,
            flowinfo: 0,
            addr: [0, 0, V4_MAPPED, pod_ip],
            scope_id: 0,
        };
        unsafe { bpf_bind(ctx.sock_addr, (&raw mut sa).cast(), size_of::<SockaddrIn6>() as i32) }
    } else {
        let mut sa = SockaddrIn { family: AF_INET, port: 0, addr: pod_ip, zero: [0; 8] };
        unsafe { bpf_bind(ctx.sock_addr, (&raw mut sa).cast(), size_of::<SockaddrIn>() as i32) }
    };
    if rc != 0 {
        count(Counter::SourceBindFailed);
        if may_warn(Warning::SourceBindFailed) {
            warn!(ctx, "connect: cannot bind to the pod's address {:i} ({})", u32::from_be(pod_ip), rc);
        }
    }
}

/// Stores the IPv4 destination (both in network order, as the context holds them) under the
/// socket's cookie; false if it is not to be redirected (loopback, or the map is full).
#[inline(always)]
fn remember_destination(ctx: &SockAddrContext, dst_ip: u32, user_port: u32) -> bool {
    if is_loopback(dst_ip) {
        count(Counter::Passed);
        return false;
    }
    let dst = SockAddr::v4(dst_ip, u16::from_be(user_port as u16));
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_DST_BY_SOCKET.insert(&cookie, &dst, 0).is_err() {
        count(Counter::MapUpdateFailed);
        if may_warn(Warning::ConnectMapFull) {
            warn!(ctx, "connect: original-destination map full, connection not captured");
        }
        return false;
    }
    true
}

#[sock_ops]
pub fn ferry_sock_ops(ctx: SockOpsContext) -> u32 {
    // IPv6 sockets too: those connected to an IPv4 address were redirected by connect6.
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        record_established(&ctx);
    }
    0
}

#[inline(always)]
fn record_established(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(dst) = (unsafe { ORIG_DST_BY_SOCKET.get(&cookie) }).copied() else {
        if ctx.remote_ip4() == LOOPBACK && remote_port(ctx) == OUTBOUND_PORT {
            count(Counter::OrigDstMiss);
            if may_warn(Warning::OrigDstMissing) {
                warn!(ctx, "sock_ops: connection to the outbound listener without a stored destination");
            }
        }
        return;
    };
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // local_port is in host byte order.
    let key = ConnKey::new(netns, ctx.local_port() as u16);
    if ORIG_DST.insert(&key, &dst, 0).is_err() {
        count(Counter::MapUpdateFailed);
        if may_warn(Warning::OrigDstUpdateFailed) {
            warn!(ctx, "sock_ops: original-destination map update failed");
        }
    }
}

/// sock_ops `remote_port` is in network order; depending on the kernel in the low or high 16 bits.
#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u16 {
    let raw = ctx.remote_port();
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(be as u16)
}

#[cgroup_sock_addr(getpeername4)]
pub fn ferry_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(dst) = original_destination(&ctx) {
        let addr = unsafe { &mut *ctx.sock_addr };
        addr.user_ip4 = dst.ip[0];
        addr.user_port = u32::from(dst.port.to_be());
    }
    ALLOW
}

/// For an IPv6 socket that connect6 redirected: the IPv4 destination, mapped as it connected.
#[cgroup_sock_addr(getpeername6)]
pub fn ferry_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(dst) = original_destination(&ctx) {
        let addr = unsafe { &mut *ctx.sock_addr };
        addr.user_ip6 = [0, 0, V4_MAPPED, dst.ip[0]];
        addr.user_port = u32::from(dst.port.to_be());
    }
    ALLOW
}

#[inline(always)]
fn original_destination(ctx: &SockAddrContext) -> Option<SockAddr> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    unsafe { ORIG_DST_BY_SOCKET.get(&cookie) }.copied()
}

#[sk_lookup]
pub fn ferry_sk_lookup(ctx: SkLookupContext) -> u32 {
    steer_inbound(&ctx)
}

#[inline(always)]
fn steer_inbound(ctx: &SkLookupContext) -> u32 {
    // Copy the fields to the stack: map helpers reject pointers into the context.
    let lookup = unsafe { &*ctx.lookup };
    let (protocol, family) = (lookup.protocol, lookup.family);
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    if family == u32::from(AF_INET6) {
        return refuse_ipv6(ctx);
    }
    if family != u32::from(AF_INET) {
        return SK_PASS;
    }
    let local_port = lookup.local_port;
    let local_ip = lookup.local_ip4;
    let remote_ip = lookup.remote_ip4;
    let ifindex = lookup.ingress_ifindex;
    // Local traffic includes the agent's own delivery to the pod's IP, which reports the
    // ingress interface of eth0, not lo: match it by source address as well. Connections to
    // loopback (the app's, redirected to 15001 from the pod's address) are local too.
    let local = ifindex == 1 || remote_ip == local_ip || is_loopback(remote_ip) || is_loopback(local_ip);
    if local_port == u32::from(HBONE_PORT) || local {
        count(Counter::InboundPassed);
        return SK_PASS;
    }
    let key = IpKey::v4(local_ip);
    // REPLACE: while an upgrade overlaps two generations of this program, the later one selects
    // the same listener again instead of failing because the earlier one already did.
    match INBOUND_LISTENERS.redirect_sk_lookup(ctx, key, BPF_SK_LOOKUP_F_REPLACE as u64) {
        Ok(()) => {
            count(Counter::InboundSteered);
            SK_PASS
        }
        Err(_) if unsafe { FAIL_CLOSED_IPS.get(&key) }.is_some() => {
            // The agent is gone: policy could not be enforced, so nothing gets in.
            count(Counter::InboundDropped);
            SK_DROP
        }
        Err(_) => {
            count(Counter::InboundNoListener);
            if may_warn(Warning::NoListener) {
                warn!(ctx, "sk_lookup: no inbound listener for {:i}", u32::from_be(local_ip));
            }
            SK_PASS
        }
    }
}

/// The agent proxies and authorizes IPv4 only: a TCP connection into a meshed pod over IPv6
/// (a dual-stack cluster) would reach the app with no policy applied, so it is refused (a failed
/// lookup: the client gets a reset, and a dual-stack client falls back to IPv4 at once). Local
/// traffic passes, as for IPv4.
#[inline(always)]
fn refuse_ipv6(ctx: &SkLookupContext) -> u32 {
    let lookup = unsafe { &*ctx.lookup };
    let (local_ip, remote_ip) = (lookup.local_ip6, lookup.remote_ip6);
    if lookup.ingress_ifindex == 1 || remote_ip == local_ip || remote_ip == LOOPBACK6 {
        count(Counter::InboundPassed);
        return SK_PASS;
    }
    count(Counter::InboundIpv6Refused);
    if !may_warn(Warning::Ipv6Refused) {
        return SK_DROP;
    }
    // SAFETY: four u32 in network byte order are the address's sixteen bytes.
    let address: [u8; 16] = unsafe { core::mem::transmute(local_ip) };
    warn!(
        ctx,
        "sk_lookup: IPv6 connection to [{:i}]:{} refused: IPv6 is not meshed", address, lookup.local_port
    );
    SK_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
