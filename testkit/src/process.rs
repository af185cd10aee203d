//! A daemon run by a test as a child process: killed and reaped when dropped (also when the
//! test panics), signalled by name, waited for with a bound.

use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How often waits look again.
const POLL: Duration = Duration::from_millis(20);

/// A child process, killed (SIGKILL) and reaped when dropped.
///
/// ```
/// use std::time::Duration;
/// let mut child = fwnp_testkit::process::ProcessGuard::spawn(&mut std::process::Command::new("true"))
///     .expect("start");
/// assert!(child.wait_exit(Duration::from_secs(5)).is_some_and(|status| status.success()));
/// ```
#[derive(Debug)]
pub struct ProcessGuard(pub Option<Child>);

impl ProcessGuard {
    /// Starts `command`.
    pub fn spawn(command: &mut Command) -> std::io::Result<Self> {
        command.spawn().map(|child| ProcessGuard(Some(child)))
    }

    /// Kills and reaps it now.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends the signal `name` (`TERM`, `HUP`...) with `kill(1)`; panics if it cannot be sent.
    pub fn signal(&self, name: &str) {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Sends SIGTERM and waits (bounded by `within`) for the process to exit; kills it if it
    /// does not.
    pub fn terminate(&mut self, within: Duration) {
        if self.0.is_some() {
            self.signal("TERM");
            if self.wait_exit(within).is_none() {
                self.kill();
            }
        }
    }

    /// Its process id (0 once reaped).
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether it has exited already (with its status).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits at most `within` for the process to exit; its status, once reaped.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        let child = self.0.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.0 = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the Unix socket at `socket` accepts a connection (the daemon is serving); panics
/// if the process exits first or `within` passes.
pub fn wait_for_socket(process: &mut ProcessGuard, socket: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = process.exited() {
            panic!("the process exited at start: {status}");
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no socket at {} within {within:?}",
            socket.display()
        );
        std::thread::sleep(POLL);
    }
}

/// The next message a daemon sends to the systemd notify socket `socket` (bound by the test,
/// passed to the daemon as `NOTIFY_SOCKET`), such as `READY=1\n`; panics if none comes within
/// `within`.
///
/// ```
/// use std::os::unix::net::UnixDatagram;
/// use std::time::Duration;
/// let (socket, daemon) = UnixDatagram::pair().expect("a socket pair");
/// daemon.send(b"READY=1\n").expect("sent");
/// assert_eq!(fwnp_testkit::process::next_notice(&socket, Duration::from_secs(5)), "READY=1\n");
/// ```
pub fn next_notice(socket: &std::os::unix::net::UnixDatagram, within: Duration) -> String {
    socket
        .set_read_timeout(Some(within))
        .expect("a read timeout on the notify socket");
    let mut buffer = [0u8; 512];
    let n = socket
        .recv(&mut buffer)
        .expect("a message on the notify socket");
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}
