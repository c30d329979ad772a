//! Delivery (in progress).
pub mod client;
pub mod dsn;
pub mod policy;
pub mod reply;
pub mod route;
