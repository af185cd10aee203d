//! (placeholder: filled by the validate work)
