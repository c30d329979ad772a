//! The tempfail responder: what a client hears when every back-end of a VIP is down or full.
//!
//! Instead of a timeout (or a reset), senders get their protocol's "try again later" and
//! retry: SMTP `421 4.3.2`, POP3 `-ERR [SYS/TEMP]`, IMAP `* BYE [UNAVAILABLE]`. The data path
//! passes a VIP's new connections to this node's stack when its Maglev ring is empty and the VIP
//! sheds (`shed = true`); this responder listens on the VIP's ports, answers and closes.
//! Established sessions to healthy back-ends are not affected.
//!
//! The VIP must be a local address of the node for the kernel to deliver to it (VRRP adds it on
//! the master; otherwise `ip addr add VIP/32 dev lo`). The sockets are bound with IP_FREEBIND so
//! the responder can start before the address is there.
use std::{net::SocketAddr, time::Duration};

use tokio::{io::AsyncWriteExt as _, net::TcpListener};
use tracing::{info, warn};

use crate::health::CheckKind;

/// The reply for a protocol (CRLF-terminated).
pub fn tempfail_reply(kind: CheckKind) -> &'static [u8] {
    match kind {
        CheckKind::Smtp | CheckKind::Tcp => b"421 4.3.2 Service temporarily unavailable, please try again later\r\n",
        CheckKind::Pop3 => b"-ERR [SYS/TEMP] Service temporarily unavailable, please try again later\r\n",
        CheckKind::Imap => b"* BYE [UNAVAILABLE] Service temporarily unavailable, please try again later\r\n",
    }
}

/// A TCP listener on `addr` that may bind before the address is assigned (IP_FREEBIND).
pub fn freebind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv4() {
        s.set_freebind_v4(true)?;
    } else {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Answers every connection on `listeners` with its protocol's tempfail reply, until `stop`.
pub async fn serve(listeners: Vec<(SocketAddr, CheckKind)>, stop: impl std::future::Future<Output = ()>) {
    let mut tasks = Vec::new();
    for (addr, kind) in listeners {
        let listener = match freebind_listener(addr) {
            Ok(l) => l,
            Err(e) => {
                warn!(%addr, error = %e, "tempfail responder cannot listen; shed sessions will be refused instead");
                continue;
            }
        };
        info!(%addr, protocol = kind.as_str(), "tempfail responder listening");
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    // A client that does not read cannot hold the responder.
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        stream.write_all(tempfail_reply(kind)).await?;
                        stream.shutdown().await
                    })
                    .await;
                });
            }
        }));
    }
    stop.await;
    for t in tasks {
        t.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    #[test]
    fn replies_are_each_protocols_temporary_failure() {
        assert!(tempfail_reply(CheckKind::Smtp).starts_with(b"421 4.3.2 "));
        assert!(tempfail_reply(CheckKind::Pop3).starts_with(b"-ERR [SYS/TEMP] "));
        assert!(tempfail_reply(CheckKind::Imap).starts_with(b"* BYE [UNAVAILABLE] "));
        for k in [CheckKind::Smtp, CheckKind::Pop3, CheckKind::Imap] {
            assert!(tempfail_reply(k).ends_with(b"\r\n"));
        }
    }

    #[tokio::test]
    async fn answers_and_closes() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(vec![(addr, CheckKind::Imap)], async {
            let _ = rx.await;
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await.unwrap().unwrap();
        assert_eq!(out, tempfail_reply(CheckKind::Imap));
        let _ = tx.send(());
        server.await.unwrap();
    }

    #[test]
    fn binds_an_address_not_yet_assigned() {
        // 198.18.0.0/15 is not assigned to this host: IP_FREEBIND lets the listener exist anyway.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let l = freebind_listener("198.18.255.254:2525".parse().unwrap()).unwrap();
            assert_eq!(l.local_addr().unwrap().port(), 2525);
        });
    }
}
