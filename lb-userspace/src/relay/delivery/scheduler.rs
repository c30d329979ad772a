//! The delivery loop: which message goes when.
//!
//! Work is cut into jobs of (message, recipient domain). Each domain has its own ready queue
//! and at most [`Settings::domain_concurrency`] jobs in flight, so a domain whose mailboxes
//! are slow or whose owner back-end is down only delays itself. Within a job, recipients are
//! routed and those going to the same back-end share one transaction (recipients of one message
//! in *different* domains therefore travel in separate transactions: the price of isolating
//! domains). Recipients not yet due wait on a timer heap keyed by their `next_attempt`.
//!
//! One task owns the queue state; jobs run as separate tasks and send their outcomes back.
//! Outcomes are applied and persisted (bounce first, then the new states) by the owner task
//! in arrival order, so two jobs of one message cannot write its envelope out of order.
use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::{
    Backends, Command, QueueStore, Settings,
    client::{Outcome, Transaction, XclientInfo},
    conn::{PoolSettings, Pools},
    dsn::{self, FailedRcpt},
    policy,
    reply::Reply,
    route::{self, Backend, Route},
};
use crate::relay::{Envelope, MessageId, RcptState, unix_now};

struct Ctx {
    settings: Settings,
    store: Arc<dyn QueueStore>,
    backends: Arc<dyn Backends>,
    pools: Pools,
}

/// One recipient's outcome from a job, with the back-end that gave it.
type Outcomes = Vec<(usize, Outcome, Option<String>)>;

struct JobResult {
    id: MessageId,
    domain: String,
    outcomes: Outcomes,
}

struct Msg {
    env: Envelope,
    /// Domains with a job in flight.
    busy: HashSet<String>,
    /// Domains waiting in a ready queue.
    queued: HashSet<String>,
}

#[derive(Default)]
struct Domain {
    ready: VecDeque<MessageId>,
    active: usize,
}

#[derive(Default)]
struct Queue {
    msgs: HashMap<MessageId, Msg>,
    timers: BinaryHeap<Reverse<(u64, MessageId)>>,
    domains: HashMap<String, Domain>,
    active: usize,
}

/// The recipient domain, lower-cased: the unit of queueing.
fn domain_of(address: &str) -> String {
    address.rsplit_once('@').map(|(_, d)| d.to_lowercase()).unwrap_or_default()
}

fn due_at(state: &RcptState) -> Option<u64> {
    match state {
        RcptState::Pending { next_attempt, .. } => Some(*next_attempt),
        _ => None,
    }
}

impl Queue {
    fn admit(&mut self, env: Envelope, now: u64) {
        if env.is_done() || self.msgs.contains_key(&env.id) {
            return;
        }
        let id = env.id.clone();
        self.msgs.insert(id.clone(), Msg { env, busy: HashSet::new(), queued: HashSet::new() });
        self.schedule(&id, now);
    }

    /// Puts the message's due domains in their ready queues and sets a timer for the rest.
    fn schedule(&mut self, id: &MessageId, now: u64) {
        let Some(m) = self.msgs.get_mut(id) else {
            return;
        };
        let mut due = BTreeSet::new();
        let mut later: Option<u64> = None;
        for r in &m.env.rcpts {
            let Some(at) = due_at(&r.state) else { continue };
            let d = domain_of(&r.address);
            if m.busy.contains(&d) || m.queued.contains(&d) {
                continue;
            }
            if at <= now {
                due.insert(d);
            } else {
                later = Some(later.map_or(at, |l| l.min(at)));
            }
        }
        for d in due {
            m.queued.insert(d.clone());
            self.domains.entry(d).or_default().ready.push_back(id.clone());
        }
        if let Some(at) = later {
            self.timers.push(Reverse((at, id.clone())));
        }
    }

    fn fire_timers(&mut self, now: u64) {
        while let Some(Reverse((at, _))) = self.timers.peek()
            && *at <= now
        {
            if let Some(Reverse((_, id))) = self.timers.pop() {
                self.schedule(&id, now);
            }
        }
    }

    fn next_timer(&self) -> Option<u64> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Jobs that may start now: (envelope snapshot, domain, recipient indices).
    fn take_jobs(&mut self, limit: usize, now: u64) -> Vec<(Envelope, String, Vec<usize>)> {
        let mut jobs = Vec::new();
        for (d, dom) in &mut self.domains {
            while dom.active < limit.max(1) {
                let Some(id) = dom.ready.pop_front() else {
                    break;
                };
                let Some(m) = self.msgs.get_mut(&id) else {
                    continue;
                };
                if !m.queued.remove(d) {
                    continue;
                }
                let idxs: Vec<usize> = (m.env.rcpts.iter().enumerate())
                    .filter(|(_, r)| domain_of(&r.address) == *d && due_at(&r.state).is_some_and(|at| at <= now))
                    .map(|(i, _)| i)
                    .collect();
                if idxs.is_empty() {
                    continue;
                }
                m.busy.insert(d.clone());
                dom.active += 1;
                self.active += 1;
                jobs.push((m.env.clone(), d.clone(), idxs));
            }
        }
        self.domains.retain(|_, dom| dom.active > 0 || !dom.ready.is_empty());
        jobs
    }

