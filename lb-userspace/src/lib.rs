//! mxlb agent library.
pub mod config;
pub mod control;
pub mod dataplane;
pub mod desired;
pub mod maglev;
pub mod maps;
pub mod neighbours;
pub mod report;

/// The compiled eBPF object (all XDP programs and maps), embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
