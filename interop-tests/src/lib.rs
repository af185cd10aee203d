//! End-to-end tests of FWNP across real network namespaces, the lab demo and the load
//! generator. Nothing here is part of the product.
//!
//! Not yet implemented: the suite arrives with the daemons it exercises.
#![forbid(unsafe_code)]
