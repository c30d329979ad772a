//! `mxlb`: the agent (`mxlb run`) and the operator's CLI.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use mxlb::{
    config::{BackendConfig, CheckSetting, Config, ForwardingMode, MacAddr, VipConfig, XdpModeSetting},
    control::{self, Controller, Request},
    dataplane::{Balancer, Helper},
    desired::Change,
    maps::DataplaneMaps,
    report,
};
use tokio::sync::Mutex;
use tracing::{info, warn};

/// Default config path; when it does not exist the embedded default (the lab) is used.
const DEFAULT_CONFIG: &str = "/etc/mxlb/mxlb.toml";

#[derive(Parser)]
#[command(
    name = "mxlb",
    version,
    about = "Kernel-assisted (XDP) load balancer for mail clusters",
    long_about = "mxlb balances SMTP, submission, POP3 and IMAP connections across mail servers with an XDP \
program (weighted Maglev, connection tracking, direct server return). `mxlb run` loads and attaches it and \
keeps its maps in step with the config, and holds the VIPs together with other LB nodes over VRRPv3 \
(keepalived-compatible). On `local` VIPs it also runs a store-and-forward SMTP relay with a mirrored \
queue (`[relay]`) and a POP3/IMAP proxy that sends each login to the back-end holding the mailbox \
(`[proxy]`, `[mailbox]`); the other commands change or show the running state, whether or not the agent runs \
(changes are kept across restarts).",
    after_help = "Config: --config FILE, else $MXLB_CONFIG, else /etc/mxlb/mxlb.toml, else the embedded default \
(the lab topology of `cargo xtask run`; see mxlb.example.toml)."
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, global = true, env = "MXLB_CONFIG")]
    config: Option<PathBuf>,
    /// Run in the named network namespace (/run/netns/NAME), like `ip -n`. Unlike
    /// `ip netns exec`, this keeps the host's /sys/fs/bpf, so pinned maps and links stay visible
    /// to the next command.
    #[arg(long, global = true, value_name = "NAME")]
    netns: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the balancer, apply the config, run VRRP with the other LB nodes
    /// (`[[vrrp]]`) and the services on local VIPs (`[relay]`, `[proxy]`), until SIGTERM/SIGINT
    /// (a VRRP master then hands its VIPs over at once; SIGHUP re-reads the relay's mailbox list and
    /// the mailbox table).
    Run {
        /// Leave the program attached on exit (for restarts and upgrades: traffic keeps flowing
        /// on the pinned maps while the agent is down).
        #[arg(long)]
        keep_attached: bool,
    },
    /// Check a configuration file and report every error with file, line and key.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// List, add or remove VIPs.
    #[command(subcommand)]
    Vip(VipCommand),
    /// List, add, remove, weight or drain back-ends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// The running agent at a glance: each back-end's state, health, weights, load and probe
    /// time, each VRRP instance's state and priority, and the data path's decisions (needs
    /// `mxlb run`).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Packet, byte and new-flow rates per VIP port, back-end and data-path decision.
    Stats {
        /// Seconds between the two samples the rates are computed from.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        #[arg(long)]
        json: bool,
    },
    /// Back-end side of dsr-ipip: strip the outer header so the local mail server sees the
    /// client's packet (for kernels without IPIP tunnel devices).
    Decap {
        #[command(subcommand)]
        action: HelperAction,
    },
    /// Attach a plain XDP_PASS program (needed on the peer of a veth where mxlb uses XDP_TX).
    Pass {
        #[command(subcommand)]
        action: HelperAction,
    },
    /// Run on a mail server: report its mail queue, disk and load in HAProxy's agent-check
    /// format (`up ready 75% maxconn:300`, `drain`, `down #reason`); `detail` or
    /// `GET /detail` returns the raw figures as JSON.
    Agent(AgentArgs),
    /// Edge protection: source block list and allow list (CIDR prefixes, IPv4 and IPv6) and
    /// the per-source SYN rate limit. Written to the pinned maps directly (agent running or
    /// not) and kept in the state dir across restarts and reboots.
    #[command(subcommand)]
    Block(BlockCommand),
    /// The relay's queue: list, show, retry or delete messages (like Postfix's mailq,
    /// postcat -q, postqueue -i and postsuper -d). `list` and `show` read the spool directly
    /// when no agent runs.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// The mailbox map: which back-end holds each mailbox (for the POP3/IMAP proxy and the
    /// relay's partitioned delivery). `where`, `list` and `move` work without a running agent
    /// (from the config and the table; no health or learned lists then).
    #[command(subcommand)]
    Mailbox(MailboxCommand),
}

