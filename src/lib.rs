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
