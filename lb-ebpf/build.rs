use which::which;

/// Rebuild when bpf-linker changes (aya-template does the same): the linker is not a cargo
/// dependency, so cargo would not notice an upgrade otherwise.
fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