    /// Applies a job's outcomes; returns what to persist (the envelope and new bounces).
    fn finish(&mut self, res: JobResult, now: u64, retry: &policy::RetryPolicy) -> Option<(Envelope, Vec<FailedRcpt>)> {
        self.active = self.active.saturating_sub(1);
        if let Some(dom) = self.domains.get_mut(&res.domain) {
            dom.active = dom.active.saturating_sub(1);
        }
        let m = self.msgs.get_mut(&res.id)?;
        m.busy.remove(&res.domain);
        let mut failed = Vec::new();
        for (i, outcome, backend) in &res.outcomes {
            failed.extend(policy::apply(&mut m.env, *i, outcome, backend.as_deref(), now, retry));
        }
        let env = m.env.clone();
        if env.is_done() {
            self.msgs.remove(&res.id);
        }
        (!res.outcomes.is_empty()).then_some((env, failed))
    }
}

pub(super) async fn run(
    settings: Settings,
    store: Arc<dyn QueueStore>,
    backends: Arc<dyn Backends>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut stop: watch::Receiver<bool>,
) {
    let pools = Pools::new(PoolSettings {
        protocol: settings.protocol,
        helo_name: settings.helo_name.clone(),
        xclient: settings.xclient,
        timeouts: settings.timeouts,
        max_connections: settings.connections_per_backend,
        max_messages: settings.messages_per_connection,
        idle_timeout: settings.idle_timeout,
    });
    let ctx = Arc::new(Ctx { settings, store, backends, pools });
    let mut q = Queue::default();
    for env in load_queue(&ctx.store).await {
        q.admit(env, unix_now());
    }
    info!(messages = q.msgs.len(), "delivery started");
    let (results_tx, mut results) = mpsc::unbounded_channel::<JobResult>();
    let mut sweep = tokio::time::interval((ctx.settings.idle_timeout / 2).max(Duration::from_secs(1)));
    let mut stopping = *stop.borrow();
    loop {
        let now = unix_now();
        if !stopping {
            q.fire_timers(now);
            for (env, domain, idxs) in q.take_jobs(ctx.settings.domain_concurrency, now) {
                let (ctx, tx, stop) = (ctx.clone(), results_tx.clone(), stop.clone());
                tokio::spawn(async move {
                    let id = env.id.clone();
                    let outcomes = job(&ctx, env, idxs, stop).await;
                    let _ = tx.send(JobResult { id, domain, outcomes });
                });
            }
        }
        if stopping && q.active == 0 {
            break;
        }
        let wait =
            q.next_timer().map_or(Duration::from_secs(3600), |at| Duration::from_secs(at.saturating_sub(now).max(1)));
        tokio::select! {
            Some(cmd) = commands.recv(), if !stopping => match cmd {
                Command::Submit(id) => {
                    if !q.msgs.contains_key(&id) {
                        let store = ctx.store.clone();
                        let lookup = id.clone();
                        match tokio::task::spawn_blocking(move || store.envelope(&lookup)).await {
                            Ok(Ok(env)) => q.admit(env, unix_now()),
                            Ok(Err(e)) => error!(%id, error = %e, "cannot read a submitted message; it is delivered after the next restart"),
                            Err(e) => error!(%id, error = %e, "envelope read task failed"),
                        }
                    }
                }
                Command::RetryNow(id) => {
                    if let Some(m) = q.msgs.get_mut(&id) {
                        for r in &mut m.env.rcpts {
                            if let RcptState::Pending { next_attempt, .. } = &mut r.state {
                                *next_attempt = 0;
                            }
                        }
                        q.schedule(&id, unix_now());
                    }
                }
                Command::Forget(id) => {
                    q.msgs.remove(&id);
                }
            },
            Some(res) = results.recv() => {
                if let Some((env, failed)) = q.finish(res, unix_now(), &ctx.settings.retry) {
                    if let Some(bounce) = persist(&ctx, env.clone(), failed).await
                        && !stopping
                    {
                        q.admit(bounce, unix_now());
                    }
                    if !stopping {
                        q.schedule(&env.id, unix_now());
                    }
                }
            }
            _ = tokio::time::sleep(wait), if !stopping => {}
            changed = stop.changed(), if !stopping => {
                stopping = changed.is_err() || *stop.borrow();
                if stopping {
                    info!(in_flight = q.active, "delivery stopping");
                }
            }
            _ = sweep.tick() => ctx.pools.close_idle().await,
        }
    }
    ctx.pools.close_all().await;
    info!("delivery stopped");
}

