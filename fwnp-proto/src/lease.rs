//! (placeholder: filled by the lease work)
