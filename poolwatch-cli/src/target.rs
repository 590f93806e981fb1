//! Reads a DATABASE_URL (a `postgres://` URL or libpq `key=value` pairs) so that no part of the
//! password can ever reach an output. The user information ends at the LAST `@` of the URL
//! (a base64 password holds `/`, `+` and `=`; some hold `?`, `#` or `@`), and an error never
//! quotes the input: it names the part that is wrong and the fix.

use sqlx::postgres::PgConnectOptions;

use crate::text::clean;

/// A parsed target: where to go and how to log in.
pub(crate) struct Target {
    /// Every `host:port` (or unix socket directory and port), in order.
    pub(crate) hosts: Vec<(String, u16)>,
    /// Options for the first host, password included: used to log in only.
    pub(crate) options: PgConnectOptions,
    /// `sslrootcert` (or sqlx's spelling `ssl-root-cert`), else `$PGSSLROOTCERT`, as sqlx reads it.
    pub(crate) ssl_root_cert: Option<std::path::PathBuf>,
    pub(crate) password_given: bool,
    /// Every form of the password as written and as decoded: scrubbed from all output.
    pub(crate) secrets: Vec<String>,
    /// Advice about the input (never quoting it), printed on stderr.
    pub(crate) warnings: Vec<String>,
}

/// The pieces of either form, decoded.
#[derive(Default)]
struct Parts {
    hosts: Vec<String>,
    ports: Vec<String>,
    user: Option<String>,
    password: Option<String>,
    raw_password: Option<String>,
    database: Option<String>,
    params: Vec<(String, String)>,
}

const ENCODE: &str = "percent-encode the password's / as %2F, ? as %3F, # as %23, @ as %40, : as %3A, % as %25";

/// `what` names the input in messages (`DATABASE_URL`, `--pooler-admin`).
pub(crate) fn parse(what: &str, input: &str) -> Result<Target, String> {
    let mut warnings = Vec::new();
    let parts = if input.contains("://") {
        url_parts(what, input, &mut warnings)?
    } else if input.contains('=') {
        dsn_parts(what, input)?
    } else {
        return Err(format!(
            "{what} is neither a postgres:// URL nor key=value pairs; e.g. postgres://app@db:5432/app \
             or 'host=db user=app dbname=app'"
        ));
    };
    build(what, parts, warnings)
}

fn build(what: &str, p: Parts, warnings: Vec<String>) -> Result<Target, String> {
    let hosts = host_ports(what, &p.hosts, &p.ports)?;
    let mut secrets: Vec<String> =
        [p.password.clone(), p.raw_password.clone()].into_iter().flatten().filter(|s| !s.is_empty()).collect();
    secrets.dedup();
    let mut url = String::from("postgres://localhost/");
    for (i, (k, v)) in p.params.iter().enumerate() {
        url.push(if i == 0 { '?' } else { '&' });
        url.push_str(&encode(k));
        url.push('=');
        url.push_str(&encode(v));
    }
    let mut options = url.parse::<PgConnectOptions>().map_err(|e| {
        let message = scrub(&e.to_string(), &secrets);
        format!("{what}: a connection parameter is not valid ({message}); see libpq's parameter keywords")
    })?;
    let (host, port) = hosts.first().cloned().unwrap_or_default();
    options = if host.starts_with('/') { options.socket(&host) } else { options.host(&host) }.port(port);
    if let Some(user) = &p.user {
        options = options.username(user);
    }
    if let Some(database) = &p.database {
        options = options.database(database);
    }
    if let Some(password) = &p.password {
        options = options.password(password);
    }
    let ssl_root_cert = p
        .params
        .iter()
        .rev()
        .find(|(k, _)| k == "sslrootcert" || k == "ssl-root-cert")
        .map(|(_, v)| v.into())
        .or_else(|| std::env::var_os("PGSSLROOTCERT").map(Into::into));
    Ok(Target { hosts, options, ssl_root_cert, password_given: p.password.is_some(), secrets, warnings })
}

