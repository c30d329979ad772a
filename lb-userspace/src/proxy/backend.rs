//! The proxy's side towards the owner: connect, tell the back-end who the client is (PROXY v2
//! header or IMAP ID), replay the client's login, and hand back either the logged-in
//! connection with the back-end's own success reply, or the back-end's refusal as it was
//! worded, or "unavailable" (the client gets the temporary answer).
use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
};

use super::login::{LoginRequest, Method, encode_plain};
use crate::config::proxy::PassClient;

/// Longest line the proxy reads from a back-end during login (capability lists are long).
const MAX_BACKEND_LINE: usize = 64 * 1024;

/// POP3 or IMAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Pop3,
    Imap,
}

/// How a replayed login went.
#[derive(Debug)]
pub enum Outcome {
    /// Logged in: `reply` is what the back-end answered (forwarded to the client as is),
    /// `leftover` what it sent after that.
    LoggedIn { stream: TcpStream, reply: Vec<u8>, leftover: Vec<u8> },
    /// The back-end refused the login: its answer, forwarded as is. `auth_failure`: it says
    /// the credentials were wrong (counted against the source), not "try later".
    Refused { reply: Vec<u8>, auth_failure: bool },
    /// The owner could not be reached or answered nonsense: the reason, for the log.
    Unavailable(String),
}

/// Where the client is and what it connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddrs {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// The PROXY protocol v2 header for a client (Dovecot `haproxy = yes`, Postfix, HAProxy).
pub fn proxy_v2_header(client: ClientAddrs) -> Result<Vec<u8>, String> {
    use ppp::v2::{Builder, Command, Protocol as PpProtocol, Version};
    // Both ends are of one family: listeners are bound to the VIP itself (IPv6 ones v6-only).
    let (peer, local) = (client.peer, client.local);
    Builder::with_addresses(Version::Two | Command::Proxy, PpProtocol::Stream, (peer, local)).build().map_err(|e| e.to_string())
}

/// The PROXY protocol v2 `LOCAL` header: a connection of the proxy's own (a health probe),
/// carrying no client address.
pub fn proxy_v2_local_header() -> Vec<u8> {
    use ppp::v2::{Addresses, Builder, Command, Protocol as PpProtocol, Version};
    // The fixed 16-byte header; building it cannot fail (no addresses, no TLVs), but the
    // builder's API is fallible, so fall back to the same bytes written out.
    Builder::with_addresses(Version::Two | Command::Local, PpProtocol::Unspecified, Addresses::Unspecified)
        .build()
        .unwrap_or_else(|_| [&ppp::v2::PROTOCOL_PREFIX[..], &[0x20, 0x00, 0x00, 0x00]].concat())
}

/// The IMAP `ID` command Dovecot's proxy sends to pass the client's address on (honoured by
/// back-ends that list the proxy in `login_trusted_networks`).
pub fn imap_id_command(tag: &str, client: ClientAddrs) -> String {
    format!(
        "{tag} ID (\"x-originating-ip\" \"{}\" \"x-originating-port\" \"{}\" \"x-connected-ip\" \"{}\" \"x-connected-port\" \"{}\")\r\n",
        client.peer.ip(),
        client.peer.port(),
        client.local.ip(),
        client.local.port()
    )
}

/// An IMAP string for LOGIN: quoted when possible, else `None` (the replay then uses
/// AUTHENTICATE PLAIN, which carries any bytes).
fn imap_quoted(raw: &[u8]) -> Option<String> {
    if raw.iter().any(|b| matches!(b, 0 | b'\r' | b'\n')) {
        return None;
    }
    let text = std::str::from_utf8(raw).ok()?;
    Some(format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\"")))
}

/// Reads CRLF lines from a back-end, keeping what follows.
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    /// The next line with its line end.
    async fn next(&mut self, s: &mut TcpStream) -> Result<Vec<u8>, String> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                return Ok(self.buf.drain(..=i).collect());
            }
            if self.buf.len() > MAX_BACKEND_LINE {
                return Err("over-long line from the back-end".into());
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) => return Err("the back-end closed the connection".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("reading from the back-end: {e}")),
            }
        }
    }
}

async fn send(s: &mut TcpStream, bytes: &[u8]) -> Result<(), String> {
    s.write_all(bytes).await.map_err(|e| format!("writing to the back-end: {e}"))
}

/// Where and how to open the connection to the owner.
#[derive(Debug, Clone, Copy)]
pub struct Dial {
    pub addr: SocketAddr,
    /// Bound on the connect.
    pub timeout: Duration,
    /// `TCP_MAXSEG` for the connection (the largest segment the back-end may send us), set
    /// before the SYN. Used for sessions the kernel will splice; see [`splice_segment_size`].
    pub max_segment: Option<u32>,
}

