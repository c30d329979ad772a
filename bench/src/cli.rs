//! Command line.
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Full SMTP transactions: EHLO, MAIL, RCPT×n, DATA, QUIT.
    Smtp,
    /// POP3: USER/PASS, STAT, RETR 1 … RETR N (`--fetch`), QUIT (the mailbox must hold N
    /// messages).
    Pop3,
    /// IMAP: LOGIN, SELECT INBOX, FETCH 1:N (BODY.PEEK[]) (`--fetch`), LOGOUT (the mailbox must
    /// hold N messages).
    Imap,
    /// TCP connect and close only.
    Connect,
}

impl Mode {
    pub fn default_port(self) -> u16 {
        match self {
            Mode::Smtp | Mode::Connect => 25,
            Mode::Pop3 => 110,
            Mode::Imap => 143,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Smtp => "smtp",
            Mode::Pop3 => "pop3",
            Mode::Imap => "imap",
            Mode::Connect => "connect",
        }
    }
}

/// Load generator for mail services: SMTP, POP3, IMAP sessions or bare TCP connects, closed
/// loop (N concurrent sessions) or open loop (a target rate of session starts), with latency
/// percentiles per phase and errors counted by kind.
///
/// Exit status: 0 when every session succeeded, 3 when any failed (the report says how), 1 on
/// a usage or setup error.
#[derive(Debug, Parser)]
#[command(name = "mxlb-bench", version)]
pub struct Args {
    /// What each session does.
    pub mode: Mode,
    /// Server address, HOST[:PORT] (the port defaults to the mode's: 25, 110, 143).
    pub target: String,

    /// Closed loop: this many sessions run at all times, each starting when one ends.
    #[arg(short = 'c', long, default_value_t = 10, conflicts_with = "rate")]
    pub concurrency: usize,
    /// Open loop: start sessions at this rate (per second) whatever their latency; latency
    /// is measured from each session's scheduled start.
    #[arg(short = 'r', long)]
    pub rate: Option<f64>,
    /// Open loop: at most this many sessions in flight; a start due beyond it is not made and
    /// is counted as an `in_flight_cap` error.
    #[arg(long, default_value_t = 1000)]
    pub max_in_flight: usize,

    /// Stop after this many measured sessions (default 1000 when --duration is not given).
    #[arg(short = 'n', long)]
    pub count: Option<u64>,
    /// Stop starting sessions after this many seconds of measurement.
    #[arg(short = 'd', long, value_parser = parse_secs)]
    pub duration: Option<Duration>,
    /// Run this many seconds before measuring (their sessions are not counted).
    #[arg(short = 'w', long, value_parser = parse_secs, default_value = "0")]
    pub warmup: Duration,
    /// Bound on each wait: connect, each reply line, each write (seconds).
    #[arg(short = 't', long, value_parser = parse_secs, default_value = "10")]
    pub timeout: Duration,

    /// SMTP: EHLO name.
    #[arg(long, default_value = "mxlb-bench.example")]
    pub helo: String,
    /// SMTP: envelope sender.
    #[arg(long, default_value = "sender@example.com")]
    pub from: String,
    /// SMTP: envelope recipient (numbered 1…n when --rcpts > 1).
    #[arg(long, default_value = "rcpt@example.net")]
    pub to: String,
    /// SMTP: recipients per message.
    #[arg(long, default_value_t = 1)]
    pub rcpts: u32,
    /// SMTP: message size in bytes (headers included).
    #[arg(short = 's', long, default_value_t = 1024)]
    pub size: usize,
    /// SMTP: messages per connection.
    #[arg(short = 'm', long, default_value_t = 1)]
    pub messages: u32,

    /// POP3/IMAP: user name.
    #[arg(long, default_value = "bench")]
    pub user: String,
    /// POP3/IMAP: password.
    #[arg(long, default_value = "bench")]
    pub pass: String,
    /// POP3/IMAP: an account, USER:PASS (split at the first `:`, so a password may contain
    /// one). Repeat it and the sessions take the accounts in turn (round robin), so the load
    /// reaches every mailbox, and every back-end of a cluster that partitions them. Replaces
    /// --user/--pass.
    #[arg(long = "account", value_name = "USER:PASS", value_parser = parse_account)]
    pub accounts: Vec<Account>,
    /// POP3/IMAP: sessions of USER connect to HOST[:PORT] instead of the target (e.g. each user
    /// straight to the back-end holding the mailbox, for a baseline without a proxy). Repeat
    /// it per user.
    #[arg(long = "user-target", value_name = "USER=HOST[:PORT]", value_parser = parse_user_target)]
    pub user_targets: Vec<(String, String)>,
    /// POP3/IMAP: messages each session retrieves: POP3 RETR 1 … RETR N, one command each;
    /// IMAP one FETCH 1:N.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub fetch: u32,
    /// POP3/IMAP: every retrieved message must be exactly this many bytes as received (CRLFs
    /// included, POP3 dot-stuffing removed); another size fails the session (`protocol`).
    #[arg(long, value_name = "BYTES")]
    pub expect_size: Option<u64>,

