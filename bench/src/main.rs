//! mxlb-bench: load generator for mail services (SMTP, POP3, IMAP, TCP connect), used to
//! measure mxlb and the clusters behind it. See `mxlb-bench --help`.
mod accounts;
mod cli;
mod load;
mod proto;
mod report;
mod session;
mod stats;

use std::{
    io::IsTerminal as _,
    net::SocketAddr,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Parser as _;

use accounts::{Rotation, routes};
use cli::{Args, Mode};
use load::{DialogueFactory, Plan, SessionPlan, Shape};
use proto::{Dialogue, Fetch, imap::Imap, pop3::Pop3, smtp};

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(args) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(3),
        Err(e) => {
            eprintln!("mxlb-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Resolves HOST[:PORT], defaulting the port to the mode's.
async fn resolve(target: &str, port: u16) -> Result<SocketAddr> {
    if let Ok(a) = target.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = target.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let with_port = if target.contains(':') {
        target.to_string()
    } else {
        format!("{target}:{port}")
    };
    tokio::net::lookup_host(&with_port)
        .await
        .with_context(|| format!("resolving {with_port}"))?
        .next()
        .with_context(|| format!("{with_port} has no address"))
}

/// Each session's plan, and the report's target text. POP3/IMAP sessions rotate over the
/// accounts (see `accounts.rs`), each to its own target if it has one.
async fn factory(args: &Args, target: SocketAddr) -> Result<(DialogueFactory, String)> {
    let single = |f: Arc<dyn Fn() -> Option<Box<dyn Dialogue>> + Send + Sync>| -> DialogueFactory {
        Arc::new(move || SessionPlan { target, dialogue: f() })
    };
    let mode = args.mode;
    let rotation = match mode {
        Mode::Connect => return Ok((single(Arc::new(|| None)), target.to_string())),
        Mode::Smtp => {
            let p = smtp::SmtpParams {
                helo: args.helo.clone(),
                from: args.from.clone(),
                to: args.to.clone(),
                rcpts: args.rcpts.max(1),
                messages: args.messages.max(1),
                body: Arc::new(smtp::make_body(args.size, &args.from, &args.to)),
            };
            let f = single(Arc::new(move || Some(Box::new(smtp::Smtp::new(p.clone())) as Box<dyn Dialogue>)));
            return Ok((f, target.to_string()));
        }
        Mode::Pop3 | Mode::Imap => {
            let mut user_targets = Vec::new();
            for (user, addr) in &args.user_targets {
                user_targets.push((user.clone(), resolve(addr, mode.default_port()).await?));
            }
            let r = routes(&args.accounts(), &user_targets, target).map_err(anyhow::Error::msg)?;
            Rotation::new(r).context("no account")?
        }
    };
    let text = rotation.targets_text();
    let fetch = Fetch { count: args.fetch.max(1), expect_size: args.expect_size };
    let f: DialogueFactory = Arc::new(move || {
        let r = rotation.next();
        let (u, p) = (&r.account.user, &r.account.pass);
        let dialogue: Box<dyn Dialogue> = if mode == Mode::Pop3 {
            Box::new(Pop3::with_fetch(u, p, fetch))
        } else {
            Box::new(Imap::with_fetch(u, p, fetch))
        };
        SessionPlan { target: r.target, dialogue: Some(dialogue) }
    });
    Ok((f, text))
}

/// A progress bar on stderr, only when it is a terminal (and not `--quiet`), updated from the
/// shared counter five times a second.
fn progress(
    args: &Args,
    count: Option<u64>,
    done: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if args.quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match count {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:40}] {pos}/{len} sessions {per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(tokio::spawn(async move {
        loop {
            bar.set_position(done.load(Relaxed));
            if stop.load(Relaxed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bar.finish_and_clear();
    }))
}

fn real_main(args: Args) -> Result<u64> {
    if let Some(r) = args.rate
        && !(r.is_finite() && r > 0.0)
    {
        bail!("--rate must be positive");
    }
    let count = match (args.count, args.duration) {
        (None, None) => Some(1000),
        (c, _) => c,
    };
    let rt = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .context("tokio runtime")?;
    rt.block_on(async {
        let target = resolve(&args.target, args.mode.default_port()).await?;
        let plan = Plan {
            shape: match args.rate {
                Some(rate) => Shape::Open {
                    rate,
                    max_in_flight: args.max_in_flight.max(1),
                },
                None => Shape::Closed {
                    concurrency: args.concurrency.max(1),
                },
            },
            count,
            duration: args.duration,
            warmup: args.warmup,
            op_timeout: args.timeout,
        };
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let bar = progress(&args, count, done.clone(), stop.clone());
        let (make, target_text) = factory(&args, target).await?;
        let res = load::run(plan, make, done).await;
        stop.store(true, Relaxed);
        if let Some(b) = bar {
            let _ = b.await;
        }
        let concurrency = args.rate.is_none().then_some(args.concurrency.max(1));
        let rep = report::Report::new(
            args.mode.name(),
            target_text,
            concurrency,
            args.rate,
            &res.stats,
            res.elapsed,
        );
        if args.json {
            println!("{}", rep.json());
        } else {
            print!("{}", rep.table());
        }
        Ok(res.stats.error_total())
    })
}