/// `scheme://[user[:password]@]host[:port][,host2[:port2]...][/database][?key=value&...]`
fn url_parts(what: &str, input: &str, warnings: &mut Vec<String>) -> Result<Parts, String> {
    let (scheme, rest) = input.split_once("://").unwrap_or_default();
    if !matches!(scheme, "postgres" | "postgresql") {
        return Err(format!("{what} must start with postgres:// or postgresql://"));
    }
    let mut p = Parts::default();
    let after = match rest.rfind('@') {
        Some(at) => {
            userinfo(what, rest.get(..at).unwrap_or_default(), &mut p, warnings)?;
            rest.get(at + 1..).unwrap_or_default()
        }
        None => rest,
    };
    let after = after.split_once('#').map_or(after, |(a, _)| a);
    let (location, query) = after.split_once('?').unwrap_or((after, ""));
    let (hostlist, path) = location.split_once('/').unwrap_or((location, ""));
    if !hostlist.is_empty() {
        p.hosts = hostlist.split(',').map(str::to_owned).collect();
    }
    if path.contains('/') {
        // A database name almost never holds a '/'; a password that does, before a forgotten
        // `@host`, does: never take a password for a database name that would be printed.
        return Err(format!(
            "{what}: the database name holds a '/' (percent-encode it as %2F), or the URL has no '@host' \
             and what follows ':' is a password: write postgres://user:password@host/db and {ENCODE}"
        ));
    }
    if !path.is_empty() {
        p.database = Some(decode(what, "the database name", path)?);
    }
    for pair in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(what, "a query parameter name", k)?;
        let value = decode(what, &format!("the value of query parameter `{}`", printable(&key)), v)?;
        if key == "password" {
            p.raw_password = Some(v.to_owned());
        }
        keyword(&mut p, key, value);
    }
    Ok(p)
}

/// `user[:password]`: the user ends at the first `:`; the password is everything after it.
fn userinfo(what: &str, info: &str, p: &mut Parts, warnings: &mut Vec<String>) -> Result<(), String> {
    let (user, password) = match info.split_once(':') {
        Some((u, pw)) => (u, Some(pw)),
        None => (info, None),
    };
    if user.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "{what}: the part before the last '@' holds a '/', '?', '#' or '@' outside the password; \
             write user:password@host and {ENCODE}"
        ));
    }
    if !user.is_empty() {
        p.user = Some(decode(what, "the user name", user)?);
    }
    if let Some(pw) = password {
        p.password = Some(decode(what, "the password", pw)?);
        p.raw_password = Some(pw.to_owned());
        if pw.contains(['/', '?', '#', '@']) {
            warnings.push(format!(
                "{what}: the password holds an unencoded '/', '?', '#' or '@'; read here up to the last '@', \
                 but libpq and other tools misread it: {ENCODE}"
            ));
        }
    }
    Ok(())
}

/// libpq's `key=value` pairs, values optionally in single quotes with `\'` and `\\` escapes.
fn dsn_parts(what: &str, input: &str) -> Result<Parts, String> {
    let mut p = Parts::default();
    let mut chars = input.chars().peekable();
    let mut word = 0usize;
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(p);
        }
        word = word.saturating_add(1);
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!(
                "{what}: word {word} of the key=value pairs has no '='; quote a value holding spaces: \
                 password='a b'"
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.next_if_eq(&'\'').is_some();
        loop {
            match chars.next() {
                Some('\\') => match chars.next() {
                    Some(c) => value.push(c),
                    None => break,
                },
                Some('\'') if quoted => break,
                Some(c) if !quoted && c.is_whitespace() => break,
                Some(c) => value.push(c),
                None if quoted => {
                    return Err(format!(
                        "{what}: the value of `{}` opens a quote (') that never closes",
                        printable(&key)
                    ));
                }
                None => break,
            }
        }
        if key == "password" {
            p.raw_password = Some(value.clone());
        }
        keyword(&mut p, key, value);
    }
}

/// Applies one libpq keyword; the rest go to sqlx's parser.
fn keyword(p: &mut Parts, key: String, value: String) {
    match key.as_str() {
        "host" | "hostaddr" => p.hosts = value.split(',').map(str::to_owned).collect(),
        "port" => p.ports = value.split(',').map(str::to_owned).collect(),
        "user" => p.user = Some(value),
        "password" => p.password = Some(value),
        "dbname" => p.database = Some(value),
        _ => p.params.push((key, value)),
    }
}

