#![no_std]
// Empty on purpose: the programs live in the `lb-ebpf` binary (src/main.rs), which
// lb-userspace's build.rs compiles for bpfel-unknown-none and embeds.
