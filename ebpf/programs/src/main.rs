//! Ferry's eBPF programs: in-pod, socket-level capture (see docs/architecture.md).
//!
//! - `ferry_connect4` (cgroup/connect4): rewrites a meshed pod's outbound TCP connect to the pod's
//!   outbound listener and remembers the original destination under the socket cookie.
//! - `ferry_connect6` (cgroup/connect6): the same for IPv6 sockets: to the IPv6 listener for IPv6
//!   destinations, and like IPv4 for IPv4 ones (`::ffff:a.b.c.d`, as Java and .NET dual-stack
//!   sockets connect), which connect4 never sees.
//! - `ferry_sock_ops` (sockops): when that connection is established, re-keys the destination by
//!   (netns cookie, client port), which is what the agent knows after `accept()`.
//! - `ferry_getpeername4`, `ferry_getpeername6`: the app's `getpeername()` sees the original
//!   destination.
//! - `ferry_sk_lookup` (sk_lookup, per pod netns): steers inbound connections to the pod's plaintext
//!   listener of their address family.
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
    MAX_TRACKED_CONNECTIONS, OUTBOUND_PORT, SockAddr, ipv6_octets,
};

const IPPROTO_TCP: u32 = 6;
/// cgroup/connect4 and getpeername4 verdict: let the call proceed.
const ALLOW: i32 = 1;
/// 127.0.0.1 as the kernel stores it (network byte order).
const LOOPBACK: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 as the kernel stores it.
const LOOPBACK6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// The first word of a link-local address, fe80::/10, and its mask.
const LINK_LOCAL6: (u32, u32) =
    (u32::from_ne_bytes([0xfe, 0x80, 0, 0]), u32::from_ne_bytes([0xff, 0xc0, 0, 0]));
/// The third word of an IPv4-mapped IPv6 address, `::ffff:a.b.c.d` (the fourth is the IPv4 one).
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Netns cookies of meshed pods; the value is the pod's IPv4 address (network order, 0 if it has
/// none), which redirected sockets are bound to.
#[map]
static MESHED_NETNS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_MESHED_PODS, 0);

/// The IPv6 address of meshed pods that have one, by netns cookie: their IPv6 connections are
/// captured (and bound to it); other pods' pass.
#[map]
static POD_IPV6: HashMap<u64, [u32; 4]> = HashMap::with_max_entries(MAX_MESHED_PODS, 0);

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
    Ipv4NotCaptured,
}
const WARNINGS: u32 = Warning::Ipv4NotCaptured as u32 + 1;
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
    if let Some(pod) = capturable(&ctx)
        && remember_ipv4_destination(&ctx, &pod, addr.user_ip4, port_of(addr.user_port))
    {
        keep_pod_address(&ctx, Source::V4(pod.ipv4));
        addr.user_ip4 = LOOPBACK;
        redirected(addr);
    }
    ALLOW
}

/// An IPv6 socket connecting to an IPv6 address is redirected to the pod's IPv6 listener
/// (`[::1]:15001`), if the pod has an IPv6 address (otherwise it passes, counted and, rate-limited,
/// logged, so that an operator sees traffic leaving a meshed pod around the mesh). One connecting
/// to an IPv4 address (`::ffff:a.b.c.d`) is an IPv4 connection on the wire: captured like one,
/// redirected to the IPv4 listener (`::ffff:127.0.0.1`).
#[cgroup_sock_addr(connect6)]
pub fn ferry_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let addr = unsafe { &mut *ctx.sock_addr };
    let dst = addr.user_ip6;
    let Some(pod) = capturable(&ctx) else { return ALLOW };
    let port = port_of(addr.user_port);
    if dst[0] == 0 && dst[1] == 0 && dst[2] == V4_MAPPED {
        if remember_ipv4_destination(&ctx, &pod, dst[3], port) {
            keep_pod_address(&ctx, Source::Mapped(pod.ipv4));
            addr.user_ip6[3] = LOOPBACK;
            redirected(addr);
        }
        return ALLOW;
    }
    if dst == LOOPBACK6 || dst[0] & LINK_LOCAL6.1 == LINK_LOCAL6.0 {
        // Loopback, or a link-local address, which only means something with its interface.
        count(Counter::Passed);
        return ALLOW;
    }
    let Some(pod_ip6) = (unsafe { POD_IPV6.get(&pod.netns) }).copied() else {
        ipv6_not_meshed(&ctx, dst, port);
        return ALLOW;
    };
    if remember_destination(&ctx, SockAddr::v6(dst, port)) {
        keep_pod_address(&ctx, Source::V6(pod_ip6));
        // Word by word, straight from the context pointer: the verifier refuses a copy through a
        // pointer into the context.
        for (i, word) in LOOPBACK6.into_iter().enumerate() {
            unsafe { core::ptr::write_volatile(&raw mut addr.user_ip6[i], word) };
        }
        redirected(addr);
    }
    ALLOW
}