/// Every envelope in the store; unreadable ones are logged and left for the next start.
async fn load_queue(store: &Arc<dyn QueueStore>) -> Vec<Envelope> {
    let store = store.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let ids = match store.ids() {
            Ok(ids) => ids,
            Err(e) => {
                error!(error = %e, "cannot list the queue; delivering only new messages");
                return Vec::new();
            }
        };
        ids.into_iter()
            .filter_map(|id| match store.envelope(&id) {
                Ok(env) => Some(env),
                Err(e) => {
                    error!(%id, error = %e, "cannot read a queued message; skipped");
                    None
                }
            })
            .collect()
    })
    .await;
    loaded.unwrap_or_default()
}

/// Queues the bounce (if any) and then records the new states: a crash in between sends a
/// bounce twice rather than never. Returns the bounce's envelope to schedule it.
async fn persist(ctx: &Arc<Ctx>, env: Envelope, failed: Vec<FailedRcpt>) -> Option<Envelope> {
    let (store, mta) = (ctx.store.clone(), ctx.settings.helo_name.clone());
    let done = tokio::task::spawn_blocking(move || {
        let mut bounce = None;
        if !failed.is_empty() && !env.mail_from.is_empty() {
            let content = match store.load(&env.id) {
                Ok((_, content)) => content,
                Err(e) => {
                    warn!(id = %env.id, error = %e, "cannot read the original for its bounce; sending it without headers");
                    Vec::new()
                }
            };
            if let Some((benv, bcontent)) = dsn::build(&mta, &env, &failed, &content, unix_now()) {
                match store.enqueue(&benv, &bcontent) {
                    Ok(()) => {
                        info!(id = %env.id, bounce = %benv.id, to = %env.mail_from, "bounce queued");
                        bounce = Some(benv);
                    }
                    Err(e) => error!(id = %env.id, error = %e, "cannot queue a bounce; the sender will not be told"),
                }
            }
        }
        if let Err(e) = store.record(&env) {
            error!(id = %env.id, error = %e, "cannot record delivery results; recipients may be delivered again after a restart");
        }
        bounce
    })
    .await;
    done.ok().flatten()
}

/// One attempt for some recipients (one domain) of a message.
async fn job(ctx: &Arc<Ctx>, env: Envelope, idxs: Vec<usize>, mut stop: watch::Receiver<bool>) -> Outcomes {
    let deferred = |text: String| Outcome::Deferred(Reply::local(451, text));
    let store = ctx.store.clone();
    let id = env.id.clone();
    let content = match tokio::task::spawn_blocking(move || store.load(&id)).await {
        Ok(Ok((_, content))) => content,
        Ok(Err(e)) => {
            return idxs
                .into_iter()
                .map(|i| (i, deferred(format!("4.3.0 cannot read the queued message: {e}")), None))
                .collect();
        }
        Err(e) => {
            return idxs.into_iter().map(|i| (i, deferred(format!("4.3.0 internal: {e}")), None)).collect();
        }
    };
    let snapshot = ctx.backends.snapshot();
    let mut out = Vec::new();
    let mut groups: BTreeMap<String, (Backend, Vec<usize>)> = BTreeMap::new();
    for i in idxs {
        let Some(r) = env.rcpts.get(i) else { continue };
        let attempts = match r.state {
            RcptState::Pending { attempts, .. } => attempts,
            _ => continue,
        };
        let key = format!("{}:{attempts}", env.id);
        match route::route(&ctx.settings.routing, &snapshot, &r.address, &key) {
            Route::To(b) => groups.entry(b.name.clone()).or_insert_with(|| (b.clone(), Vec::new())).1.push(i),
            Route::Wait(why) => {
                info!(id = %env.id, rcpt = %r.address, reason = %why, "deferred");
                out.push((i, deferred(format!("4.4.1 {why}")), None));
            }
        }
    }
    let xclient = XclientInfo { addr: Some(env.client.addr.ip()), helo: env.client.helo.clone() };
    for (name, (backend, is)) in groups {
        if *stop.borrow() {
            break;
        }
        let t = Transaction {
            mail_from: env.mail_from.clone(),
            rcpts: is.iter().filter_map(|&i| env.rcpts.get(i).map(|r| r.address.clone())).collect(),
            eight_bit: env.eight_bit,
            smtputf8: env.smtputf8,
            size: content.len() as u64,
            xclient: Some(xclient.clone()),
        };
        let grace = ctx.settings.stop_grace;
        let abandon = async {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            finished = ctx.pools.deliver(&backend, t, &content) => {
                for (i, o) in is.into_iter().zip(finished.outcomes) {
                    let rcpt = env.rcpts.get(i).map_or("", |r| r.address.as_str());
                    let what = match &o {
                        Outcome::Delivered(_) => "delivered",
                        Outcome::Failed(_) => "failed",
                        Outcome::Deferred(_) => "deferred",
                    };
                    info!(id = %env.id, rcpt, backend = %name, reply = %o.reply(), "{what}");
                    out.push((i, o, Some(name.clone())));
                }
            }
            _ = abandon => {
                warn!(id = %env.id, backend = %name, "delivery stopping: transaction abandoned, its recipients stay queued");
                break;
            }
        }
    }
    debug!(id = %env.id, outcomes = out.len(), "job done");
    out
}
