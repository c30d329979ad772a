//! The POP3/IMAP proxy with mailbox affinity (in `mxlb run`, on a `local` VIP).
pub mod imap;
pub mod limiter;
pub mod login;
pub mod pop3;
