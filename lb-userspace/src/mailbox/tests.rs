use std::{collections::HashMap, net::IpAddr, path::Path};

use super::*;

fn backends(spec: &[(&str, u32, bool)]) -> Vec<MailboxBackend> {
    spec.iter()
        .enumerate()
        .map(|(i, &(name, weight, agent))| MailboxBackend {
            name: name.into(),
            address: IpAddr::from([198, 18, 0, i as u8 + 10]),
            weight,
            agent: agent.then(|| SocketAddr::from(([198, 18, 0, i as u8 + 10], 5555))),
        })
        .collect()
}

fn scratch(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mxlb-mailbox-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn hashing_respects_weights_and_ignores_case() {
    let d = Directory::new(backends(&[("a", 1, false), ("b", 2, false), ("c", 1, false), ("z", 0, false)]), None).unwrap();
    let n = 40_000;
    let mut count: HashMap<String, usize> = HashMap::new();
    for i in 0..n {
        let o = d.owner(&format!("user{i}@example.org"));
        assert_eq!(o.source, Source::Hashed);
        *count.entry(o.backend).or_default() += 1;
    }
    for (name, share) in [("a", 0.25), ("b", 0.5), ("c", 0.25)] {
        let got = count.get(name).copied().unwrap_or(0) as f64 / n as f64;
        assert!((got - share).abs() < 0.02, "{name} got {got}, expected {share}");
    }
    assert!(!count.contains_key("z"), "weight 0 takes nothing");
    assert_eq!(d.owner(" U7@Example.ORG ").backend, d.owner("u7@example.org").backend);
}

#[test]
fn adding_a_back_end_only_moves_mailboxes_to_it_and_health_never_moves_them() {
    let three = Directory::new(backends(&[("a", 1, false), ("b", 1, false), ("c", 1, false)]), None).unwrap();
    let four = Directory::new(backends(&[("a", 1, false), ("b", 1, false), ("c", 1, false), ("e", 1, false)]), None).unwrap();
    let mut moved = 0;
    for i in 0..4000 {
        let m = format!("u{i}@example.org");
        let (before, after) = (three.owner(&m).backend, four.owner(&m).backend);
        if before != after {
            assert_eq!(after, "e");
            moved += 1;
        }
    }
    assert!((800..1200).contains(&moved), "about a quarter moves, got {moved}");
    let before = three.owner("u1@example.org");
    three.set_health(&before.backend, false);
    let after = three.owner("u1@example.org");
    assert_eq!(after.backend, before.backend, "a down owner stays the owner");
    assert!(!after.healthy);
}

#[test]
fn table_then_reports_then_hash() {
    let dir = scratch("order");
    let table = dir.join("mailboxes");
    let d = Directory::new(backends(&[("a", 1, true), ("b", 1, true), ("c", 1, true)]), Some(table.clone())).unwrap();
    let hashed = d.owner("carol@example.org").backend;
    let other = if hashed == "a" { "b" } else { "a" };
    d.set_reported(other, ["Carol@example.org".to_string()]);
    d.set_reported("c", Vec::<String>::new());
    let third = ["a", "b"].into_iter().find(|n| *n != other).unwrap();
    d.set_reported(third, Vec::<String>::new());
    let o = d.owner("carol@example.org");
    assert_eq!((o.backend.as_str(), o.source), (other, Source::Learned), "a report beats the hash");

    std::fs::write(&table, "# pinned\ncarol@example.org c   # VIP user\n").unwrap();
    assert_eq!(d.reload().unwrap(), 1);
    let o = d.owner("CAROL@example.org");
    assert_eq!((o.backend.as_str(), o.source), ("c", Source::Table), "the table beats a report");
    assert_eq!(d.whereabouts("carol@example.org").reported_by, vec![other.to_string()]);

    // A broken table keeps the old one and names file and line.
    std::fs::write(&table, "carol@example.org c\nbob@example.org nowhere\n").unwrap();
    let err = d.reload().unwrap_err().to_string();
    assert_eq!(err, format!("{}:2: no mailbox back-end is named `nowhere`", table.display()));
    assert_eq!(d.owner("carol@example.org").backend, "c");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn existence_needs_every_reporting_back_end_and_keeps_the_last_good_list() {
    let d = Directory::new(backends(&[("a", 1, true), ("b", 1, true), ("c", 1, false)]), None).unwrap();
    assert!(matches!(d.exists("x@example.org"), Existence::Unknown(w) if w.contains("a, b")));
    assert!(matches!(d.locate("x@example.org"), Located::Owner(_)), "unknown is not nowhere");
    d.set_reported("a", ["alice@example.org".to_string()]);
    assert!(matches!(d.exists("x@example.org"), Existence::Unknown(w) if w.ends_with("of b not fetched yet")));
    d.set_reported("b", ["bob@example.org".to_string()]);
    assert_eq!(d.exists("ALICE@example.org"), Existence::Exists);
    assert_eq!(d.exists("x@example.org"), Existence::Nowhere);
    assert_eq!(d.locate("x@example.org"), Located::NoSuchUser);
    let Located::Owner(o) = d.locate("bob@example.org") else { panic!() };
    assert_eq!((o.backend.as_str(), o.source, o.address), ("b", Source::Learned, IpAddr::from([198, 18, 0, 11])));
    // A failed fetch keeps b's list.
    d.set_fetch_error("b", "connect: refused".into());
    assert_eq!(d.exists("bob@example.org"), Existence::Exists);
    let r = d.reports();
    assert_eq!(r[1].last_error.as_deref(), Some("connect: refused"));
    assert_eq!(r[1].mailboxes, 1);
    // A user added on a back-end exists after the next fetch.
    d.set_reported("b", ["bob@example.org".to_string(), "newbie@example.org".to_string()]);
    assert_eq!(d.exists("newbie@example.org"), Existence::Exists);

    let none = Directory::new(backends(&[("a", 1, false)]), None).unwrap();
    assert!(matches!(none.exists("x@y"), Existence::Unknown(_)), "without reports nothing is 'nowhere'");
}

#[test]
fn move_rewrites_the_table_in_place_and_announces_the_user() {
    let dir = scratch("move");
    let table = dir.join("mailboxes");
    std::fs::write(&table, "# owners\nalice@example.org a\n\nbob@example.org b # keep\n").unwrap();
    let d = Directory::new(backends(&[("a", 1, false), ("b", 1, false), ("c", 1, false)]), Some(table.clone())).unwrap();
    let mut moves = d.moves();
    let o = d.move_mailbox("Alice@Example.org", "c").unwrap();
    assert_eq!((o.backend.as_str(), o.source), ("c", Source::Table));
    assert_eq!(moves.try_recv().unwrap(), "alice@example.org");
    assert_eq!(
        std::fs::read_to_string(&table).unwrap(),
        "# owners\nalice@example.org c\n\nbob@example.org b # keep\n"
    );
    d.move_mailbox("dave@example.org", "a").unwrap();
    assert!(std::fs::read_to_string(&table).unwrap().ends_with("dave@example.org a\n"));
    // Survives a restart.
    let again = Directory::new(backends(&[("a", 1, false), ("b", 1, false), ("c", 1, false)]), Some(table.clone())).unwrap();
    assert_eq!(again.owner("alice@example.org").backend, "c");
    let listed: Vec<(String, String)> = again.list().into_iter().map(|e| (e.mailbox, e.backend)).collect();
    assert_eq!(
        listed,
        vec![
            ("alice@example.org".into(), "c".into()),
            ("bob@example.org".into(), "b".into()),
            ("dave@example.org".into(), "a".into())
        ]
    );

    assert!(matches!(d.move_mailbox("x@y", "zz"), Err(MailboxError::NoSuchBackend(_))));
    assert!(matches!(d.move_mailbox("two words", "a"), Err(MailboxError::BadName(_))));
    let no_table = Directory::new(backends(&[("a", 1, false)]), None).unwrap();
    assert!(matches!(no_table.move_mailbox("x@y", "a"), Err(MailboxError::NoTable)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn table_errors_name_file_and_line() {
    let names = ["a", "b"];
    let err = |text: &str| Table::parse(text, Path::new("owners.txt"), &names).unwrap_err().to_string();
    assert_eq!(err("a@x a\nb@x zz\n"), "owners.txt:2: no mailbox back-end is named `zz`");
    assert_eq!(err("a@x a b\n"), "owners.txt:1: expected `mailbox backend-name`, found 3 fields");
    assert_eq!(err("a@x a\nA@X b\n"), "owners.txt:2: `A@X` is already mapped on line 1");
    assert!(Table::load_or_empty(Path::new("/nonexistent/owners"), &names).unwrap().is_empty());
}

#[test]
fn sources_parse_and_list() {
    use learn::{MailboxSource, line_users, passwd_file_users};
    assert_eq!("doveadm".parse::<MailboxSource>(), Ok(MailboxSource::Doveadm));
    assert_eq!("passwd-file:/etc/dovecot/users".parse(), Ok(MailboxSource::PasswdFile("/etc/dovecot/users".into())));
    assert_eq!("command:ldapsearch -x uid".parse(), Ok(MailboxSource::Command("ldapsearch -x uid".into())));
    assert!("ldap".parse::<MailboxSource>().is_err());
    assert_eq!(
        passwd_file_users("# users\nalice@example.org:{PLAIN}x:65534:65534::/home/a::\n\nbob::\n"),
        vec!["alice@example.org", "bob"]
    );
    assert_eq!(line_users("alice@example.org\n\n  bob@example.org \nnot a name\n"), vec!["alice@example.org", "bob@example.org"]);
    let listed = MailboxSource::Command("printf 'x@y\\nz@y\\n'".into()).list().unwrap();
    assert_eq!(listed, vec!["x@y", "z@y"]);
    assert!(MailboxSource::Command("exit 3".into()).list().unwrap_err().contains("exit status: 3"));
}