#[derive(Subcommand)]
enum MailboxCommand {
    /// The back-end holding MAILBOX, and why (table, learned from the back-ends, or hashed).
    Where {
        mailbox: String,
        #[arg(long)]
        json: bool,
    },
    /// Make BACKEND the owner of MAILBOX: recorded in the mailbox table, and the user's open
    /// proxied sessions are ended so they reconnect to the new owner. Copy the mail first
    /// (e.g. `doveadm sync`).
    Move { mailbox: String, backend: String },
    /// Every mailbox known from the table and the back-ends' lists, with its owner, and the
    /// state of each back-end's list.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Fetch every back-end's mailbox list now (needs `mxlb run`).
    Refresh,
    /// Re-read the mailbox table (needs `mxlb run`; SIGHUP does the same).
    Reload,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Every queued message: id, size, age, sender, each recipient's state and last reply
    /// (`replica` rows are the peer's copies, delivered here only after a takeover).
    List {
        #[arg(long)]
        json: bool,
    },
    /// One message: its envelope and content as stored.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Try a deferred message now (needs `mxlb run`).
    Retry { id: String },
    /// Remove a message from the queue on this node and its mirror, undelivered (needs `mxlb run`).
    Delete { id: String },
    /// Re-read the valid-mailbox list (`[relay] mailboxes`) (needs `mxlb run`).
    Reload,
}

#[derive(Subcommand)]
enum BlockCommand {
    /// Block new connections to the VIPs from these prefixes (or exempt them with --allow).
    Add {
        /// CIDR prefixes or addresses (198.51.100.0/24, 2001:db8:bad::/48, 192.0.2.7).
        #[arg(required = true)]
        cidrs: Vec<String>,
        /// The allow list (bypasses the block list and the SYN rate limit).
        #[arg(long)]
        allow: bool,
    },
    /// Remove prefixes from the block list (or the allow list with --allow).
    Remove {
        #[arg(required = true)]
        cidrs: Vec<String>,
        #[arg(long)]
        allow: bool,
    },
    /// Show both lists and the SYN rate limit.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Replace the block list (or the allow list) with a file: one CIDR per line, `#` comments.
    Load {
        file: PathBuf,
        #[arg(long)]
        allow: bool,
        /// Add the file's prefixes to the list instead of replacing it.
        #[arg(long)]
        merge: bool,
    },
    /// Set the SYN rate limit per source (IPv4 address, IPv6 /64); 0 turns it off. Overrides
    /// the config's [edge] section until --reset.
    Rate {
        /// SYNs per second.
        #[arg(required_unless_present = "reset")]
        rate: Option<u32>,
        /// Bucket size (SYNs at once after an idle period); default twice the rate.
        #[arg(long)]
        burst: Option<u32>,
        /// Go back to the config's [edge] values.
        #[arg(long, conflicts_with_all = ["rate", "burst"])]
        reset: bool,
    },
}

#[derive(Args)]
struct AgentArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:5555")]
    listen: std::net::SocketAddr,
    /// Postfix queue directory.
    #[arg(long, default_value = "/var/spool/postfix")]
    spool: PathBuf,
    /// Shell command printing the queue length instead (e.g. `exim -bpc`).
    #[arg(long)]
    queue_command: Option<String>,
    /// File system whose utilisation counts (default: the spool's).
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Queue length at which to ask for a drain.
    #[arg(long, default_value_t = 5000)]
    max_queue: u64,
    /// Disk utilisation (%) at which to ask for a drain.
    #[arg(long, default_value_t = 95.0)]
    max_disk: f64,
    /// Load average per CPU at which the weight share reaches its 1% floor.
    #[arg(long, default_value_t = 4.0)]
    max_load: f64,
    /// Connection limit to pass on (`maxconn:N`).
    #[arg(long)]
    maxconn: Option<u32>,
    /// Also export this server's mailbox list, so load balancers learn where each mailbox
    /// is: `doveadm` (`doveadm user '*'`), `passwd-file:PATH` or `command:CMD` (one name per
    /// line).
    #[arg(long)]
    mailboxes: Option<mxlb::mailbox::learn::MailboxSource>,
}

#[derive(Subcommand)]
enum VipCommand {
    /// Show VIPs, their ports, mode, back-ends and counters.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a VIP.
    Add {
        name: String,
        address: std::net::IpAddr,
        /// Port to balance (repeat for several).
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
        /// dsr-l2, dsr-ipip or local.
        #[arg(long)]
        mode: ForwardingMode,
        /// Back-end in the pool (repeat for several).
        #[arg(long = "backend")]
        backends: Vec<String>,
        /// Health probe for its back-ends (default: by the first port).
        #[arg(long, value_enum)]
        check: Option<CheckSetting>,
    },
    /// Remove a VIP.
    Remove { name: String },
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Show back-ends with weight, state, MAC and counters.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a back-end (to every non-local VIP unless --vip is given).
    Add {
        name: String,
        address: std::net::IpAddr,
        #[arg(long, default_value_t = 100)]
        weight: u32,
        /// MAC for dsr-l2 (default: resolved from the neighbour table).
        #[arg(long)]
        mac: Option<MacAddr>,
        /// VIP whose pool it joins (repeat for several).
        #[arg(long = "vip")]
        vips: Vec<String>,
        /// Port of `mxlb agent` on it (its load then scales the weight).
        #[arg(long)]
        agent_port: Option<u16>,
    },
    /// Remove a back-end from every pool.
    Remove { name: String },
    /// Set a back-end's weight (0-1000; 0 = no new sessions).
    Weight { name: String, weight: u32 },
    /// Stop sending new sessions to a back-end; established ones continue.
    Drain { name: String },
    /// Undo `drain`.
    Undrain { name: String },
}

