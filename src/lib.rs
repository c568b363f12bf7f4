#![forbid(unsafe_code)]
//! Breakwater: an edge gateway that makes overload explicit and fast.
//!
//! A request's journey, one module per stage: [`listener`] accepts and times the connection,
//! [`routing`] picks the route, [`auth`] decides who may call it, [`circuit`] and [`admission`]
//! decide whether it may go on, [`forward`] rewrites headers, [`upstream`] sends it over a pooled
//! connection, [`body`] relays the answer under the route's budget, and [`respond`] builds every
//! answer the gateway makes itself. [`proxy`] strings the stages together. [`tls`] holds the
//! certificates of both sides.
//!
//! [`config`] is plain data, validated section by section; [`prepare`] reads the certificates
//! and secrets it names; [`gateway`] starts and drains; [`reload`] swaps in a new configuration.

pub mod admin;
pub mod admission;
pub mod auth;
pub mod body;
pub mod circuit;
pub mod config;
pub mod error;
pub mod forward;
pub mod gateway;
pub mod http1;
pub mod listener;
pub mod logline;
pub mod observe;
pub mod prepare;
pub mod proxy;
pub mod reload;
pub mod respond;
pub mod retry;
pub mod routing;
pub mod tls;
pub mod upstream;

#[cfg(test)]
pub(crate) mod scripted;

/// Inputs for the unit tests that check a fast path against the plain rule it replaces.
#[cfg(test)]
pub(crate) mod exhaustive {
    /// Every string of 1 to `max_len` bytes drawn from `alphabet`, shortest first.
    pub(crate) fn every_string(alphabet: &[u8], max_len: usize) -> Vec<Vec<u8>> {
        let mut all = Vec::new();
        let mut shorter = vec![Vec::new()];
        for _ in 0..max_len {
            let longer: Vec<Vec<u8>> = shorter
                .iter()
                .flat_map(|s: &Vec<u8>| {
                    alphabet.iter().map(move |&c| [s.as_slice(), &[c]].concat())
                })
                .collect();
            all.extend(longer.iter().cloned());
            shorter = longer;
        }
        all
    }

    #[test]
    fn every_string_counts() {
        let all = every_string(b"ab", 3);
        assert_eq!(all.len(), 2 + 4 + 8);
        assert_eq!(all[0], b"a");
        assert_eq!(all.last().unwrap(), b"bbb");
    }
}
