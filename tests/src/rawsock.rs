//! AF_PACKET sockets that send hand-built frames and count what arrives, plus small UDP helpers.
//!
//! A socket belongs to the network namespace of the thread that creates it, so create these
//! with [`RawSender::open`] / [`RawReceiver::open`] (which go through [`Netns::run`]) or call
//! `new` inside `Netns::run` yourself; afterwards they can be used from any thread.
//!
//! An AF_PACKET receiver on the interface an XDP program is attached to sees a frame only if
//! XDP returned `XDP_PASS`: packet taps run in `__netif_receive_skb_core`, after the XDP hook.
//! Counting on the server side therefore measures what the data path admitted.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::netns::Netns;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// Index of `ifname` in the calling thread's network namespace.
pub fn ifindex(ifname: &str) -> io::Result<u32> {
    let name = CString::new(ifname).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if idx == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {ifname} in this thread's namespace: {}", io::Error::last_os_error()),
        ));
    }
    Ok(idx)
}

/// Opens an AF_PACKET raw socket bound to `ifindex` for `protocol` (host order; 0 = receive
/// nothing, for send-only sockets).
fn packet_socket(ifindex: u32, protocol: u16, rcvbuf: Option<i32>) -> io::Result<OwnedFd> {
    // Created with protocol 0 so it sees no traffic until bind() has restricted it to one
    // interface; a socket created with ETH_P_ALL would queue frames from every interface.
    // SAFETY: plain socket(2) call; the fd is owned right after.
    let fd = cvt(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(bytes) = rcvbuf {
        // SO_RCVBUFFORCE ignores rmem_max (needs CAP_NET_ADMIN); fall back to SO_RCVBUF.
        if setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes).is_err() {
            setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, bytes)?;
        }
        // Our own transmissions are not arrivals; older kernels lack this (pkttype filters too).
        let _ = setsockopt_int(fd.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid starting value.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll and the length matches it.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast::<libc::sockaddr>(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a live c_int and the length matches it.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast::<libc::c_void>(),
            size_of::<i32>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Sends complete Ethernet frames (any source MAC and address, i.e. spoofing is fine) out of
/// one interface.
#[derive(Debug)]
pub struct RawSender {
    fd: OwnedFd,
    ifindex: u32,
}

impl RawSender {
    /// Opens a sender on `ifname` in the calling thread's namespace.
    pub fn new(ifname: &str) -> io::Result<RawSender> {
        let ifindex = ifindex(ifname)?;
        Ok(RawSender { fd: packet_socket(ifindex, 0, None)?, ifindex })
    }

    /// Opens a sender on `ifname` inside `ns`.
    pub fn open(ns: &Netns, ifname: &str) -> io::Result<RawSender> {
        ns.run(|| Self::new(ifname))
    }

    /// The interface index the socket is bound to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Sends one frame (at least 14 bytes; at most the MTU plus the Ethernet header).
    /// Retries briefly (at most ~1 s) while the device queue reports `ENOBUFS`.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            // SAFETY: `frame` is a live buffer of the given length.
            let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n >= 0 {
                if n as usize != frame.len() {
                    return Err(io::Error::other(format!("short send: {n} of {} bytes", frame.len())));
                }
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOBUFS) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            return Err(err);
        }
    }

    /// Sends every frame in order; stops at the first error.
    pub fn send_all<'a>(&self, frames: impl IntoIterator<Item = &'a [u8]>) -> io::Result<usize> {
        let mut n = 0;
        for f in frames {
            self.send(f)?;
            n += 1;
        }
        Ok(n)
    }
}

/// A frame a [`RawReceiver`] got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub data: Vec<u8>,
    /// `PACKET_HOST`, `PACKET_BROADCAST`, `PACKET_MULTICAST` or `PACKET_OTHERHOST` (frames to
    /// another MAC: XDP saw them, the IP stack will drop them).
    pub pkttype: u8,
}

/// Receives the frames arriving on one interface (never the ones it sends).
#[derive(Debug)]
pub struct RawReceiver {
    fd: OwnedFd,
    ifindex: u32,
}

/// Receive buffer of a [`RawReceiver`]: room for tens of thousands of small frames, so a
/// burst is not lost before the test reads it.
pub const RECEIVER_BUFFER: i32 = 32 << 20;