/// Pairs each host with its port: ports from the host list (`host:port`, `[v6]:port`), else
/// from a `port` list (one for all, or one per host), else 5432.
fn host_ports(what: &str, hosts: &[String], ports: &[String]) -> Result<Vec<(String, u16)>, String> {
    if hosts.is_empty() {
        return Err(format!(
            "{what} names no host; e.g. postgres://app@db:5432/app, or ?host=/run/postgresql for a unix socket \
             (a password holding '@', '/', '?' or '#' may hide the host: {ENCODE})"
        ));
    }
    if ports.len() > 1 && ports.len() != hosts.len() {
        return Err(format!("{what}: {} ports for {} hosts; give one port, or one per host", ports.len(), hosts.len()));
    }
    let mut out = Vec::with_capacity(hosts.len());
    for (i, h) in hosts.iter().enumerate() {
        let n = i.saturating_add(1);
        let (host, port) = split_port(h);
        let port = port.or_else(|| ports.get(i).or(ports.first()).map(String::as_str));
        let port = match port {
            None | Some("") => 5432,
            Some(text) => text.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                format!(
                    "{what}: the port of host {n} is not a number from 1 to 65535 (if the text after ':' is \
                     a password, the host list starts after the last '@'): {ENCODE}"
                )
            })?,
        };
        let host = decode(what, &format!("host {n}"), host.trim_start_matches('[').trim_end_matches(']'))?;
        let socket = host.starts_with('/');
        let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%');
        if host.is_empty() || (!socket && !host.chars().all(fine)) {
            return Err(format!(
                "{what}: host {n} is empty or holds characters a host name cannot (an '@' or ':' of the \
                 password in the wrong place?): {ENCODE}"
            ));
        }
        out.push((host, port));
    }
    Ok(out)
}

/// `host:port`, `[v6]:port`, `[v6]`, `host`, or a socket directory (percent-encoded in a URL's
/// host list, where a `:port` may follow it as libpq reads it).
fn split_port(h: &str) -> (&str, Option<&str>) {
    if h.starts_with('/') {
        return (h, None);
    }
    if h.starts_with("%2F") || h.starts_with("%2f") {
        return match h.rsplit_once(':') {
            Some((dir, port)) if port.bytes().all(|b| b.is_ascii_digit()) => (dir, Some(port)),
            _ => (h, None),
        };
    }
    if let Some(v6) = h.strip_prefix('[') {
        return match v6.split_once(']') {
            Some((addr, rest)) => (addr, rest.strip_prefix(':')),
            None => (h, None),
        };
    }
    match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (h, None),
    }
}

/// Percent-decoding; `part` names what is decoded (never its text).
fn decode(what: &str, part: &str, s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| {
                format!("{what}: {part} holds a '%' that is not followed by two hex digits; write % as %25")
            })?;
            out.push(byte);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{what}: {part} is not UTF-8 once percent-decoded"))
}

fn encode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { char::from(b).to_string() } else { format!("%{b:02X}") }).collect()
}

/// A key name for a message, without control characters.
fn printable(s: &str) -> String {
    clean(s)
}

/// Replaces every secret with `***` in plain text (a string value, a line of the report).
pub(crate) fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(input: &str) -> Target {
        parse("DATABASE_URL", input).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_last_at_ends_the_user_information() {
        let t = ok("postgres://app:4821/kQ2w@db/app");
        assert_eq!(t.hosts, [("db".to_owned(), 5432)]);
        assert_eq!((t.options.get_username(), t.options.get_database()), ("app", Some("app")));
        let t = ok("postgres://app:p?q#r@s@[::1]:5433,h2/app?sslmode=disable");
        assert_eq!(t.hosts, [("::1".to_owned(), 5433), ("h2".to_owned(), 5432)]);
        assert!(t.secrets.contains(&"p?q#r@s".to_owned()) && !t.warnings.is_empty());
        let t = ok("host=db,db2 port=5433 user=app password='a b\\'c' dbname=x");
        assert_eq!(t.hosts, [("db".to_owned(), 5433), ("db2".to_owned(), 5433)]);
        assert_eq!(t.secrets, ["a b'c"]);
        let t = ok("postgres://app@/app?host=/run/postgresql");
        assert_eq!(t.hosts, [("/run/postgresql".to_owned(), 5432)]);
        let t = ok("postgres://app@%2Frun%2Fpostgresql:5433/app");
        assert_eq!(t.hosts, [("/run/postgresql".to_owned(), 5433)]);
        assert_eq!(t.options.get_socket().map(|p| p.display().to_string()), Some("/run/postgresql".to_owned()));
    }

    #[test]
    fn errors_never_quote_the_input() {
        for bad in ["postgres://app:Zx9/kQ2", "postgres://app:Zx9@db:Zx9/x", "mysql://a:Zx9@b", "Zx9", "a=Zx9 Zx9"] {
            let e = parse("DATABASE_URL", bad).err().unwrap_or_else(|| panic!("{bad} parsed"));
            assert!(!e.contains("Zx9"), "{e}");
        }
    }
}
