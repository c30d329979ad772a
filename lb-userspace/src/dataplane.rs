//! Loading and attaching the XDP programs.
//!
//! - The balancer's maps are pinned under the configured bpffs directory, and its XDP links are
//!   pinned there too (`links/IFACE`). A restarted agent finds them: the maps (conntrack
//!   included) are reused, and the new program replaces the old one on the existing link
//!   atomically (`bpf_link_update`), so traffic never sees an interface without a program.
//! - The helper programs (`mxlb decap`, `mxlb pass`) are attached by short-lived commands, so
//!   their links are pinned as well and outlive the command.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode, links::{FdLink, PinnedLink}, xdp::XdpLink},
};
use tracing::{info, warn};

use crate::{EBPF_OBJECT, config::XdpModeSetting};

/// Errors loading or attaching programs.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("bpffs: {0}")]
    Bpffs(String),
    #[error("loading the eBPF object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("interface `{0}` does not exist")]
    NoSuchInterface(String),
    #[error("attaching to {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error("{path}: {message}")]
    Pin { path: String, message: String },
}

/// How a program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Driver (native) mode.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
    /// An existing pinned link was updated in place (mode unchanged).
    Replaced,
}

/// Makes sure `dir` exists on a mounted bpffs (mounting /sys/fs/bpf if needed).
pub fn ensure_bpffs(dir: &Path) -> Result<(), DataplaneError> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let root = Path::new("/sys/fs/bpf");
    let is_bpffs = |p: &Path| -> bool {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { return false };
        // SAFETY: statfs writes into the zeroed struct we pass; c is a valid C string.
        let mut s: libc::statfs = unsafe { std::mem::zeroed() };
        unsafe { libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type as i64 == BPF_FS_MAGIC }
    };
    if dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).map_err(|e| DataplaneError::Bpffs(format!("{}: {e}", root.display())))?;
        // SAFETY: plain mount(2) with static C strings.
        let rc = unsafe {
            libc::mount(c"bpf".as_ptr(), c"/sys/fs/bpf".as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null())
        };
        if rc != 0 {
            return Err(DataplaneError::Bpffs(format!(
                "/sys/fs/bpf is not mounted and mounting it failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        info!("mounted bpffs on /sys/fs/bpf");
        let mnt_ns = |p: &str| std::fs::metadata(p).map(|m| m.ino()).ok();
        if mnt_ns("/proc/self/ns/mnt") != mnt_ns("/proc/1/ns/mnt") {
            warn!(
                "running in a private mount namespace (`ip netns exec`?): what is pinned under \
                 /sys/fs/bpf vanishes when this process exits; use `mxlb --netns NAME` instead"
            );
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| DataplaneError::Bpffs(format!("{}: {e}", dir.display())))?;
    if !is_bpffs(dir) {
        return Err(DataplaneError::Bpffs(format!("{} is not on a bpffs", dir.display())));
    }
    Ok(())
}

/// The loaded balancer object with its maps pinned under `pin_dir`.
pub struct Balancer {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Balancer {
    /// Loads the object, reusing maps already pinned in `pin_dir` (or pinning new ones).
    pub fn load(pin_dir: &Path, conntrack_size: u32) -> Result<Balancer, DataplaneError> {
        ensure_bpffs(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(lb_common::MAP_CONNTRACK, conntrack_size)
            .load(EBPF_OBJECT)
            .map_err(DataplaneError::Load)?;
        program(&mut ebpf, lb_common::PROG_BALANCER)?
            .load()
            .map_err(|source| DataplaneError::Program { name: lb_common::PROG_BALANCER, source })?;
        Ok(Balancer { ebpf, pin_dir: pin_dir.to_path_buf() })
    }

    /// The loaded balancer program (for BPF_PROG_TEST_RUN in benchmarks and tests).
    pub fn program(&self) -> Result<&Xdp, DataplaneError> {
        let name = lb_common::PROG_BALANCER;
        let p = self
            .ebpf
            .program(name)
            .ok_or(DataplaneError::Program { name, source: aya::programs::ProgramError::NotLoaded })?;
        p.try_into().map_err(|source| DataplaneError::Program { name, source })
    }

    fn link_path(&self, iface: &str) -> PathBuf {
        self.pin_dir.join("links").join(iface)
    }

    /// Attaches the balancer to `iface` (or replaces the program on its pinned link).
    pub fn attach(&mut self, iface: &str, mode: XdpModeSetting) -> Result<Attached, DataplaneError> {
        let path = self.link_path(iface);
        std::fs::create_dir_all(path.parent().expect("link path has a parent"))
            .map_err(|e| DataplaneError::Bpffs(e.to_string()))?;
        let prog = program(&mut self.ebpf, lb_common::PROG_BALANCER)?;
        attach_pinned(prog, iface, mode, &path)
    }

    /// Detaches from `iface` (removing the pinned link). Maps stay pinned.
    pub fn detach(&mut self, iface: &str) -> Result<(), DataplaneError> {
        detach_pinned(&self.link_path(iface))
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DataplaneError> {
    let p = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::Program { name, source: aya::programs::ProgramError::NotLoaded })?;
    p.try_into().map_err(|source| DataplaneError::Program { name, source })
}

fn if_exists(iface: &str) -> Result<(), DataplaneError> {
    let c = std::ffi::CString::new(iface).map_err(|_| DataplaneError::NoSuchInterface(iface.into()))?;
    // SAFETY: valid C string.
    if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
        return Err(DataplaneError::NoSuchInterface(iface.into()));
    }
    Ok(())
}

/// Attaches `prog` to `iface` through a link pinned at `path`; an existing pin is updated in
/// place instead.
fn attach_pinned(prog: &mut Xdp, iface: &str, mode: XdpModeSetting, path: &Path) -> Result<Attached, DataplaneError> {
    if_exists(iface)?;
    let pin_err = |message: String| DataplaneError::Pin { path: path.display().to_string(), message };
    if path.exists() {
        let pinned = PinnedLink::from_pin(path).map_err(|e| pin_err(e.to_string()))?;
        let fd_link: FdLink = pinned.into();
        let stale = match XdpLink::try_from(fd_link) {
            Ok(link) => match prog.attach_to_link(link) {
                Ok(_) => return Ok(Attached::Replaced),
                // The link outlived its interface (deleted, or its namespace gone): the kernel
                // answers ENOLINK. A new interface may have the same name, or a new namespace
                // the same inode, so the pin path is taken again: the old pin is stale.
                Err(e) if has_errno(&e, libc::ENOLINK) => error_chain(&e),
                Err(e) => return Err(DataplaneError::Attach { iface: iface.into(), message: e.to_string() }),
            },
            Err(e) => e.to_string(),
        };
        warn!(path = %path.display(), error = %stale, "stale pinned link; attaching afresh");
        std::fs::remove_file(path).map_err(|e| pin_err(e.to_string()))?;
    }
    let (id, how) = match mode {
        XdpModeSetting::Native => (attach(prog, iface, XdpMode::Driver)?, Attached::Native),
        XdpModeSetting::Generic => (attach(prog, iface, XdpMode::Skb)?, Attached::Generic),
        XdpModeSetting::Auto => match attach(prog, iface, XdpMode::Driver) {
            Ok(id) => (id, Attached::Native),
            Err(e) => {
                warn!(%iface, error = %e, "native XDP not available, falling back to generic (skb) mode: slower");
                (attach(prog, iface, XdpMode::Skb)?, Attached::Generic)
            }
        },
    };
    let link = prog.take_link(id).map_err(|e| DataplaneError::Attach { iface: iface.into(), message: e.to_string() })?;
    let fd_link = FdLink::try_from(link).map_err(|e| pin_err(format!("link cannot be pinned: {e}")))?;
    fd_link.pin(path).map_err(|e| pin_err(e.to_string()))?;
    Ok(how)
}

/// Whether an OS error `code` is somewhere in `e`'s source chain.
fn has_errno(e: &(dyn std::error::Error + 'static), code: i32) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error) == Some(code) {
            return true;
        }
        next = err.source();
    }
    false
}

fn attach(prog: &mut Xdp, iface: &str, mode: XdpMode) -> Result<aya::programs::xdp::XdpLinkId, DataplaneError> {
    prog.attach(iface, mode).map_err(|e| DataplaneError::Attach { iface: iface.into(), message: error_chain(&e) })
}

fn detach_pinned(path: &Path) -> Result<(), DataplaneError> {
    if !path.exists() {
        return Ok(());
    }
    let pinned = PinnedLink::from_pin(path)
        .map_err(|e| DataplaneError::Pin { path: path.display().to_string(), message: e.to_string() })?;
    let link = pinned
        .unpin()
        .map_err(|e| DataplaneError::Pin { path: path.display().to_string(), message: e.to_string() })?;
    // Dropping the last reference to the link detaches the program.
    drop(link);
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The small programs attached by one-shot commands: `mxlb decap` on back-ends and
/// `mxlb pass` on veth peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Helper {
    /// Strips IPIP/IP6IP6 outer headers so the inner packet reaches the local mail server.
    Decap,
    /// Plain XDP_PASS (veth drops XDP_TX frames unless its peer runs a native XDP program).
    Pass,
}

impl Helper {
    fn program(self) -> &'static str {
        match self {
            Helper::Decap => lb_common::PROG_DECAP,
            Helper::Pass => lb_common::PROG_PASS,
        }
    }

    /// Where the helper's link is pinned. bpffs is shared by all network namespaces, so the
    /// path carries this namespace's inode: `eth0` in two namespaces are different links.
    pub fn pin_path(self, iface: &str) -> PathBuf {
        let netns = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()).unwrap_or(0);
        PathBuf::from("/sys/fs/bpf/mxlb-helpers").join(format!("{netns}-{iface}-{}", self.program()))
    }

    /// Attaches the helper program to `iface` (pinned, so it outlives this process).
    pub fn attach(self, iface: &str, mode: XdpModeSetting) -> Result<Attached, DataplaneError> {
        let path = self.pin_path(iface);
        ensure_bpffs(path.parent().expect("pin path has a parent"))?;
        // The object's maps are declared pinnable; each attachment keeps its own (small) set
        // beside its link, so concurrent attachments never race on shared pins and a detach
        // removes exactly what its attach made.
        let maps_dir = Self::maps_dir(&path);
        ensure_bpffs(&maps_dir)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .map_max_entries(lb_common::MAP_RINGS, 1)
            .map_max_entries(lb_common::MAP_CONNTRACK, 1)
            .load(EBPF_OBJECT)
            .map_err(DataplaneError::Load)?;
        let name = self.program();
        let attached = program(&mut ebpf, name).and_then(|prog| {
            prog.load().map_err(|source| DataplaneError::Program { name, source })?;
            attach_pinned(prog, iface, mode, &path)
        });
        if attached.is_err() && !path.exists() {
            // Nothing attached: leave nothing pinned either.
            let _ = std::fs::remove_dir_all(&maps_dir);
        }
        attached
    }

    fn maps_dir(link: &Path) -> PathBuf {
        let mut dir = link.as_os_str().to_owned();
        // bpffs refuses names containing a dot.
        dir.push("-maps");
        PathBuf::from(dir)
    }

    /// Removes the helper from `iface`, with its map pins; Ok(false) when it was not attached.
    pub fn detach(self, iface: &str) -> Result<bool, DataplaneError> {
        let path = self.pin_path(iface);
        let was = path.exists();
        detach_pinned(&path)?;
        let _ = std::fs::remove_dir_all(Self::maps_dir(&path));
        Ok(was)
    }
}