impl RawReceiver {
    /// Opens a receiver for all protocols on `ifname` in the calling thread's namespace.
    pub fn new(ifname: &str) -> io::Result<RawReceiver> {
        let ifindex = ifindex(ifname)?;
        let fd = packet_socket(ifindex, libc::ETH_P_ALL as u16, Some(RECEIVER_BUFFER))?;
        Ok(RawReceiver { fd, ifindex })
    }

    /// Opens a receiver on `ifname` inside `ns`. Open it before sending: it sees only frames
    /// that arrive after it is bound.
    pub fn open(ns: &Netns, ifname: &str) -> io::Result<RawReceiver> {
        ns.run(|| Self::new(ifname))
    }

    /// The interface index the socket is bound to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The next incoming frame, or `None` if none arrives within `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> io::Result<Option<Frame>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // Round up so a sub-millisecond remainder still waits instead of spinning.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&raw mut pfd, 1, ms) };
            if ready < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if ready == 0 {
                return Ok(None);
            }
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `sll` are live, writable and their lengths are passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut sll).cast::<libc::sockaddr>(),
                    &raw mut len,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
                    continue;
                }
                return Err(err);
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(Frame { data: buf[..n as usize].to_vec(), pkttype: sll.sll_pkttype }));
        }
    }

    /// Counts incoming frames matching `pred` until `deadline` (it always waits that long,
    /// so frames that should *not* arrive get their chance to).
    pub fn count_matching(&self, deadline: Instant, mut pred: impl FnMut(&[u8]) -> bool) -> io::Result<usize> {
        let mut n = 0;
        while let Some(f) = self.recv_timeout(deadline.saturating_duration_since(Instant::now()))? {
            n += usize::from(pred(&f.data));
        }
        Ok(n)
    }

    /// Counts frames matching `pred` until `expected` have arrived or `deadline` passes,
    /// whichever is first; returns the count.
    pub fn wait_for(
        &self,
        expected: usize,
        deadline: Instant,
        mut pred: impl FnMut(&[u8]) -> bool,
    ) -> io::Result<usize> {
        let mut n = 0;
        while n < expected {
            match self.recv_timeout(deadline.saturating_duration_since(Instant::now()))? {
                Some(f) => n += usize::from(pred(&f.data)),
                None => break,
            }
        }
        Ok(n)
    }

    /// Collects the frames matching `pred` that arrive until `deadline`.
    pub fn collect_matching(&self, deadline: Instant, mut pred: impl FnMut(&[u8]) -> bool) -> io::Result<Vec<Frame>> {
        let mut out = Vec::new();
        while let Some(f) = self.recv_timeout(deadline.saturating_duration_since(Instant::now()))? {
            if pred(&f.data) {
                out.push(f);
            }
        }
        Ok(out)
    }

    /// Discards everything queued now; returns how many frames that was.
    pub fn drain(&self) -> io::Result<usize> {
        let mut n = 0;
        while self.recv_timeout(Duration::ZERO)?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    /// Frames the kernel dropped for this socket (full receive buffer) since the last call.
    /// A test that counts arrivals should check this is 0, so a shortfall is the data path's
    /// doing and not the harness's.
    pub fn drops(&self) -> io::Result<u32> {
        // SAFETY: tpacket_stats is plain data.
        let mut st: libc::tpacket_stats = unsafe { zeroed() };
        let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: `st` is live and writable and its length is passed.
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&raw mut st).cast::<libc::c_void>(),
                &raw mut len,
            )
        })?;
        Ok(st.tp_drops)
    }
}

/// A UDP socket bound to `addr` inside `ns` (for traffic that needs no spoofing).
pub fn udp_socket(ns: &Netns, addr: SocketAddr) -> io::Result<UdpSocket> {
    ns.run(|| UdpSocket::bind(addr))
}

/// Counts datagrams on `sock` whose payload matches `pred` until `deadline`.
pub fn udp_count(sock: &UdpSocket, deadline: Instant, mut pred: impl FnMut(&[u8]) -> bool) -> io::Result<usize> {
    let mut buf = vec![0u8; 65536];
    let mut n = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(n);
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv(&mut buf) {
            Ok(len) => n += usize::from(pred(&buf[..len])),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
