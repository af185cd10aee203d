//! The netlink socket: the only code in this crate that calls into the C library.
//!
//! Every other module builds and parses bytes; this one owns the file descriptor and performs
//! the handful of syscalls a netlink socket needs (socket, bind, setsockopt, getsockopt,
//! sendto, recv). Each `unsafe` block is a single syscall on memory owned by the caller.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// How many interruptions in a row one `recv` takes up again before it reports one.
const MAX_INTERRUPTIONS: u32 = 1000;

/// A raw `NETLINK_NETFILTER` socket bound to a kernel-assigned port id.
#[derive(Debug)]
pub(crate) struct NetlinkSocket {
    fd: OwnedFd,
}

impl NetlinkSocket {
    /// Opens a netfilter netlink socket in the calling thread's network namespace.
    pub(crate) fn open() -> io::Result<Self> {
        // SAFETY: socket(2) takes no pointers; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value (port 0: let the
        // kernel choose, no multicast groups).
        let mut addr: libc::sockaddr_nl = unsafe { zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl and the length passed is its exact size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = NetlinkSocket { fd };
        // Extended acks give the kernel's error text and the offset of the attribute it refused;
        // capped acks keep an error from echoing a whole 60 KiB element message back to us.
        // Both are optional: old kernels simply do not send the extra information.
        let _ = socket.set_int(libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1);
        let _ = socket.set_int(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
        Ok(socket)
    }

    fn set_int(&self, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
        // SAFETY: the option value points to a live c_int and the length is its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&raw const value).cast::<libc::c_void>(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn get_int(&self, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `value` and `len` are valid for writes and `len` holds the buffer size.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&raw mut value).cast::<libc::c_void>(),
                &raw mut len,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(value)
        }
    }

    /// Raises the send and receive buffers (forcing past the sysctl limits when we hold
    /// CAP_NET_ADMIN) and returns the send buffer the kernel actually granted, in bytes.
    pub(crate) fn set_buffers(&self, send: usize, recv: usize) -> io::Result<usize> {
        let send = libc::c_int::try_from(send).unwrap_or(libc::c_int::MAX / 2);
        let recv = libc::c_int::try_from(recv).unwrap_or(libc::c_int::MAX / 2);
        if self
            .set_int(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, send)
            .is_err()
        {
            self.set_int(libc::SOL_SOCKET, libc::SO_SNDBUF, send)?;
        }
        if self
            .set_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, recv)
            .is_err()
        {
            self.set_int(libc::SOL_SOCKET, libc::SO_RCVBUF, recv)?;
        }
        let granted = self.get_int(libc::SOL_SOCKET, libc::SO_SNDBUF)?;
        Ok(usize::try_from(granted).unwrap_or(0))
    }

    /// Bounds how long `recv` blocks; `None` blocks forever.
    pub(crate) fn set_recv_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = match timeout {
            Some(t) => {
                let mut micros = t.subsec_micros();
                // Never 0/0 for a Some: that would mean "block forever".
                if t.as_secs() == 0 && micros == 0 {
                    micros = 1;
                }
                libc::timeval {
                    tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
                    tv_usec: libc::suseconds_t::from(micros),
                }
            }
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        // SAFETY: the option value points to a live timeval and the length is its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast::<libc::c_void>(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Sends one datagram (a whole batch) to the kernel in a single sendto.
    pub(crate) fn send(&self, buf: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_nl is plain old data; all-zero addresses the kernel (port 0).
        let mut kernel: libc::sockaddr_nl = unsafe { zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes and `kernel` is a valid
        // sockaddr_nl of the given size.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast::<libc::c_void>(),
                buf.len(),
                0,
                (&raw const kernel).cast::<libc::sockaddr>(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        if usize::try_from(sent).ok() != Some(buf.len()) {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "netlink datagram sent in part",
            ));
        }
        Ok(())
    }

    /// Receives one datagram. `nonblocking` returns `WouldBlock` instead of waiting. A datagram
    /// larger than `buf` is an error (MSG_TRUNC reports its real size), never a silent cut.
    ///
    /// A wait interrupted by a signal is taken up again: a socket with a receive timeout is
    /// never restarted by the kernel, and a stop and continue of the process (SIGSTOP, SIGCONT)
    /// interrupts it even without a handler. Nothing is lost: the datagram stays queued.
    pub(crate) fn recv(&self, buf: &mut [u8], nonblocking: bool) -> io::Result<usize> {
        let mut interrupted = 0;
        loop {
            match self.recv_once(buf, nonblocking) {
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        && interrupted < MAX_INTERRUPTIONS =>
                {
                    interrupted += 1;
                }
                other => return other,
            }
        }
    }

    fn recv_once(&self, buf: &mut [u8], nonblocking: bool) -> io::Result<usize> {
        let flags = libc::MSG_TRUNC | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let got = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast::<libc::c_void>(),
                buf.len(),
                flags,
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = usize::try_from(got).unwrap_or(0);
        if got > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "netlink datagram of {got} bytes exceeds the {} byte buffer",
                    buf.len()
                ),
            ));
        }
        Ok(got)
    }
}
