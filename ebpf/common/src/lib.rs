//! Types shared by Ferry's eBPF programs and the user-space agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding so both sides agree byte for byte on map
//! keys and values. Addresses are stored IPv6-sized so IPv6 capture can reuse the same maps.
#![no_std]

/// `SO_MARK` carried by every socket the agent opens; capture lets these through untouched.
pub const AGENT_MARK: u32 = 0x539;
/// In each meshed pod's netns: where outbound connections are redirected (on 127.0.0.1).
pub const OUTBOUND_PORT: u16 = 15001;
/// In each meshed pod's netns: where inbound plaintext connections are steered.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// In each meshed pod's netns: the HBONE (mTLS tunnel) listener.
pub const HBONE_PORT: u16 = 15008;

/// Upper bound on meshed pods per node (size of the per-pod maps).
pub const MAX_MESHED_PODS: u32 = 4096;
/// Upper bound on connections whose original destination is remembered at once.
pub const MAX_TRACKED_CONNECTIONS: u32 = 65536;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Map names, as the eBPF object defines them.
pub mod maps {
    pub const MESHED_NETNS: &str = "MESHED_NETNS";
    pub const ORIG_DST_BY_SOCKET: &str = "ORIG_DST_BY_SOCKET";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    pub const POD_IPV6: &str = "POD_IPV6";
    pub const FAIL_CLOSED_IPS: &str = "FAIL_CLOSED_IPS";
    pub const COUNTERS: &str = "COUNTERS";
    /// The maps an agent pins so that the next agent (an upgrade, or a restart after a crash)
    /// shares them: programs of both generations see the same state.
    pub const SHARED: [&str; 7] =
        [MESHED_NETNS, POD_IPV6, ORIG_DST_BY_SOCKET, ORIG_DST, INBOUND_LISTENERS, FAIL_CLOSED_IPS, COUNTERS];
    /// Bumped whenever a shared map's key, value or size changes: agents of another layout use
    /// their own pins instead of misreading these. (2: `COUNTERS` got spare slots. Adding a map,
    /// as `POD_IPV6` was, needs no bump: an agent creates the pins it does not find.)
    pub const LAYOUT_VERSION: u32 = 2;
}

/// Program names, as the eBPF object defines them.
pub mod programs {
    pub const CONNECT4: &str = "ferry_connect4";
    pub const CONNECT6: &str = "ferry_connect6";
    pub const SOCK_OPS: &str = "ferry_sock_ops";
    pub const GETPEERNAME4: &str = "ferry_getpeername4";
    pub const GETPEERNAME6: &str = "ferry_getpeername6";
    pub const SK_LOOKUP: &str = "ferry_sk_lookup";
    /// The cgroup/sock_addr programs.
    pub const SOCK_ADDR: [&str; 4] = [GETPEERNAME4, GETPEERNAME6, CONNECT4, CONNECT6];
    /// Every program, in the order they are attached to a pod: the connects last, since once they
    /// run connections are redirected and need everything before them.
    pub const ALL: [&str; 6] = [SK_LOOKUP, GETPEERNAME4, GETPEERNAME6, SOCK_OPS, CONNECT4, CONNECT6];
}

/// An IPv6 address's sixteen bytes as the kernel stores them in eBPF contexts and in these
/// maps: four words, each in network byte order.
pub const fn ipv6_words(octets: [u8; 16]) -> [u32; 4] {
    // SAFETY: sixteen bytes either way, in the same order; every bit pattern is valid.
    unsafe { core::mem::transmute(octets) }
}

/// The inverse of [`ipv6_words`].
pub const fn ipv6_octets(words: [u32; 4]) -> [u8; 16] {
    // SAFETY: as for `ipv6_words`.
    unsafe { core::mem::transmute(words) }
}

/// An IP address and port. `ip` holds the address in network byte order (IPv4 in `ip[0]`);
/// `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub ip: [u32; 4],
    pub port: u16,
    pub family: u16,
}

impl SockAddr {
    /// `ip` in network byte order, as the kernel hands it over; `port` in host order.
    pub const fn v4(ip: u32, port: u16) -> Self {
        Self { ip: [ip, 0, 0, 0], port, family: AF_INET }
    }

    /// `ip` as the kernel stores it: four words in network byte order.
    pub const fn v6(ip: [u32; 4], port: u16) -> Self {
        Self { ip, port, family: AF_INET6 }
    }
}

