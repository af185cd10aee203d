//! The agent's small state file, `STATE_DIR/agent.state`: the gateway epoch and the identity
//! of the last connection, so that a restarted agent can tell that the gateway lost its state
//! in the meantime. Leases themselves are not kept here: they belong to the applications'
//! connections, which end with the agent, and the gateway's List is the truth about what is
//! still open.

use std::path::Path;

use fwnp_proto::Epoch;
use tracing::warn;

const FILE: &str = "agent.state";

/// What the last run knew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The gateway's epoch.
    pub epoch: Epoch,
    /// The host's identity as the gateway authenticated it.
    pub identity: String,
}

/// Creates the state directory (mode 0700) if needed.
pub fn prepare(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Reads what the last run recorded, if anything readable.
pub fn load(dir: &Path) -> Option<Recorded> {
    let text = std::fs::read_to_string(dir.join(FILE)).ok()?;
    let mut epoch = None;
    let mut identity = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("epoch", v)) => epoch = u64::from_str_radix(v.trim(), 16).ok(),
            Some(("identity", v)) => identity = Some(v.trim().to_owned()),
            _ => {}
        }
    }
    Some(Recorded {
        epoch: epoch?,
        identity: identity?,
    })
}

/// Records the epoch and identity of a new connection (atomically: write, then rename).
pub fn record(dir: &Path, epoch: Epoch, identity: &str) {
    let text = format!(
        "epoch={epoch:016x}\nidentity={}\n",
        identity.replace('\n', " ")
    );
    let tmp = dir.join(format!("{FILE}.tmp"));
    let result = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, dir.join(FILE)));
    if let Err(e) = result {
        warn!(dir = %dir.display(), "cannot record the agent's state: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("fwnp-agent-state-{}", std::process::id()));
        prepare(&dir).unwrap();
        assert_eq!(load(&dir), None);
        record(&dir, 0xdead_beef, "fwnp://host/web-01");
        assert_eq!(
            load(&dir),
            Some(Recorded {
                epoch: 0xdead_beef,
                identity: "fwnp://host/web-01".into()
            })
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
