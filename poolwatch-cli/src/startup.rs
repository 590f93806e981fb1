//! The PostgreSQL startup up to authentication, on one address: send the startup packet, read
//! the server's first answer (an authentication request or an error), then leave. No password
//! is sent: the server's answer already says it is alive and willing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::report::Startup;
use crate::text::clean;

pub(crate) async fn probe(address: SocketAddr, user: &str, database: &str, timeout: Duration) -> Startup {
    let started = Instant::now();
    let result = tokio::time::timeout(timeout, exchange(address, user, database)).await;
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(Ok((outcome, detail))) => Startup { outcome, detail: clean(&detail), seconds },
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

/// Sends the startup packet and reads up to the server's first answer: the outcome and its
/// detail, not yet cleaned.
async fn exchange(address: SocketAddr, user: &str, database: &str) -> std::io::Result<(&'static str, String)> {
    let mut stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    stream.write_all(&startup_packet(user, database)).await?;
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
