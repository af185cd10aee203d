//! Errors, and how the kernel's errno values map onto them.

use crate::Element;
use crate::layout::Op;
use crate::nl::Ack;

/// What went wrong talking to nf_tables.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The kernel refused for lack of privilege (EPERM/EACCES): CAP_NET_ADMIN in the network
    /// namespace is needed.
    #[error("permission denied: CAP_NET_ADMIN in the network namespace is required")]
    PermissionDenied,
    /// Our table belongs to another netlink socket (another running gateway or agent, or
    /// another handle in this process): it cannot be changed, deleted or claimed until that
    /// socket closes.
    #[error("table inet {table} is owned by another process or handle")]
    TableOwned {
        /// The table's name.
        table: String,
    },
    /// Our table (or one of its sets) does not exist.
    #[error("table inet {table} is missing")]
    TableMissing {
        /// The table's name.
        table: String,
    },
    /// An add met an element that already exists (EEXIST).
    #[error("the element for {0:?} already exists")]
    ElementExists(Element),
    /// A remove found no such element (ENOENT).
    #[error("the element for {0:?} does not exist")]
    ElementMissing(Element),
    /// An interval element (port range or source prefix) overlaps another element of the same
    /// host and protocol without being identical to it; the interval backend refuses overlaps.
    #[error("the element for {0:?} overlaps another element")]
    ElementConflicts(Element),
    /// The kernel refused a message as too large (EMSGSIZE).
    #[error("netlink message too long for the kernel")]
    MessageTooLong,
    /// Any other refusal, with the operation, the errno and the kernel's text if it sent one.
    #[error("kernel refused {op}: errno {errno}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    Kernel {
        /// What was being done.
        op: &'static str,
        /// The errno the kernel answered.
        errno: i32,
        /// The kernel's extended-ack text, or empty.
        message: String,
    },
    /// The socket failed.
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    /// The table read back after applying does not match what was applied.
    #[error("table verification failed: {0}")]
    VerifyFailed(String),
    /// The batcher's thread has stopped.
    #[error("the netfilter batcher has stopped")]
    BatcherStopped,
    /// The opening cannot be expressed in our sets (family mismatch, reversed range...).
    #[error("unsupported opening: {0}")]
    UnsupportedOpening(String),
    /// The layout cannot be built (no protected prefix nor interface, bad names...).
    #[error("invalid layout: {0}")]
    InvalidLayout(String),
    /// A timeout the kernel cannot hold (zero, which would mean "never expires").
    #[error("invalid element timeout: {0}")]
    InvalidTimeout(String),
    /// The kernel's answer did not make sense (missing acknowledgement, malformed reply).
    #[error("unexpected netlink reply: {0}")]
    UnexpectedReply(String),
}

impl Clone for Error {
    fn clone(&self) -> Self {
        match self {
            Error::PermissionDenied => Error::PermissionDenied,
            Error::TableMissing { table } => Error::TableMissing {
                table: table.clone(),
            },
            Error::TableOwned { table } => Error::TableOwned {
                table: table.clone(),
            },
            Error::ElementExists(o) => Error::ElementExists(o.clone()),
            Error::ElementMissing(o) => Error::ElementMissing(o.clone()),
            Error::ElementConflicts(o) => Error::ElementConflicts(o.clone()),
            Error::MessageTooLong => Error::MessageTooLong,
            Error::Kernel { op, errno, message } => Error::Kernel {
                op,
                errno: *errno,
                message: message.clone(),
            },
            Error::Io(e) => Error::Io(match e.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(e.kind(), e.to_string()),
            }),
            Error::VerifyFailed(s) => Error::VerifyFailed(s.clone()),
            Error::BatcherStopped => Error::BatcherStopped,
            Error::UnsupportedOpening(s) => Error::UnsupportedOpening(s.clone()),
            Error::InvalidLayout(s) => Error::InvalidLayout(s.clone()),
            Error::InvalidTimeout(s) => Error::InvalidTimeout(s.clone()),
            Error::UnexpectedReply(s) => Error::UnexpectedReply(s.clone()),
        }
    }
}

impl Error {
    /// Whether the error concerns the whole table or transaction rather than one element:
    /// such errors are not retried element by element.
    pub(crate) fn is_table_wide(&self) -> bool {
        !matches!(
            self,
            Error::ElementExists(_)
                | Error::ElementMissing(_)
                | Error::ElementConflicts(_)
                | Error::UnsupportedOpening(_)
                | Error::InvalidTimeout(_)
                | Error::Kernel { .. }
        )
    }
}

/// Where in an element message the table and set name attributes sit: the kernel's extended
/// ack points at one of them when the table or set is missing.
pub(crate) const TABLE_ATTR_OFFSET: u32 =
    (crate::nl::NLMSG_HDRLEN + crate::nl::NFGENMSG_LEN) as u32;

