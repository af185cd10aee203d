//! (placeholder: filled by the codec work)
