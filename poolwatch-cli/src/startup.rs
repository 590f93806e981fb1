//! The PostgreSQL startup up to authentication, on one address: send the startup packet, read
//! the server's first answer (an authentication request or an error), then leave. No password
//! is sent: the server's answer already says it is alive and willing.
//!
//! TLS: unless `sslmode=disable` (or `allow`), the probe first sends an SSLRequest, as libpq
//! does, completes the TLS handshake (rustls, checking the certificate as `sslmode` says, see
//! tls.rs) and sends the startup packet inside TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use sqlx::postgres::PgSslMode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::report::Startup;
use crate::text::clean;

/// How the probe speaks TLS: the URL's `sslmode` and the client for it (`Err`: why none could
/// be made, e.g. an unreadable `sslrootcert`).
pub(crate) struct Tls {
    pub(crate) mode: PgSslMode,
    pub(crate) config: Result<Arc<ClientConfig>, String>,
}

/// The startup on `address`, one of `host`'s (the name a certificate is checked against).
pub(crate) async fn probe(
    address: SocketAddr,
    host: &str,
    login: (&str, &str),
    tls: &Tls,
    timeout: Duration,
) -> Startup {
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, exchange(address, host, login, tls)).await;
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(Ok((outcome, detail))) => Startup { outcome, detail: clean(&explain(&detail, tls.mode)), seconds },
        Ok(Err(e)) => {
            Startup { outcome: "failed", detail: format!("{} ({e})", poolwatch::Cause::of_io(e.kind())), seconds }
        }
        Err(_) => Startup {
            outcome: "failed",
            detail: format!("timed out after {} ms waiting for the server's answer", timeout.as_millis()),
            seconds,
        },
    }
}

/// Connects, speaks TLS if `tls` says so, sends the startup packet and reads up to the
/// server's first answer: the outcome and its detail, not yet cleaned.
async fn exchange(
    address: SocketAddr,
    host: &str,
    (user, database): (&str, &str),
    tls: &Tls,
) -> std::io::Result<(&'static str, String)> {
    let mut stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let mode = mode_name(tls.mode);
    match ssl_request(&mut stream, tls.mode).await? {
        Plain::Go(note) => return answer(&mut stream, user, database, note).await,
        Plain::Stop(outcome, detail) => return Ok((outcome, detail)),
        Plain::Tls => {}
    }
    let config = match &tls.config {
        Ok(config) => config.clone(),
        Err(e) => return Ok(("failed", e.clone())),
    };
    let name = match crate::tls::server_name(host) {
        Ok(name) => name,
        Err(e) => return Ok(("failed", e)),
    };
    let mut stream = match tokio_rustls::TlsConnector::from(config).connect(name, stream).await {
        Ok(s) => s,
        Err(e) => {
            let text = e.to_string();
            return Ok(("failed", format!("TLS handshake: {text}{}", certificate_hint(&text, tls.mode))));
        }
    };
    let version = match stream.get_ref().1.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2",
        _ => "TLS",
    };
    let checked = match tls.mode {
        PgSslMode::VerifyFull => format!("certificate verified for {host}"),
        PgSslMode::VerifyCa => "certificate chain verified".to_owned(),
        _ => format!("certificate not checked (sslmode={mode})"),
    };
    answer(&mut stream, user, database, format!("{version}, {checked}: ")).await
}

/// What a certificate error means for the user, from rustls's words (empty when none applies).
pub(crate) fn certificate_hint(text: &str, mode: PgSslMode) -> String {
    let mode = mode_name(mode);
    if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        format!(
            "; the server's certificate is not signed by a CA trusted here (sslmode={mode}): \
             give the server's CA with sslrootcert=<file>"
        )
    } else if text.contains("NotValidForName") {
        format!("; the server's certificate does not name the host connected to (sslmode={mode} checks it)")
    } else if text.contains("Expired") || text.contains("NotValidYet") {
        "; the server's certificate is outside its validity period".to_owned()
    } else {
        String::new()
    }
}

/// Sends the startup packet on `stream` (plain or TLS) and reads the server's first answer;
/// `note` (what TLS was used) comes first in the detail.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    database: &str,
    note: String,
) -> std::io::Result<(&'static str, String)> {
    stream.write_all(&startup_packet(user, database)).await?;
    let (outcome, detail) = first_answer(stream).await?;
    Ok((outcome, format!("{note}{detail}")))
}

