//! (placeholder: filled by the gateway work)
