//! VRRPv3 (RFC 5798 as updated by RFC 9568) between LB nodes.
//!
//! So far the pure parts: the advertisement codec with its receive checks ([`packet`]) and the
//! RFC's timers ([`timers`]); the state machine, sockets and VIP handling follow (issue 4).
pub mod packet;
pub mod timers;