#[derive(Subcommand)]
enum HelperAction {
    /// Attach to an interface (the link is pinned and outlives this command).
    Attach(HelperArgs),
    /// Detach from an interface.
    Detach {
        iface: String,
    },
}

#[derive(Args)]
struct HelperArgs {
    iface: String,
    /// auto, native or generic.
    #[arg(long, default_value = "auto")]
    mode: String,
}


fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // netlink-packet-route warns on every link dump that the kernel's IPv6 settings
            // are longer than it knows; that is noise, not something an operator can act on.
            tracing_subscriber::EnvFilter::try_from_env("MXLB_LOG").unwrap_or_else(|_| "info,netlink_packet_route=error".into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: not in journald, log files or pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Some(name) = &cli.netns {
        // Before the runtime exists: threads inherit the namespace they are created in.
        if let Err(e) = enter_netns(name) {
            eprintln!("mxlb: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mxlb: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mxlb: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Moves this (still single-threaded) process into the network namespace `name`.
fn enter_netns(name: &str) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    if name.is_empty() || name.contains('/') {
        bail!("--netns {name:?}: not a namespace name");
    }
    let path = Path::new("/run/netns").join(name);
    let f = std::fs::File::open(&path).with_context(|| format!("--netns {name}: {}", path.display()))?;
    // SAFETY: setns(2) on a valid namespace fd.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("--netns {name}: setns: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

async fn dispatch(cli: Cli) -> Result<()> {
    // These two need no LB configuration.
    let command = match cli.command {
        Command::CheckConfig { file } => return check_config(&file),
        Command::Agent(a) => return agent(a).await,
        other => other,
    };
    let config = load_config(cli.config.as_deref())?;
    match command {
        Command::CheckConfig { .. } | Command::Agent(_) => unreachable!("handled above"),
        Command::Run { keep_attached } => run(config, keep_attached).await,
        Command::Vip(VipCommand::List { json }) => list_vips(config, json).await,
        Command::Vip(VipCommand::Add { name, address, ports, mode, backends, check }) => {
            change(config, Change::VipAdd { vip: VipConfig { name, address, ports, mode, backends, check, shed: true } }).await
        }
        Command::Vip(VipCommand::Remove { name }) => change(config, Change::VipRemove { name }).await,
        Command::Backend(BackendCommand::List { json }) => list_backends(config, json).await,
        Command::Backend(BackendCommand::Add { name, address, weight, mac, vips, agent_port }) => {
            change(config, Change::BackendAdd { backend: BackendConfig { name, address, weight, mac, agent_port }, vips }).await
        }
        Command::Backend(BackendCommand::Remove { name }) => change(config, Change::BackendRemove { name }).await,
        Command::Backend(BackendCommand::Weight { name, weight }) => change(config, Change::Weight { name, weight }).await,
        Command::Backend(BackendCommand::Drain { name }) => change(config, Change::Drain { name }).await,
        Command::Backend(BackendCommand::Undrain { name }) => change(config, Change::Undrain { name }).await,
        Command::Stats { interval, json } => stats(config, interval, json).await,
        Command::Status { json } => status(config, json).await,
        Command::Queue(cmd) => queue(config, cmd).await,
        Command::Mailbox(cmd) => mailbox(config, cmd).await,
        Command::Decap { action } => helper(Helper::Decap, action),
        Command::Pass { action } => helper(Helper::Pass, action),
        Command::Block(cmd) => block(config, cmd),
    }
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    let path = path.map(Path::to_path_buf).or_else(|| {
        let p = PathBuf::from(DEFAULT_CONFIG);
        p.exists().then_some(p)
    });
    match path {
        Some(p) => Ok(Config::load(&p)?),
        None => Ok(Config::embedded_default()),
    }
}

fn check_config(file: &Path) -> Result<()> {
    match Config::load(file) {
        Ok(c) => {
            println!(
                "{}: OK ({} VIPs, {} back-ends, interfaces {})",
                file.display(),
                c.vips.len(),
                c.backends.len(),
                c.node.interfaces.join(", ")
            );
            Ok(())
        }
        Err(mxlb::config::LoadError::Invalid(errors)) => {
            for e in &errors.0 {
                println!("{e}");
            }
            bail!("{}: {} error(s)", file.display(), errors.0.len())
        }
        Err(e) => Err(e.into()),
    }
}

/// Opens the pinned maps if an agent has pinned them.
fn open_maps(config: &Config) -> Result<Option<DataplaneMaps>> {
    let dir = &config.node.bpffs_dir;
    if !DataplaneMaps::pinned_in(dir) {
        return Ok(None);
    }
    Ok(Some(DataplaneMaps::open_pinned(dir)?))
}

/// Sends a change to the running agent, or applies it here when none runs.
async fn change(config: Config, change: Change) -> Result<()> {
    let socket = config.node.control_socket.clone();
    if let Some(answer) = control::request(&socket, &Request::Change { change: change.clone() }).await? {
        if answer.ok {
            println!("{}", answer.message);
            return Ok(());
        }
        bail!("{}", answer.message);
    }
    let maps = open_maps(&config)?;
    let mut controller = Controller::open(config, maps)?;
    let message = controller.change(change).await?;
    println!("{message} (no agent running: written directly)");
    Ok(())
}

/// Desired state joined with the pinned maps (if any), for the listings.
fn open_view(config: Config) -> Result<Controller> {
    let maps = open_maps(&config)?;
    Ok(Controller::open(config, maps)?)
}

/// Prints `rows` as JSON when asked; returns whether it did.
fn printed_json<T: serde::Serialize>(rows: &T, json: bool) -> Result<bool> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    }
    Ok(json)
}

async fn list_vips(config: Config, json: bool) -> Result<()> {
    let view = open_view(config)?;
    let rows = report::vips(view.desired(), &report::MapsView::read(view.maps())?)?;
    if printed_json(&rows, json)? {
        return Ok(());
    }
    println!("{:<12} {:<26} {:<9} {:<7} {:<14} {:>12} {:>10}  BACKENDS", "NAME", "ADDRESS", "MODE", "ACTIVE", "PORTS", "PACKETS", "FLOWS");
    for v in rows {
        let ports: Vec<String> = v.ports.iter().map(|p| p.port.to_string()).collect();
        let packets: u64 = v.ports.iter().map(|p| p.counters.packets).sum();
        let flows: u64 = v.ports.iter().map(|p| p.counters.new_flows).sum();
        println!(
            "{:<12} {:<26} {:<9} {:<7} {:<14} {:>12} {:>10}  {}",
            v.name,
            v.address.to_string(),
            v.mode,
            if v.active { "yes" } else { "no" },
            ports.join(","),
            packets,
            flows,
            v.backends.join(",")
        );
    }
    Ok(())
}

async fn list_backends(config: Config, json: bool) -> Result<()> {
    let view = open_view(config)?;
    let rows = report::backends(view.desired(), &report::MapsView::read(view.maps())?)?;
    if printed_json(&rows, json)? {
        return Ok(());
    }
    println!(
        "{:<12} {:<26} {:>6} {:<10} {:<17} {:>12} {:>10}  VIPS",
        "NAME", "ADDRESS", "WEIGHT", "STATE", "MAC", "PACKETS", "FLOWS"
    );
    for b in rows {
        println!(
            "{:<12} {:<26} {:>6} {:<10} {:<17} {:>12} {:>10}  {}",
            b.name,
            b.address.to_string(),
            b.weight,
            b.state,
            b.mac.unwrap_or_else(|| "-".into()),
            b.counters.packets,
            b.counters.new_flows,
            b.vips.join(",")
        );
    }
    Ok(())
}

async fn queue(config: Config, cmd: QueueCommand) -> Result<()> {
    use mxlb::relay::service::{QueueAction, QueueEntry, QueuedMessage};
    let Some(relay) = config.relay.as_ref() else { bail!("no [relay] in the config: this node runs no relay") };
    let socket = config.node.control_socket.clone();
    let (action, json) = match &cmd {
        QueueCommand::List { json } => (QueueAction::List, *json),
        QueueCommand::Show { id, json } => (QueueAction::Show { id: id.clone() }, *json),
        QueueCommand::Retry { id } => (QueueAction::Retry { id: id.clone() }, false),
        QueueCommand::Delete { id } => (QueueAction::Delete { id: id.clone() }, false),
        QueueCommand::Reload => (QueueAction::Reload, false),
    };
    let answer = control::request(&socket, &Request::Queue { action: action.clone() }).await?;
    let message = match answer {
        Some(a) if a.ok => a.message,
        Some(a) => bail!("{}", a.message),
        // No agent: list and show read the spool; changes need the running agent.
        None => {
            let spool = mxlb::relay::service::open_spool(&relay.spool_dir)?;
            match action {
                QueueAction::List => serde_json::to_string(&mxlb::relay::service::list_spool(&spool).map_err(anyhow::Error::msg)?)?,
                QueueAction::Show { id } => serde_json::to_string(&mxlb::relay::service::show_spool(&spool, &id).map_err(anyhow::Error::msg)?)?,
                _ => bail!("no agent answers on {}: `mxlb run` must be running", socket.display()),
            }
        }
    };
    match cmd {
        QueueCommand::List { .. } => {
            let entries: Vec<QueueEntry> = serde_json::from_str(&message).context("queue listing")?;
            if printed_json(&entries, json)? {
                return Ok(());
            }
            print!("{}", report::queue_table(&entries, mxlb::relay::unix_now()));
        }
        QueueCommand::Show { .. } => {
            let m: QueuedMessage = serde_json::from_str(&message).context("queued message")?;
            if printed_json(&m, json)? {
                return Ok(());
            }
            print!("{}", report::queue_table(std::slice::from_ref(&m.entry), mxlb::relay::unix_now()));
            println!();
            print!("{}", m.content);
        }
        _ => println!("{message}"),
    }
    Ok(())
}

async fn mailbox(config: Config, cmd: MailboxCommand) -> Result<()> {
    use mxlb::mailbox::{
        Owner, Whereabouts,
        service::{MailboxAction, MailboxListing, listing},
    };
    let Some(m) = config.mailbox.as_ref() else { bail!("no [mailbox] in the config: there is no mailbox map") };
    let socket = config.node.control_socket.clone();
    let action = match &cmd {
        MailboxCommand::Where { mailbox, .. } => MailboxAction::Where { mailbox: mailbox.clone() },
        MailboxCommand::Move { mailbox, backend } => MailboxAction::Move { mailbox: mailbox.clone(), backend: backend.clone() },
        MailboxCommand::List { .. } => MailboxAction::List,
        MailboxCommand::Refresh => MailboxAction::Refresh,
        MailboxCommand::Reload => MailboxAction::Reload,
    };
    let message = match control::request(&socket, &Request::Mailbox { action: action.clone() }).await? {
        Some(a) if a.ok => a.message,
        Some(a) => bail!("{}", a.message),
        // No agent: the map from the config and the table alone.
        None => {
            let dir = m.directory(&config).context("mailbox table")?;
            match action {
                MailboxAction::Where { mailbox } => serde_json::to_string(&dir.whereabouts(&mailbox))?,
                MailboxAction::Move { mailbox, backend } => serde_json::to_string(&dir.move_mailbox(&mailbox, &backend)?)?,
                MailboxAction::List => serde_json::to_string(&listing(&dir))?,
                _ => bail!("no agent answers on {}: `mxlb run` must be running", socket.display()),
            }
        }
    };
    match cmd {
        MailboxCommand::Where { json, .. } => {
            let w: Whereabouts = serde_json::from_str(&message).context("mailbox whereabouts")?;
            if printed_json(&w, json)? {
                return Ok(());
            }
            print!("{}", report::whereabouts(&w));
        }
        MailboxCommand::Move { .. } => {
            let o: Owner = serde_json::from_str(&message).context("new owner")?;
            println!("moved: now on {} ({}){}", o.backend, o.address, if o.healthy { "" } else { ", which is DOWN" });
        }
        MailboxCommand::List { json } => {
            let l: MailboxListing = serde_json::from_str(&message).context("mailbox listing")?;
            if printed_json(&l, json)? {
                return Ok(());
            }
            print!("{}", report::mailbox_table(&l));
        }
        _ => println!("{message}"),
    }
    Ok(())
}

async fn status(config: Config, json: bool) -> Result<()> {
    let socket = config.node.control_socket.clone();
    let answer = control::request(&socket, &Request::Status)
        .await?
        .with_context(|| format!("no agent answers on {}: is `mxlb run` started with this config?", socket.display()))?;
    if !answer.ok {
        bail!("{}", answer.message);
    }
    let st: mxlb::metrics::Status = serde_json::from_str(&answer.message).context("bad status from the agent")?;
    if printed_json(&st, json)? {
        return Ok(());
    }
    println!(
        "{:<12} {:<10} {:<7} {:>6} {:>9} {:>6} {:>9}  {}",
        "BACKEND", "STATE", "HEALTH", "WEIGHT", "EFFECTIVE", "SHARE", "PROBE MS", "NOTE"
    );
    for b in &st.backends {
        let note = match (&b.overloaded, b.drained_by_operator) {
            (Some(why), _) => format!("overloaded: {why}"),
            (None, true) => "drained by operator".to_string(),
            _ => String::new(),
        };
        println!(
            "{:<12} {:<10} {:<7} {:>6} {:>9} {:>5.0}% {:>9}  {}",
            b.name,
            b.state,
            b.health,
            b.admin_weight,
            b.effective_weight,
            b.load_share * 100.0,
            b.probe_ms.map(|m| format!("{m:.1}")).unwrap_or_else(|| "-".into()),
            note
        );
    }
    if !st.vrrp.is_empty() {
        println!();
        println!("{:<12} {:>4} {:<8} {:<7} {:>8} {:<26} {}", "VRRP", "VRID", "IFACE", "STATE", "PRIORITY", "MASTER", "NOTE");
        for r in &st.vrrp {
            let mut note = r.failing_tracks.join("; ");
            if let Some(g) = &r.sync_group {
                note = if note.is_empty() { format!("group {g}") } else { format!("group {g}; {note}") };
            }
            println!(
                "{:<12} {:>4} {:<8} {:<7} {:>8} {:<26} {}",
                r.name,
                r.vrid,
                r.interface,
                r.state.name(),
                format!("{}/{}", r.priority, r.configured_priority),
                r.master.map(|m| m.to_string()).unwrap_or_else(|| "-".into()),
                note
            );
        }
    }
    println!();
    println!("{:<22} {:>14}", "DECISION", "PACKETS");
    for (reason, n) in &st.decisions {
        println!("{reason:<22} {n:>14}");
    }
    if let Some(r) = &st.relay {
        println!();
        let mirror = match r.mirror_connected {
            None => "none configured".to_string(),
            Some(up) => format!(
                "{}; {} copies confirmed, {} failed, {} accepted WITHOUT a copy, {} resent, {} taken over",
                if up { "connected" } else { "DOWN" },
                r.copies_confirmed,
                r.copies_failed,
                r.accepted_unmirrored,
                r.resynced,
                r.taken_over
            ),
        };
        println!("relay: {} accepted, {} refused (no copy); queue {}, peer copies {}", r.accepted, r.refused_unstored, r.queued, r.replicas);
        println!("mirror: {mirror}");
    }
    if let Some(p) = &st.proxy {
        println!();
        println!(
            "proxy: {} sessions ({} open, {} refused); logins {} ok, {} failed, {} slowed, {} blocked, {} owner down; relayed {} copy, {} sockmap; {} ended by move",
            p.sessions, p.active, p.sessions_refused, p.logins_ok, p.logins_failed, p.logins_slowed, p.logins_blocked,
            p.logins_unavailable, p.relayed_copy, p.relayed_sockmap, p.ended_by_move
        );
    }
    Ok(())
}

async fn stats(config: Config, interval: f64, json: bool) -> Result<()> {
    if !(0.05..=3600.0).contains(&interval) {
        bail!("--interval must be between 0.05 and 3600 seconds");
    }
    let maps = open_maps(&config)?.context("no pinned maps: is `mxlb run` started with this config?")?;
    let controller = Controller::open(config, None)?;
    let before = report::sample(controller.desired(), &maps)?;
    tokio::time::sleep(Duration::from_secs_f64(interval)).await;
    let after = report::sample(controller.desired(), &maps)?;
    let rates = report::rates(&before, &after);
    if printed_json(&rates, json)? {
        return Ok(());
    }
    for (title, rows) in [("VIP:PORT", &rates.vips), ("BACKEND", &rates.backends), ("DECISION", &rates.reasons)] {
        println!(
            "{:<22} {:>12} {:>14} {:>12} {:>14} {:>16} {:>12}",
            title, "PKTS/S", "BYTES/S", "NEWFLOWS/S", "PACKETS", "BYTES", "FLOWS"
        );
        for r in rows.iter().filter(|r| title != "DECISION" || r.total.packets > 0) {
            println!(
                "{:<22} {:>12.1} {:>14.1} {:>12.1} {:>14} {:>16} {:>12}",
                r.name, r.packets_per_s, r.bytes_per_s, r.new_flows_per_s, r.total.packets, r.total.bytes, r.total.new_flows
            );
        }
        println!();
    }
    Ok(())
}

/// `mxlb block ...`: the edge lists and the SYN limit (see [`mxlb::edge`]).
fn block(config: Config, cmd: BlockCommand) -> Result<()> {
    use mxlb::edge::{Cidr, Edge, EdgeConfig};
    let parse = |cidrs: &[String]| -> Result<Vec<Cidr>> {
        let (ok, bad): (Vec<_>, Vec<_>) = cidrs.iter().map(|c| c.parse::<Cidr>()).partition(|r| r.is_ok());
        if !bad.is_empty() {
            let errors: Vec<String> = bad.into_iter().filter_map(|r| r.err()).map(|e| e.to_string()).collect();
            bail!("{} (nothing changed)", errors.join("; "));
        }
        Ok(ok.into_iter().filter_map(|r| r.ok()).collect())
    };
    let list_name = |allow: bool| if allow { "allow" } else { "block" };
    let mut edge = Edge::open(&config)?;
    let note = if edge.applied() { "" } else { " (no pinned maps: applied when `mxlb run` starts)" };
    match cmd {
        BlockCommand::Add { cidrs, allow } => {
            let cidrs = parse(&cidrs)?;
            let n = edge.add(allow, &cidrs)?;
            println!("{n} prefix(es) added to the {} list{note}", list_name(allow));
        }
        BlockCommand::Remove { cidrs, allow } => {
            let cidrs = parse(&cidrs)?;
            let n = edge.remove(allow, &cidrs)?;
            println!("{n} prefix(es) removed from the {} list{note}", list_name(allow));
        }
        BlockCommand::Load { file, allow, merge } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
            let (added, removed) = edge.load(allow, &text, merge).with_context(|| format!("{}", file.display()))?;
            let total = if allow { edge.state().allow.len() } else { edge.state().block.len() };
            println!("{} list: {added} added, {removed} removed, {total} in all{note}", list_name(allow));
        }
        BlockCommand::Rate { rate, burst, reset } => {
            let limits = if reset { None } else { Some(EdgeConfig { syn_rate: rate.unwrap_or(0), syn_burst: burst.unwrap_or(0) }) };
            let l = edge.set_rate(limits)?;
            if l.syn_rate == 0 {
                println!("SYN rate limit off{note}");
            } else {
                println!("SYN rate limit: {}/s per source, burst {}{note}", l.syn_rate, l.syn_burst);
            }
        }
        BlockCommand::List { json } => {
            let l = edge.listing();
            if printed_json(&l, json)? {
                return Ok(());
            }
            if l.syn_rate == 0 {
                println!("SYN rate limit: off ({})", l.limits_from);
            } else {
                println!("SYN rate limit: {}/s per source, burst {} ({})", l.syn_rate, l.syn_burst, l.limits_from);
            }
            if let Some(n) = l.tracked_sources {
                println!("sources tracked: {n}");
            } else {
                println!("not in the data path yet (no pinned maps): applied when `mxlb run` starts");
            }
            println!("{:<6} PREFIX", "LIST");
            for c in &l.allow {
                println!("{:<6} {c}", "allow");
            }
            for c in &l.block {
                println!("{:<6} {c}", "block");
            }
        }
    }
    Ok(())
}

fn helper(which: Helper, action: HelperAction) -> Result<()> {
    match action {
        HelperAction::Attach(args) => {
            let mode = parse_mode(&args.mode)?;
            let how = which.attach(&args.iface, mode)?;
            println!("attached to {} ({how:?})", args.iface);
        }
        HelperAction::Detach { iface } => {
            if which.detach(&iface)? {
                println!("detached from {iface}");
            } else {
                println!("not attached to {iface}");
            }
        }
    }
    Ok(())
}

async fn agent(a: AgentArgs) -> Result<()> {
    if !(a.max_disk > 0.0 && a.max_disk <= 100.0) || a.max_load <= 0.0 || a.max_queue == 0 {
        bail!("--max-disk must be in (0, 100], --max-load above 0 and --max-queue at least 1");
    }
    let settings = mxlb::agent::AgentSettings {
        listen: a.listen,
        spool: a.spool,
        queue_command: a.queue_command,
        disk: a.disk,
        max_queue: a.max_queue,
        max_disk_pct: a.max_disk,
        max_load_per_cpu: a.max_load,
        maxconn: a.maxconn,
        mailboxes: a.mailboxes,
    };
    let stop = async {
        if let Err(e) = shutdown_signal().await {
            warn!(error = %e, "signal handling");
            std::future::pending::<()>().await;
        }
    };
    mxlb::agent::serve(settings, stop).await.context("agent")
}

fn parse_mode(s: &str) -> Result<XdpModeSetting> {
    match s {
        "auto" => Ok(XdpModeSetting::Auto),
        "native" => Ok(XdpModeSetting::Native),
        "generic" => Ok(XdpModeSetting::Generic),
        other => bail!("unknown XDP mode `{other}` (expected auto, native or generic)"),
    }
}

/// The agent: load, attach, apply, serve the CLI, keep the maps in step, stop on a signal.
async fn run(config: Config, keep_attached: bool) -> Result<()> {
    let node = config.node.clone();
    let health_settings = config.health.clone();
    let mut balancer = Balancer::load(&node.bpffs_dir, node.conntrack_size)
        .with_context(|| format!("loading the balancer (maps pinned in {})", node.bpffs_dir.display()))?;
    // Block/allow lists and the SYN limit are in place before the program sees traffic.
    let edge = mxlb::edge::restore(&config, &mut mxlb::maps::EdgeMaps::open_pinned(&node.bpffs_dir)?)
        .context("restoring edge protection")?;
    info!(?edge, "edge protection restored");
    let mut attached = Vec::new();
    for iface in &node.interfaces {
        match balancer.attach(iface, node.xdp_mode) {
            Ok(how) => {
                info!(%iface, mode = ?how, "balancer attached");
                attached.push(iface.clone());
            }
            Err(e) => {
                for done in &attached {
                    let _ = balancer.detach(done);
                }
                return Err(e).with_context(|| format!("attaching to {iface}"));
            }
        }
    }
    let maps = DataplaneMaps::open_pinned(&node.bpffs_dir)?;
    let vrrp_config = config.clone();
    let mut controller = Controller::open(config, Some(maps))?;
    let report = controller.refresh().await.context("applying the configuration to the maps")?;
    info!(?report, "configuration applied");
    let controller = Arc::new(Mutex::new(controller));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // The services on local VIPs (the mailbox map, the relay). If one cannot start, stop
    // what started and take the programs off the interfaces again.
    let services = controller.lock().await.desired().config.clone();
    let started = async {
        let mailboxes = mxlb::mailbox::service::start(&services, controller.clone(), stop_rx.clone())
            .context("starting the mailbox map")?;
        let directory = mailboxes.as_ref().map(|m| m.directory.clone());
        let relay = mxlb::relay::service::start(&services, controller.clone(), directory.clone(), stop_rx.clone())
            .await
            .context("starting the relay")?;
        // The POP3/IMAP proxy, on the ports of its VIP the relay leaves to it.
        let proxy = match directory {
            Some(d) => mxlb::proxy::start(&services, d, stop_rx.clone()).context("starting the POP3/IMAP proxy")?,
            None => None,
        };
        anyhow::Ok(control::Services { relay, mailboxes, proxy })
    };
    let services = match started.await {
        Ok(s) => s,
        Err(e) => {
            let _ = stop_tx.send(true);
            for iface in &attached {
                let _ = balancer.detach(iface);
            }
            return Err(e);
        }
    };
    let control::Services { relay, mailboxes, proxy } = services.clone();
    let server = tokio::spawn(control::serve(
        node.control_socket.clone(),
        controller.clone(),
        services,
        wait_stop(stop_rx.clone()),
    ));
    // Neighbours change (a back-end replaced, a MAC learned late): re-read every few seconds.
    let refresher = {
        let controller = controller.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = rx.changed() => break,
                    _ = tick.tick() => {
                        // Look up outside the lock: CLI changes are not held up meanwhile.
                        let observation = controller.lock().await.observation();
                        let observed = observation.observe().await;
                        if let Err(e) = controller.lock().await.apply_observed(observed) {
                            warn!(error = %e, "refresh failed");
                        }
                    }
                }
            }
        })
    };
    // The tempfail responder for shedding VIPs (implicit-TLS ports have no certificate to answer
    // with: their shed connections are refused, which clients also treat as "try later").
    let shed_listeners: Vec<(std::net::SocketAddr, mxlb::health::CheckKind)> = {
        let c = controller.lock().await;
        c.desired()
            .config
            .vips
            .iter()
            .filter(|v| v.shed && v.mode != ForwardingMode::Local)
            .flat_map(|v| v.ports.iter().map(move |p| (v.address, *p)))
            .filter(|(_, p)| ![465, 993, 995].contains(p))
            .map(|(a, p)| (std::net::SocketAddr::new(a, p), mxlb::health::CheckKind::default_for_port(p)))
            .collect()
    };
    let shed = tokio::spawn(mxlb::shed::serve(shed_listeners, wait_stop(stop_rx.clone())));
    // VRRP: the VIPs of `[[vrrp]]` instances stay on standby until this node is master.
    let vrrp = match mxlb::vrrp::runner::start(vrrp_config, controller.clone(), stop_rx.clone()).await {
        Ok(v) => v,
        Err(e) => {
            // A node that cannot take part in VRRP must not keep half a service up.
            let _ = stop_tx.send(true);
            for iface in &attached {
                let _ = balancer.detach(iface);
            }
            return Err(e).context("setting up VRRP");
        }
    };
    let metrics = {
        let mut m = mxlb::metrics::Metrics::new();
        if let Some(r) = &relay {
            m.register_relay(r.clone());
        }
        if let Some(p) = &proxy {
            m.register_proxy(p.clone());
        }
        Arc::new(m)
    };
    let prober = tokio::spawn(mxlb::prober::run(controller.clone(), health_settings, metrics.clone(), stop_rx.clone()));
    let metrics_server = node.metrics_listen.map(|addr| {
        tokio::spawn(mxlb::metrics::serve(addr, metrics.clone(), controller.clone(), wait_stop(stop_rx.clone())))
    });
    // SIGHUP re-reads the relay's mailbox list (as `mxlb queue reload` does) and the mailbox
    // table (as `mxlb mailbox reload`).
    let reloader = (relay.is_some() || mailboxes.is_some()).then(|| {
        let (relay, mailboxes, mut rx) = (relay.clone(), mailboxes.clone(), stop_rx.clone());
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else { return };
            loop {
                tokio::select! {
                    _ = rx.changed() => break,
                    _ = hup.recv() => {
                        match relay.as_ref().map(|r| r.reload()) {
                            Some(Ok(m)) => info!(%m, "SIGHUP: mailbox list re-read"),
                            Some(Err(e)) => warn!(error = %e, "SIGHUP: mailbox list not re-read; the old one stays in force"),
                            None => {}
                        }
                        match mailboxes.as_ref().map(|m| m.directory.reload()) {
                            Some(Ok(n)) => info!(entries = n, "SIGHUP: mailbox table re-read"),
                            Some(Err(e)) => warn!(error = %e, "SIGHUP: mailbox table not re-read; the old one stays in force"),
                            None => {}
                        }
                    }
                }
            }
        })
    });
    info!(socket = %node.control_socket.display(), "mxlb running; SIGTERM or SIGINT stops it");
    shutdown_signal().await?;
    info!("stopping");
    let _ = stop_tx.send(true);
    // VRRP first: the priority-0 goodbye and the VIPs' release happen while the data path
    // still runs, so the backup takes over within Skew_Time.
    if tokio::task::spawn_blocking(move || vrrp.join()).await.map_or(true, |r| r.is_err()) {
        warn!("the vrrp thread ended abnormally");
    }
    if let Some(r) = &relay {
        // Sessions finish their transaction, delivery its attempts in progress.
        r.stopped().await;
    }
    if let Some(p) = &proxy {
        p.stopped().await;
    }
    if let Some(t) = reloader {
        let _ = t.await;
    }
    let _ = refresher.await;
    let _ = prober.await;
    let _ = shed.await;
    if let Some(m) = metrics_server {
        match m.await {
            Ok(Err(e)) => warn!(error = %e, "metrics server"),
            Err(e) => warn!(error = %e, "metrics task"),
            Ok(Ok(())) => {}
        }
    }
    match server.await {
        Ok(Err(e)) => warn!(error = %e, "control socket"),
        Err(e) => warn!(error = %e, "control task"),
        Ok(Ok(())) => {}
    }
    if keep_attached {
        info!("leaving the balancer attached (--keep-attached); maps stay pinned");
    } else {
        for iface in &attached {
            balancer.detach(iface).with_context(|| format!("detaching from {iface}"))?;
            info!(%iface, "balancer detached");
        }
    }
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT: the one shutdown signal.
async fn shutdown_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}