/// The segment size to ask of the back-end for a session that will be spliced to `client`:
/// the client connection's own MSS.
///
/// Why: the kernel relay sends each received skb on *fragment by fragment*
/// (`__skb_send_sock`: one `sendmsg` per page fragment, without `MSG_MORE`), and each
/// received segment is one fragment. When the back-end's segments are larger than the
/// client's MSS (a 1500-byte Internet path, a 9000-byte or just larger back-end network),
/// every segment goes out to the client as one full segment plus a runt of the difference:
/// up to twice the packets, the runts nearly empty. Measured with `bench proxy` (back-end
/// MTU 1600, client 1500): the LB node sent 320 packets per POP3 session and 251 per IMAP
/// session before, 220 and 190 with the hint. With the back-end held to the client's MSS, each
/// fragment fits one outgoing segment. The copy path does not need this: it reads many
/// segments at once and writes them as one.
pub fn splice_segment_size(client: &TcpStream) -> Option<u32> {
    socket2::SockRef::from(client).tcp_mss().ok().filter(|m| *m > 0)
}

pub(super) async fn connect(dial: Dial) -> std::io::Result<TcpStream> {
    let socket = match dial.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(mss) = dial.max_segment {
        // A hint only: a kernel that refuses it still connects with its own MSS.
        let _ = socket2::SockRef::from(&socket).set_tcp_mss(mss);
    }
    socket.connect(dial.addr).await
}

/// Connects to the owner and replays `req`; bounded by `dial.timeout` and then `timeout`.
pub async fn login(dial: Dial, protocol: Protocol, pass: PassClient, client: ClientAddrs, req: &LoginRequest, timeout: Duration) -> Outcome {
    let addr = dial.addr;
    let mut stream = match tokio::time::timeout(dial.timeout, connect(dial)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Outcome::Unavailable(format!("connecting to {addr}: {e}")),
        Err(_) => return Outcome::Unavailable(format!("connecting to {addr}: no answer within {:?}", dial.timeout)),
    };
    let _ = stream.set_nodelay(true);
    let dialogue = async {
        if pass == PassClient::ProxyV2 {
            send(&mut stream, &proxy_v2_header(client)?).await?;
        }
        let mut lines = Lines { buf: Vec::new() };
        match protocol {
            Protocol::Pop3 => pop3(&mut stream, &mut lines, pass, client, req).await,
            Protocol::Imap => imap(&mut stream, &mut lines, pass, client, req).await,
        }
        .map(|(reply, ok, auth_failure)| (reply, ok, auth_failure, std::mem::take(&mut lines.buf)))
    };
    match tokio::time::timeout(timeout, dialogue).await {
        Err(_) => Outcome::Unavailable(format!("{addr}: login not answered within {timeout:?}")),
        Ok(Err(e)) => Outcome::Unavailable(format!("{addr}: {e}")),
        Ok(Ok((reply, true, _, leftover))) => Outcome::LoggedIn { stream, reply, leftover },
        Ok(Ok((reply, false, auth_failure, _))) => Outcome::Refused { reply, auth_failure },
    }
}

/// The POP3 `XCLIENT` command Dovecot's proxy sends to pass the client's address on, when the
/// back-end's greeting offers it (`+OK [XCLIENT] ...`, to hosts in its
/// `login_trusted_networks`).
pub fn pop3_xclient_command(client: ClientAddrs) -> String {
    format!("XCLIENT ADDR={} PORT={}\r\n", client.peer.ip(), client.peer.port())
}

/// The POP3 replay: `(reply, logged in, wrong credentials)`.
async fn pop3(s: &mut TcpStream, lines: &mut Lines, pass: PassClient, client: ClientAddrs, req: &LoginRequest) -> Result<(Vec<u8>, bool, bool), String> {
    let greeting = lines.next(s).await?;
    if !greeting.starts_with(b"+OK") {
        return Err(format!("greeting {:?}", String::from_utf8_lossy(&greeting).trim_end()));
    }
    if pass == PassClient::ImapId && greeting.starts_with(b"+OK [XCLIENT]") {
        send(s, pop3_xclient_command(client).as_bytes()).await?;
        let r = lines.next(s).await?;
        if !r.starts_with(b"+OK") {
            return Err(format!("XCLIENT answered {:?}", String::from_utf8_lossy(&r).trim_end()));
        }
    }
    let c = &req.credentials;
    let final_reply = match req.method {
        Method::Pop3UserPass if !c.password.contains(&b'\n') => {
            send(s, format!("USER {}\r\n", c.user).as_bytes()).await?;
            let r = lines.next(s).await?;
            if !r.starts_with(b"+OK") {
                return Err(format!("USER answered {:?}", String::from_utf8_lossy(&r).trim_end()));
            }
            let mut pass = b"PASS ".to_vec();
            pass.extend_from_slice(&c.password);
            pass.extend_from_slice(b"\r\n");
            send(s, &pass).await?;
            lines.next(s).await?
        }
        _ => {
            send(s, format!("AUTH PLAIN {}\r\n", encode_plain(c)).as_bytes()).await?;
            let mut r = lines.next(s).await?;
            if r.starts_with(b"+ ") || r == b"+\r\n" {
                // No initial response accepted: give it as the continuation.
                send(s, format!("{}\r\n", encode_plain(c)).as_bytes()).await?;
                r = lines.next(s).await?;
            }
            r
        }
    };
    let ok = final_reply.starts_with(b"+OK");
    let has = |code: &[u8]| final_reply.windows(code.len()).any(|w| w == code);
    let temporary = has(b"[SYS/") || has(b"[IN-USE]");
    Ok((final_reply, ok, !ok && !temporary))
}

