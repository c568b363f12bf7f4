//! `admin:`: the admin listener.

use std::net::SocketAddr;

use super::problems::Problems;
use super::raw::RawAdmin;

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    /// `/readyz` answers 503 until every upstream has accepted at least one connection.
    pub ready_requires_upstream: bool,
}

pub(super) fn validate(p: &mut Problems, a: &RawAdmin) -> AdminConfig {
    AdminConfig {
        listen: if a.enabled == Some(false) {
            None
        } else {
            Some(p.addr("admin.listen", &a.listen, "127.0.0.1:9901"))
        },
        ready_requires_upstream: a.ready_requires_upstream.unwrap_or(false),
    }
}