/// Key of an IP address (the SOCKHASH of inbound listeners is keyed by pod IP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub ip: [u32; 4],
    pub family: u32,
}

impl IpKey {
    pub const fn v4(ip: u32) -> Self {
        Self { ip: [ip, 0, 0, 0], family: AF_INET as u32 }
    }

    /// `ip` as the kernel stores it: four words in network byte order.
    pub const fn v6(ip: [u32; 4]) -> Self {
        Self { ip, family: AF_INET6 as u32 }
    }
}

/// Identifies a redirected connection as the agent sees it on accept: the pod's netns, the
/// app's local (ephemeral) port, which is the peer port of the accepted socket, and which of the
/// pod's outbound listeners it reached (an IPv4 and an IPv6 connection may share a port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub port: u16,
    /// 1 for the IPv6 listener (`[::1]:15001`). 0 for IPv4, as agents before IPv6 left the
    /// padding, so that both generations find each other's entries during an upgrade.
    pub ipv6: u8,
    pub _pad: [u8; 5],
}

impl ConnKey {
    pub const fn new(netns_cookie: u64, port: u16, ipv6: bool) -> Self {
        Self { netns_cookie, port, ipv6: ipv6 as u8, _pad: [0; 5] }
    }
}

/// Slots of the `COUNTERS` array: more than there are counters, so that a new counter does not
/// change the shared map's size (and with it the layout version).
pub const COUNTER_SLOTS: u32 = 32;

/// Per-CPU event counters, indexes into the `COUNTERS` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Outbound connects rewritten to the pod's outbound listener.
    Redirected = 0,
    /// Connects left alone: not TCP, not a meshed netns, or to loopback.
    Passed = 1,
    /// Connects left alone because the socket carries the agent's mark.
    ExemptByMark = 2,
    /// A redirected connection reached the outbound listener without a stored destination.
    OrigDstMiss = 3,
    /// Inbound connections steered to the pod's plaintext listener.
    InboundSteered = 4,
    /// Inbound lookups left alone: HBONE port or local traffic.
    InboundPassed = 5,
    /// Inbound lookups for an address with no registered listener.
    InboundNoListener = 6,
    /// A map update failed in the kernel (the connection went through uncaptured).
    MapUpdateFailed = 7,
    /// Inbound connections dropped because the pod is fail-closed and its listener is gone.
    InboundDropped = 8,
    /// Inbound IPv6 connections to an address of the pod the agent has no listener for (it does
    /// not know the address): refused, so that policy is not bypassed over IPv6.
    InboundIpv6Refused = 9,
    /// A redirected socket could not be bound to its pod's address: it is captured, but the app
    /// sees loopback as its own address.
    SourceBindFailed = 10,
    /// A TCP connect to an IPv6 address from a meshed pod that has no IPv6 address of its own,
    /// left alone (uncaptured).
    OutboundIpv6Passed = 11,
    /// A TCP connect to an IPv4 address from a meshed pod that has no IPv4 address of its own (an
    /// IPv6-only pod), left alone (uncaptured).
    OutboundIpv4Passed = 12,
}

const _: () = assert!(Counter::COUNT <= COUNTER_SLOTS);

impl Counter {
    pub const COUNT: u32 = 13;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Redirected,
        Counter::Passed,
        Counter::ExemptByMark,
        Counter::OrigDstMiss,
        Counter::InboundSteered,
        Counter::InboundPassed,
        Counter::InboundNoListener,
        Counter::MapUpdateFailed,
        Counter::InboundDropped,
        Counter::InboundIpv6Refused,
        Counter::SourceBindFailed,
        Counter::OutboundIpv6Passed,
        Counter::OutboundIpv4Passed,
    ];

    /// Stable snake_case name, used in metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::Passed => "passed",
            Counter::ExemptByMark => "exempt_by_mark",
            Counter::OrigDstMiss => "orig_dst_miss",
            Counter::InboundSteered => "inbound_steered",
            Counter::InboundPassed => "inbound_passed",
            Counter::InboundNoListener => "inbound_no_listener",
            Counter::MapUpdateFailed => "map_update_failed",
            Counter::InboundDropped => "inbound_dropped",
            Counter::InboundIpv6Refused => "inbound_ipv6_refused",
            Counter::SourceBindFailed => "source_bind_failed",
            Counter::OutboundIpv6Passed => "outbound_ipv6_passed",
            Counter::OutboundIpv4Passed => "outbound_ipv4_passed",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::ConnKey {}
}