    /// Runtime threads. One (the default) behaves like smtp-source, a single process: on a
    /// small machine shared with the server, more threads mostly add scheduling noise. Raise
    /// it when the generator itself is the bottleneck (a thread near 100% CPU).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,

    /// Print the results as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// No progress bar (there is none anyway when stderr is not a terminal).
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// A POP3/IMAP login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub user: String,
    pub pass: String,
}

impl Args {
    /// The accounts sessions log in with: `--account`s, else `--user`/`--pass`.
    pub fn accounts(&self) -> Vec<Account> {
        if self.accounts.is_empty() {
            vec![Account { user: self.user.clone(), pass: self.pass.clone() }]
        } else {
            self.accounts.clone()
        }
    }
}

fn parse_account(s: &str) -> Result<Account, String> {
    match s.split_once(':') {
        Some((user, pass)) if !user.is_empty() => Ok(Account { user: user.into(), pass: pass.into() }),
        _ => Err(format!("{s:?}: expected USER:PASS")),
    }
}

fn parse_user_target(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((user, addr)) if !user.is_empty() && !addr.is_empty() => Ok((user.into(), addr.into())),
        _ => Err(format!("{s:?}: expected USER=HOST[:PORT]")),
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Duration::try_from_secs_f64(v).map_err(|e| format!("{s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let a = Args::try_parse_from([
            "mxlb-bench",
            "smtp",
            "10.0.0.1:25",
            "-c",
            "20",
            "-n",
            "2000",
            "-t",
            "2.5",
        ])
        .unwrap();
        assert_eq!(
            (a.mode, a.concurrency, a.count, a.timeout),
            (Mode::Smtp, 20, Some(2000), Duration::from_millis(2500))
        );
        assert!(Args::try_parse_from(["mxlb-bench", "smtp", "x", "-c", "2", "-r", "5"]).is_err());
        assert!(Args::try_parse_from(["mxlb-bench", "smtp", "x", "-d", "-1"]).is_err());
        // Without --account: one account from --user/--pass; --fetch defaults to 1.
        let a = Args::try_parse_from(["mxlb-bench", "pop3", "x", "--user", "u", "--pass", "p"]).unwrap();
        assert_eq!(a.accounts(), vec![Account { user: "u".into(), pass: "p".into() }]);
        assert_eq!((a.fetch, a.expect_size), (1, None));
        assert!(Args::try_parse_from(["mxlb-bench", "pop3", "x", "--fetch", "0"]).is_err());
        use clap::CommandFactory as _;
        Args::command().debug_assert();
    }

    #[test]
    fn accounts_and_user_targets() {
        let a = Args::try_parse_from([
            "mxlb-bench",
            "imap",
            "10.0.0.1",
            "--account",
            "alice:alice-pw",
            "--account",
            "bob:bob pw:with colon",
            "--user-target",
            "alice=10.0.0.11:143",
            "--fetch",
            "20",
            "--expect-size",
            "8192",
        ])
        .unwrap();
        assert_eq!(
            a.accounts(),
            vec![
                Account { user: "alice".into(), pass: "alice-pw".into() },
                Account { user: "bob".into(), pass: "bob pw:with colon".into() },
            ]
        );
        assert_eq!(a.user_targets, vec![("alice".to_string(), "10.0.0.11:143".to_string())]);
        assert_eq!((a.fetch, a.expect_size), (20, Some(8192)));
        assert!(Args::try_parse_from(["mxlb-bench", "imap", "x", "--account", "nopass"]).is_err());
        assert!(Args::try_parse_from(["mxlb-bench", "imap", "x", "--account", ":p"]).is_err());
        assert!(Args::try_parse_from(["mxlb-bench", "imap", "x", "--user-target", "alice"]).is_err());
    }
}