/// Points the connect at the outbound listener (whose address the caller set).
#[inline(always)]
fn redirected(addr: &mut aya_ebpf::bindings::bpf_sock_addr) {
    addr.user_port = u32::from(OUTBOUND_PORT.to_be());
    count(Counter::Redirected);
}

/// The context's `user_port` (network order in the low 16 bits) in host order.
#[inline(always)]
fn port_of(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

#[inline(always)]
fn ipv6_not_meshed(ctx: &SockAddrContext, dst: [u32; 4], port: u16) {
    count(Counter::OutboundIpv6Passed);
    if may_warn(Warning::Ipv6NotCaptured) {
        warn!(
            ctx,
            "connect6: connection to [{:i}]:{} not captured: the pod has no IPv6 address",
            ipv6_octets(dst),
            port
        );
    }
}

/// A meshed pod, as its connects see it.
struct Pod {
    netns: u64,
    /// Its IPv4 address, network order; 0 if it has none.
    ipv4: u32,
}

/// A TCP connect from a meshed pod by anything but the agent.
#[inline(always)]
fn capturable(ctx: &SockAddrContext) -> Option<Pod> {
    // SAFETY: the context pointer is valid for the program's run.
    let addr = unsafe { &*ctx.sock_addr };
    if addr.protocol != IPPROTO_TCP {
        count(Counter::Passed);
        return None;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(ipv4) = (unsafe { MESHED_NETNS.get(&netns) }).copied() else {
        count(Counter::Passed);
        return None;
    };
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    if !sk.is_null() && unsafe { (*sk).mark } == AGENT_MARK {
        count(Counter::ExemptByMark);
        return None;
    }
    Some(Pod { netns, ipv4 })
}

/// The pod address a redirected socket is bound to: IPv4, IPv4 on an IPv6 socket
/// (`::ffff:a.b.c.d`), or IPv6, each in network order.
enum Source {
    V4(u32),
    Mapped(u32),
    V6([u32; 4]),
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
fn keep_pod_address(ctx: &SockAddrContext, source: Source) {
    // SAFETY: the context pointer is valid for the program's run.
    let addr = unsafe { &*ctx.sock_addr };
    let sk = unsafe { addr.__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let (src_port, src_ip4, src_ip6) = unsafe { ((*sk).src_port, (*sk).src_ip4, (*sk).src_ip6) };
    if src_port != 0 || src_ip4 != 0 || src_ip6 != [0; 4] {
        return;
    }
    let bind6 = |ip: [u32; 4]| {
        let mut sa = SockaddrIn6 { family: AF_INET6, port: 0, flowinfo: 0, addr: ip, scope_id: 0 };
        unsafe { bpf_bind(ctx.sock_addr, (&raw mut sa).cast(), size_of::<SockaddrIn6>() as i32) }
    };
    let rc = match source {
        Source::V4(ip) => {
            let mut sa = SockaddrIn { family: AF_INET, port: 0, addr: ip, zero: [0; 8] };
            unsafe { bpf_bind(ctx.sock_addr, (&raw mut sa).cast(), size_of::<SockaddrIn>() as i32) }
        }
        Source::Mapped(ip) => bind6([0, 0, V4_MAPPED, ip]),
        Source::V6(ip) => bind6(ip),
    };
    if rc != 0 {
        count(Counter::SourceBindFailed);
        if may_warn(Warning::SourceBindFailed) {
            warn!(ctx, "connect: cannot bind to the pod's address ({})", rc);
        }
    }
}

/// An IPv4 destination: loopback passes, and so does any destination of a pod that has no IPv4
/// address (counted and, rate-limited, logged, like IPv6 from a pod without an IPv6 address: the
/// connect fails or succeeds as it would unmeshed); others are remembered, as
/// [`remember_destination`].
#[inline(always)]
fn remember_ipv4_destination(ctx: &SockAddrContext, pod: &Pod, ip: u32, port: u16) -> bool {
    if is_loopback(ip) {
        count(Counter::Passed);
        return false;
    }
    if pod.ipv4 == 0 {
        count(Counter::OutboundIpv4Passed);
        if may_warn(Warning::Ipv4NotCaptured) {
            warn!(
                ctx,
                "connect: connection to {:i}:{} not captured: the pod has no IPv4 address",
                u32::from_be(ip),
                port
            );
        }
        return false;
    }
    remember_destination(ctx, SockAddr::v4(ip, port))
}

/// Stores the destination under the socket's cookie; false if the map is full (the connection
/// then goes out uncaptured).
#[inline(always)]
fn remember_destination(ctx: &SockAddrContext, dst: SockAddr) -> bool {
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
        let to_listener = ctx.remote_ip4() == LOOPBACK || remote_ip6(ctx) == LOOPBACK6;
        if to_listener && remote_port(ctx) == OUTBOUND_PORT {
            count(Counter::OrigDstMiss);
            if may_warn(Warning::OrigDstMissing) {
                warn!(ctx, "sock_ops: connection to the outbound listener without a stored destination");
            }
        }
        return;
    };
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // local_port is in host byte order. connect6 sent IPv6 destinations to the IPv6 listener.
    let key = ConnKey::new(netns, ctx.local_port() as u16, dst.family == AF_INET6);
    if ORIG_DST.insert(&key, &dst, 0).is_err() {
        count(Counter::MapUpdateFailed);
        if may_warn(Warning::OrigDstUpdateFailed) {
            warn!(ctx, "sock_ops: original-destination map update failed");
        }
    }
}

/// sock_ops `remote_ip6`, read word by word: the verifier refuses wider reads of it.
#[inline(always)]
fn remote_ip6(ctx: &SockOpsContext) -> [u32; 4] {
    // SAFETY: the context pointer is valid for the program's run.
    let ops = unsafe { &*ctx.ops };
    core::array::from_fn(|i| unsafe { core::ptr::read_volatile(&raw const ops.remote_ip6[i]) })
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

/// For an IPv6 socket that connect6 redirected: its IPv6 destination, or its IPv4 one mapped as
/// it connected.
#[cgroup_sock_addr(getpeername6)]
pub fn ferry_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(dst) = original_destination(&ctx) {
        let addr = unsafe { &mut *ctx.sock_addr };
        addr.user_ip6 = if dst.family == AF_INET6 { dst.ip } else { [0, 0, V4_MAPPED, dst.ip[0]] };
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
    let (protocol, family, ifindex) = (lookup.protocol, lookup.family, lookup.ingress_ifindex);
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // Local traffic includes the agent's own delivery to the pod's IP, which reports the
    // ingress interface of eth0, not lo: match it by source address as well. Connections to
    // loopback (the app's, redirected to 15001 from the pod's address) are local too.
    let (key, local) = if family == u32::from(AF_INET) {
        let (local_ip, remote_ip) = (lookup.local_ip4, lookup.remote_ip4);
        (IpKey::v4(local_ip), remote_ip == local_ip || is_loopback(remote_ip) || is_loopback(local_ip))
    } else if family == u32::from(AF_INET6) {
        let (local_ip, remote_ip) = (lookup.local_ip6, lookup.remote_ip6);
        (IpKey::v6(local_ip), remote_ip == local_ip || remote_ip == LOOPBACK6 || local_ip == LOOPBACK6)
    } else {
        return SK_PASS;
    };
    if lookup.local_port == u32::from(HBONE_PORT) || ifindex == 1 || local {
        count(Counter::InboundPassed);
        return SK_PASS;
    }
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
        Err(_) if key.family == u32::from(AF_INET6) => refuse_ipv6(ctx, key.ip),
        Err(_) => {
            count(Counter::InboundNoListener);
            if may_warn(Warning::NoListener) {
                warn!(ctx, "sk_lookup: no inbound listener for {:i}", u32::from_be(key.ip[0]));
            }
            SK_PASS
        }
    }
}

/// An IPv6 address of a meshed pod with no listener is one the agent does not know (a static
/// config that lists only the pod's IPv4 address): refused (a failed lookup, so the client gets a
/// reset and a dual-stack one falls back to IPv4 at once) rather than let past policy.
#[inline(always)]
fn refuse_ipv6(ctx: &SkLookupContext, local_ip: [u32; 4]) -> u32 {
    count(Counter::InboundIpv6Refused);
    if may_warn(Warning::Ipv6Refused) {
        let port = unsafe { (*ctx.lookup).local_port };
        warn!(
            ctx,
            "sk_lookup: IPv6 connection to [{:i}]:{} refused: the agent does not know this address of the pod",
            ipv6_octets(local_ip),
            port
        );
    }
    SK_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