/// The server's first answer to the startup packet.
async fn first_answer<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> std::io::Result<(&'static str, String)> {
    loop {
        let kind = stream.read_u8().await?;
        let len = stream.read_u32().await? as usize;
        if !(4..=65_536).contains(&len) {
            return Ok(("failed", format!("not a PostgreSQL answer (message {:?}, length {len})", kind as char)));
        }
        let mut payload = vec![0u8; len - 4];
        stream.read_exact(&mut payload).await?;
        match kind {
            b'R' => {
                let code = payload.get(..4).map_or(u32::MAX, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                if code == 0 {
                    // Let in without a password: say goodbye properly (Terminate).
                    let _ = stream.write_all(&[b'X', 0, 0, 0, 4]).await;
                }
                return Ok(("ok", authentication_request(code, &payload)));
            }
            b'E' => return Ok(("rejected", error_response(&payload))),
            // A notice before the answer: read on.
            b'N' => continue,
            other => return Ok(("failed", format!("unexpected PostgreSQL message {:?}", other as char))),
        }
    }
}

/// The libpq name of `mode`, as the URL spells it.
pub(crate) fn mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

/// What the SSLRequest decided.
enum Plain {
    /// Go on without TLS; the note says why when TLS was asked for.
    Go(String),
    /// The server takes TLS: the handshake follows.
    Tls,
    /// The probe ends here: the outcome and its detail.
    Stop(&'static str, String),
}

/// Sends an SSLRequest unless `tls` is `disable` or `allow` (as libpq and sqlx do).
async fn ssl_request(stream: &mut TcpStream, tls: PgSslMode) -> std::io::Result<Plain> {
    if matches!(tls, PgSslMode::Disable | PgSslMode::Allow) {
        return Ok(Plain::Go(String::new()));
    }
    // Length 8, then the SSLRequest code 1234.5679.
    stream.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
    let mode = mode_name(tls);
    Ok(match stream.read_u8().await? {
        b'S' => Plain::Tls,
        b'N' if matches!(tls, PgSslMode::Prefer) => Plain::Go(String::new()),
        b'N' => Plain::Stop("rejected", format!("the server does not offer TLS, and sslmode={mode} requires it")),
        other => Plain::Stop("failed", format!("not a PostgreSQL answer to the SSLRequest ({:?})", other as char)),
    })
}

/// A refusal of a connection without TLS, said as such: the server's own words name pg_hba.conf.
fn explain(detail: &str, tls: PgSslMode) -> String {
    if detail.contains(" 28000 ") && detail.contains("no encryption") {
        let mode = mode_name(tls);
        format!(
            "{detail} -- the server requires TLS for this connection (sslmode={mode} sent none): \
             use sslmode=require, or verify-full with sslrootcert=<CA file>"
        )
    } else {
        detail.to_owned()
    }
}

/// Protocol 3.0's StartupMessage with the user, the database and the doctor's application_name.
fn startup_packet(user: &str, database: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
    for (k, v) in [("user", user), ("database", database), ("application_name", "poolwatch-doctor")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = u32::try_from(body.len() + 4).unwrap_or(u32::MAX).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// What an AuthenticationRequest (`R`, its `code` first in `payload`) asks for.
fn authentication_request(code: u32, payload: &[u8]) -> String {
    match code {
        0 => "authentication ok (no password asked)".to_owned(),
        3 => "asks for a cleartext password".to_owned(),
        5 => "asks for an MD5 password".to_owned(),
        7 | 8 => "asks for GSSAPI".to_owned(),
        9 => "asks for SSPI".to_owned(),
        10 => {
            let mechanisms: Vec<String> = payload[4..]
                .split(|b| *b == 0)
                .filter(|m| !m.is_empty())
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .collect();
            format!("asks for {}", mechanisms.join(", "))
        }
        other => format!("asks for authentication method {other}"),
    }
}

/// An ErrorResponse (`E`) as `severity code message`.
fn error_response(payload: &[u8]) -> String {
    let mut severity = String::new();
    let mut code = String::new();
    let mut message = String::new();
    for field in payload.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let text = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'S' => severity = text,
            b'C' => code = text,
            b'M' => message = text,
            _ => {}
        }
    }
    format!("{severity} {code} {message}")
}
