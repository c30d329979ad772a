//! Delivery (in progress).
pub mod client;
pub mod reply;