/// The IMAP replay: `(reply, logged in, wrong credentials)`.
async fn imap(
    s: &mut TcpStream,
    lines: &mut Lines,
    pass: PassClient,
    client: ClientAddrs,
    req: &LoginRequest,
) -> Result<(Vec<u8>, bool, bool), String> {
    let greeting = lines.next(s).await?;
    if !greeting.starts_with(b"* OK") {
        return Err(format!("greeting {:?}", String::from_utf8_lossy(&greeting).trim_end()));
    }
    let tag = req.tag.clone().unwrap_or_else(|| "A1".into());
    if pass == PassClient::ImapId {
        let id_tag = if tag == "mxlbid" { "mxlbid2" } else { "mxlbid" };
        send(s, imap_id_command(id_tag, client).as_bytes()).await?;
        loop {
            let l = lines.next(s).await?;
            if l.starts_with(format!("{id_tag} ").as_bytes()) {
                break;
            }
        }
    }
    let c = &req.credentials;
    let login = match (req.method, imap_quoted(c.user.as_bytes()), imap_quoted(&c.password)) {
        (Method::ImapLogin, Some(u), Some(p)) => format!("{tag} LOGIN {u} {p}\r\n"),
        _ => format!("{tag} AUTHENTICATE PLAIN {}\r\n", encode_plain(c)),
    };
    send(s, login.as_bytes()).await?;
    let tagged = format!("{tag} ");
    let mut untagged = Vec::new();
    loop {
        let l = lines.next(s).await?;
        if l.starts_with(b"+") {
            send(s, format!("{}\r\n", encode_plain(c)).as_bytes()).await?;
            continue;
        }
        if !l.starts_with(tagged.as_bytes()) {
            untagged.extend_from_slice(&l);
            continue;
        }
        let status = l[tagged.len()..].to_ascii_uppercase();
        if status.starts_with(b"OK") {
            untagged.extend_from_slice(&l);
            return Ok((untagged, true, false));
        }
        let temporary = [&b"[UNAVAILABLE]"[..], b"[INUSE]", b"[SERVERBUG]", b"[LIMIT]"].iter().any(|code| status.windows(code.len()).any(|w| w == *code));
        return Ok((l, false, !temporary));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_xclient_command_names_the_client() {
        let c = ClientAddrs { peer: "[2001:db8::5]:40000".parse().unwrap(), local: "[2001:db8::100]:110".parse().unwrap() };
        assert_eq!(pop3_xclient_command(c), "XCLIENT ADDR=2001:db8::5 PORT=40000\r\n");
    }

    #[test]
    fn the_probe_header_is_a_local_command_without_addresses() {
        let h = proxy_v2_local_header();
        let parsed = ppp::v2::Header::try_from(h.as_slice()).unwrap();
        assert_eq!(parsed.command, ppp::v2::Command::Local);
        assert_eq!(parsed.addresses, ppp::v2::Addresses::Unspecified);
        assert_eq!(h.len(), 16, "signature, version/command, family, length 0");
    }

    #[test]
    fn proxy_v2_headers_carry_the_client_and_the_vip() {
        let h = proxy_v2_header(ClientAddrs { peer: "198.18.1.2:40000".parse().unwrap(), local: "198.18.0.100:143".parse().unwrap() }).unwrap();
        let parsed = ppp::v2::Header::try_from(h.as_slice()).unwrap();
        assert_eq!(parsed.addresses, ppp::v2::Addresses::from(("198.18.1.2:40000".parse::<SocketAddr>().unwrap(), "198.18.0.100:143".parse::<SocketAddr>().unwrap())));
        let h6 = proxy_v2_header(ClientAddrs { peer: "[2001:db8::5]:40000".parse().unwrap(), local: "[2001:db8::100]:110".parse().unwrap() }).unwrap();
        assert!(matches!(ppp::v2::Header::try_from(h6.as_slice()).unwrap().addresses, ppp::v2::Addresses::IPv6(_)));
    }

    #[test]
    fn imap_strings_quote_or_fall_back() {
        assert_eq!(imap_quoted(b"a\"b\\c").as_deref(), Some("\"a\\\"b\\\\c\""));
        assert_eq!(imap_quoted(b"a\r\nb"), None);
        assert_eq!(imap_quoted(b"\xff"), None);
    }

    #[test]
    fn the_id_command_names_client_and_vip() {
        let c = ClientAddrs { peer: "198.18.1.2:40000".parse().unwrap(), local: "198.18.0.100:143".parse().unwrap() };
        assert_eq!(
            imap_id_command("x", c),
            "x ID (\"x-originating-ip\" \"198.18.1.2\" \"x-originating-port\" \"40000\" \"x-connected-ip\" \"198.18.0.100\" \"x-connected-port\" \"143\")\r\n"
        );
    }
}
