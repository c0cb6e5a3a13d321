//! A packet capture on one interface of a sandbox netns (AF_PACKET), to check what crosses the
//! underlay.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Result, bail};

use crate::Netns;

/// One TCP segment seen on the wire.
#[derive(Debug, Clone)]
pub struct Segment {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: Vec<u8>,
}

pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Segment>>>,
}

const ETH_P_ALL: u16 = 0x0003;

impl Capture {
    /// Starts capturing every frame on `interface` inside `netns`.
    pub fn start(netns: &Netns, interface: &str) -> Result<Capture> {
        let file = File::open(netns.path())?;
        let interface = std::ffi::CString::new(interface)?;
        // The socket is made on a thread inside the netns; it keeps that netns.
        let socket = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<OwnedFd> {
                // SAFETY: plain syscalls; only this thread changes netns.
                unsafe {
                    if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(ETH_P_ALL.to_be()));
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let fd = OwnedFd::from_raw_fd(fd);
                    let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                    addr.sll_family = libc::AF_PACKET as u16;
                    addr.sll_protocol = ETH_P_ALL.to_be();
                    addr.sll_ifindex = libc::if_nametoindex(interface.as_ptr()) as i32;
                    if addr.sll_ifindex == 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                    if libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let timeout = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
                    let tlen = size_of::<libc::timeval>() as libc::socklen_t;
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        (&raw const timeout).cast(),
                        tlen,
                    );
                    Ok(fd)
                }
            })
            .join()
            .expect("capture thread panicked")
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut segments = Vec::new();
            let mut frame = vec![0u8; 65536];
            while !flag.load(Ordering::Acquire) {
                // SAFETY: reading into a buffer of the given size.
                let n = unsafe { libc::recv(socket.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len(), 0) };
                if n > 0
                    && let Some(segment) = parse(&frame[..n as usize])
                {
                    segments.push(segment);
                }
            }
            segments
        });
        Ok(Capture { stop, thread: Some(thread) })
    }

    /// Stops and returns the TCP segments seen (outgoing frames appear once; the peer's once).
    pub fn finish(mut self) -> Result<Vec<Segment>> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(segments)) => Ok(segments),
            _ => bail!("capture thread failed"),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Ethernet + IPv4 + TCP; anything else is skipped.
fn parse(frame: &[u8]) -> Option<Segment> {
    let ip = frame.get(14..)?;
    if u16::from_be_bytes([frame[12], frame[13]]) != 0x0800 || ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let tcp = ip.get(ihl..total)?;
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    Some(Segment {
        src: SocketAddrV4::new(src, u16::from_be_bytes([tcp[0], tcp[1]])),
        dst: SocketAddrV4::new(dst, u16::from_be_bytes([tcp[2], tcp[3]])),
        payload: tcp.get(data_offset..)?.to_vec(),
    })
}
