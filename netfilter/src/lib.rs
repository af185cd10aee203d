//! nftables over netlink for the FWNP gateway and host agent.
#![forbid(unsafe_code)]
