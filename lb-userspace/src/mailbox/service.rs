//! The mailbox map inside `mxlb run`: built once from `[mailbox]`, kept fed with the prober's
//! verdicts and the back-ends' lists, and answering `mxlb mailbox ...` over the control
//! socket.
use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

use super::{BackendReport, Directory, MailboxEntry, MailboxError, learn};
use crate::{config::Config, control::Controller, desired::Health};

/// `mxlb mailbox ...` as sent over the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum MailboxAction {
    Where { mailbox: String },
    Move { mailbox: String, backend: String },
    List,
    Refresh,
    Reload,
}

/// `mxlb mailbox list --json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MailboxListing {
    pub mailboxes: Vec<MailboxEntry>,
    pub backends: Vec<BackendReport>,
}

/// The running map and its refresher.
pub struct MailboxService {
    pub directory: Arc<Directory>,
    refresher: learn::Refresher,
}

/// Builds the map of `config` (if it has `[mailbox]`) and starts its tasks: the list refresher
/// and the copy of the prober's verdicts ([`crate::control::follow`]).
pub fn start(
    config: &Config,
    controller: Arc<Mutex<Controller>>,
    stop: watch::Receiver<bool>,
) -> Result<Option<Arc<MailboxService>>, MailboxError> {
    let Some(m) = &config.mailbox else { return Ok(None) };
    let directory = Arc::new(m.directory(config)?);
    let refresher = learn::Refresher::default();
    tokio::spawn(learn::run(directory.clone(), refresher.clone(), stop.clone()));
    let followed = directory.clone();
    crate::control::follow(controller, stop, move |c| {
        for b in followed.backends() {
            followed.set_health(&b.name, c.probed_health(&b.name) == Health::Up);
        }
    });
    Ok(Some(Arc::new(MailboxService { directory, refresher })))
}

impl MailboxService {
    /// Answers one control request (the message is JSON for `where`, `move` and `list`).
    pub async fn handle(&self, action: MailboxAction) -> Result<String, String> {
        match action {
            MailboxAction::Where { mailbox } => Ok(json(&self.directory.whereabouts(&mailbox))),
            MailboxAction::Move { mailbox, backend } => {
                let d = self.directory.clone();
                let owner = tokio::task::spawn_blocking(move || d.move_mailbox(&mailbox, &backend))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                Ok(json(&owner))
            }
            MailboxAction::List => Ok(json(&listing(&self.directory))),
            MailboxAction::Refresh => {
                if !self.directory.learning() {
                    return Err("no [mailbox] back-end has an agent_port: there are no lists to fetch".into());
                }
                let wait = self.directory.fetch_timeout + Duration::from_secs(1);
                if !self.refresher.now(wait).await {
                    return Err("the refresh did not complete in time".into());
                }
                let failed: Vec<String> = self
                    .directory
                    .reports()
                    .into_iter()
                    .filter_map(|r| r.last_error.map(|e| format!("{}: {e}", r.backend)))
                    .collect();
                match failed.is_empty() {
                    true => Ok(format!("{} mailboxes known", self.directory.list().len())),
                    false => Err(format!("not fetched (the last list stays in use): {}", failed.join("; "))),
                }
            }
            MailboxAction::Reload => {
                let d = self.directory.clone();
                let n = tokio::task::spawn_blocking(move || d.reload()).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
                Ok(format!("mailbox table: {n} entries"))
            }
        }
    }
}

/// Every mailbox and the refresh state of every back-end.
pub fn listing(directory: &Directory) -> MailboxListing {
    MailboxListing { mailboxes: directory.list(), backends: directory.reports() }
}

/// The answers are plain data: serialising them cannot fail.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