/// Maps a kernel refusal to an error.
///
/// `opening` is the element concerned, when the message carried one element's change;
/// `set_attr_offset` is the offset of the set-name attribute in an element message, so that an
/// ENOENT pointing at the table or set name is told apart from an ENOENT for the element.
pub(crate) fn from_ack(
    op: Op,
    ack: &Ack,
    table: &str,
    opening: Option<&Element>,
    set_attr_offset: Option<u32>,
) -> Error {
    const EPERM: i32 = libc::EPERM;
    const EACCES: i32 = libc::EACCES;
    const ENOENT: i32 = libc::ENOENT;
    const EEXIST: i32 = libc::EEXIST;
    const EMSGSIZE: i32 = libc::EMSGSIZE;
    const ENOTEMPTY: i32 = libc::ENOTEMPTY;
    let element_op = matches!(op, Op::AddElement | Op::RenewElement | Op::RemoveElement);
    let points_at_container = match (ack.bad_attr_offset, set_attr_offset) {
        (Some(offset), Some(set_offset)) => offset == TABLE_ATTR_OFFSET || offset == set_offset,
        (Some(offset), None) => offset == TABLE_ATTR_OFFSET,
        (None, _) => false,
    };
    match (ack.errno, opening) {
        (EPERM | EACCES, _) => Error::PermissionDenied,
        (EMSGSIZE, _) => Error::MessageTooLong,
        (ENOENT, Some(o)) if element_op && !points_at_container => Error::ElementMissing(o.clone()),
        (ENOENT, _) if element_op || matches!(op, Op::DeleteTable) || points_at_container => {
            Error::TableMissing {
                table: table.to_string(),
            }
        }
        (EEXIST, Some(o)) if element_op => Error::ElementExists(o.clone()),
        (ENOTEMPTY, Some(o)) if element_op => Error::ElementConflicts(o.clone()),
        (errno, _) => Error::Kernel {
            op: op.as_str(),
            errno,
            message: ack.message.clone().unwrap_or_default(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwnp_proto::message::{PortRange, Protocol};

    fn ack(errno: i32, offset: Option<u32>) -> Ack {
        Ack {
            errno,
            seq: 1,
            message: None,
            bad_attr_offset: offset,
        }
    }

    fn opening() -> Element {
        Element {
            host: "10.0.0.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            ports: PortRange::single(80),
            remote: None,
        }
    }

    #[test]
    fn maps_errnos() {
        let o = opening();
        assert!(matches!(
            from_ack(Op::AddElement, &ack(libc::EPERM, None), "t", Some(&o), None),
            Error::PermissionDenied
        ));
        assert!(matches!(
            from_ack(Op::CreateTable, &ack(libc::EACCES, None), "t", None, None),
            Error::PermissionDenied
        ));
        assert!(matches!(
            from_ack(
                Op::AddElement,
                &ack(libc::EEXIST, None),
                "t",
                Some(&o),
                None
            ),
            Error::ElementExists(_)
        ));
        assert!(matches!(
            from_ack(
                Op::RemoveElement,
                &ack(libc::ENOENT, None),
                "t",
                Some(&o),
                Some(28)
            ),
            Error::ElementMissing(_)
        ));
        assert!(matches!(
            from_ack(
                Op::AddElement,
                &ack(libc::ENOTEMPTY, None),
                "t",
                Some(&o),
                None
            ),
            Error::ElementConflicts(_)
        ));
        assert!(matches!(
            from_ack(Op::AddElement, &ack(libc::EMSGSIZE, None), "t", None, None),
            Error::MessageTooLong
        ));
        match from_ack(Op::CreateRule, &ack(libc::EINVAL, None), "t", None, None) {
            Error::Kernel { op, errno, .. } => {
                assert_eq!(op, "create rule");
                assert_eq!(errno, libc::EINVAL);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn enoent_on_the_table_or_set_attribute_is_a_missing_table() {
        let o = opening();
        let at_table = from_ack(
            Op::RemoveElement,
            &ack(libc::ENOENT, Some(TABLE_ATTR_OFFSET)),
            "fwnp",
            Some(&o),
            Some(28),
        );
        assert!(matches!(at_table, Error::TableMissing { ref table } if table == "fwnp"));
        let at_set = from_ack(
            Op::AddElement,
            &ack(libc::ENOENT, Some(28)),
            "fwnp",
            Some(&o),
            Some(28),
        );
        assert!(matches!(at_set, Error::TableMissing { .. }));
        // A grouped message (no single opening) with ENOENT: the container is blamed.
        assert!(matches!(
            from_ack(Op::AddElement, &ack(libc::ENOENT, None), "fwnp", None, None),
            Error::TableMissing { .. }
        ));
    }
}
