//! `poolwatch doctor`, the real binary, against real servers: a healthy one, one with hazards
//! and stuck sessions, a dead and a silent address beside a live one, a role without
//! `pg_read_all_stats`, a password that must never show, and PgBouncer's admin console.

// The library's test harness (one harness for the workspace): the parts the doctor needs.
#[path = "../../tests/support"]
#[allow(dead_code)]
mod support {
    pub mod cluster;
    pub mod password;
    pub mod pgbouncer;
    pub mod wait;
    pub use cluster::Cluster;
    pub use wait::eventually;
}

use std::time::Duration;

use poolwatch::sqlx;
use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};
use support::pgbouncer::PgBouncer;
use support::{Cluster, eventually};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

/// The binary under test: Cargo's, or `$POOLWATCH_BIN` (work trees sharing one target
/// directory overwrite each other's `target/debug/poolwatch`).
fn binary() -> String {
    std::env::var("POOLWATCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_poolwatch").to_owned())
}

/// Runs the installed binary as a user would.
async fn doctor(args: &[&str]) -> Run {
    let out = tokio::process::Command::new(binary())
        .arg("doctor")
        .args(args)
        .env_remove("DATABASE_URL")
        .output()
        .await
        .expect("run poolwatch");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    println!("$ poolwatch doctor {}\n{}{}(exit {})", args.join(" "), run.stdout, run.stderr, run.code);
    run
}

fn url_with_hosts(hosts: &[String]) -> String {
    format!("postgres://postgres@{}/postgres", hosts.join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_server_exits_zero_with_every_section() {
    let cluster = Cluster::start();
    let human = doctor(&[&cluster.url()]).await;
    assert_eq!(human.code, 0, "healthy: {}", human.stdout);
    for section in ["ADDRESSES", "SERVER via", "SESSIONS", "STUCK", "ADVISORY LOCKS", "HAZARDS", "RESULT: healthy"] {
        assert!(human.stdout.contains(section), "{section} missing");
    }
    let r = doctor(&[&cluster.url(), "--json"]).await;
    assert_eq!(r.code, 0);
    let j = r.json();
    let a = &j["addresses"][0];
    assert_eq!((a["tcp"].as_str(), a["startup"]["outcome"].as_str()), (Some("up"), Some("ok")), "{a}");
    let server = &j["server"];
    assert_eq!(server["max_connections"], 300);
    assert!(server["headroom"].as_i64().is_some_and(|h| h > 0 && h < 300), "{server}");
    let doctor_session = j["sessions"].as_array().unwrap().iter().any(|g| g["application_name"] == "poolwatch-doctor");
    assert!(doctor_session, "the doctor sees its own session: {}", j["sessions"]);
    assert_eq!(j["hazards"].as_array().map(Vec::len), Some(0));
    assert_eq!(j["problems"].as_array().map(Vec::len), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hazards_stuck_transactions_and_advisory_locks_are_reported_and_fail_the_run() {
    let cluster = Cluster::start_with(&[("idle_session_timeout", "5min")]);
    // A wedged worker: two advisory locks, a transaction left open.
    let mut worker = PgConnection::connect_with(&cluster.options().application_name("wedged-worker")).await.unwrap();
    worker.execute("SELECT pg_advisory_lock(1), pg_advisory_lock(2); BEGIN; SELECT 1").await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut worker).await.unwrap();
    let url = cluster.url();
    let args = [url.as_str(), "--json", "--min-connections", "5", "--stuck-after", "300ms"];
    let j = eventually(Duration::from_secs(20), "the doctor lists the stuck transaction", async || {
        let r = doctor(&args).await;
        let j = r.json();
        let stuck = j["stuck"].as_array()?.iter().any(|s| s["pid"] == pid);
        (stuck && r.code == 1).then_some(j)
    })
    .await;
    let stuck = j["stuck"].as_array().unwrap().iter().find(|s| s["pid"] == pid).unwrap().clone();
    assert_eq!(stuck["state"], "idle in transaction", "{stuck}");
    assert_eq!(stuck["application_name"], "wedged-worker");
    let locks = j["advisory_locks"].as_array().unwrap().iter().find(|l| l["pid"] == pid).cloned();
    assert_eq!(locks.map(|l| (l["held"].clone(), l["waiting"].clone())), Some((2.into(), 0.into())));
    let hazard = j["hazards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["hazard"] == "min_connections_killed_by_idle_session_timeout");
    let hazard = hazard.unwrap_or_else(|| panic!("hazard missing: {}", j["hazards"]));
    assert!(hazard["fix"].as_str().unwrap().contains("idle_timeout"), "{hazard}");
    assert!(hazard["detail"].as_str().unwrap().contains("idle_session_timeout=300s"), "{hazard}");
    assert_eq!(j["server"]["idle_session_timeout_seconds"], 300.0);

    // The human table says the same, with the fix.
    let human = doctor(&[&url, "--min-connections", "5", "--stuck-after", "300ms"]).await;
    assert_eq!(human.code, 1);
    assert!(human.stdout.contains("min_connections_killed_by_idle_session_timeout"));
    assert!(human.stdout.contains("fix: "));
    assert!(human.stdout.contains("wedged-worker") && human.stdout.contains("idle in transaction"));
    // Recycled well before the server's kill: that hazard is gone.
    let safe =
        doctor(&[&url, "--json", "--min-connections", "5", "--idle-timeout", "1m", "--max-lifetime", "2m"]).await;
    let names: Vec<Value> = safe.json()["hazards"].as_array().unwrap().iter().map(|h| h["hazard"].clone()).collect();
    assert!(!names.contains(&"min_connections_killed_by_idle_session_timeout".into()), "{names:?}");
    worker.execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_and_a_silent_address_beside_a_live_one() {
    let cluster = Cluster::start();
    let live = format!("127.0.0.1:{}", cluster.port());
    // Nothing listens on 127.0.0.2 (all of 127/8 is loopback): refused at once.
    let refused = format!("127.0.0.2:{}", cluster.port());
    // Accepts TCP (the kernel completes the handshake) but never answers the startup.
    let silent_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = silent_listener.local_addr().unwrap().to_string();
    let url = url_with_hosts(&[live.clone(), refused.clone(), silent.clone()]);
    let r = doctor(&[&url, "--json", "--startup-timeout", "500ms"]).await;
    assert_eq!(r.code, 1, "an unreachable address fails the run");
    let j = r.json();
    let by =
        |address: &str| j["addresses"].as_array().unwrap().iter().find(|a| a["address"] == address).cloned().unwrap();
    assert_eq!(by(&live)["startup"]["outcome"], "ok");
    assert_eq!(by(&refused)["tcp"], "refused");
    assert!(by(&refused)["startup"].is_null(), "no startup after a failed connect");
    let s = by(&silent);
    assert_eq!((s["tcp"].as_str(), s["startup"]["outcome"].as_str()), (Some("up"), Some("failed")), "{s}");
    assert!(s["startup"]["detail"].as_str().unwrap().contains("timed out"), "{s}");
    // The live address was examined all the same.
    assert_eq!(j["server"]["via"], live.as_str());
    let problems = j["problems"].to_string();
    assert!(
        problems.contains(&refused) && problems.contains(&silent) && !problems.contains(&format!("\"{live}")),
        "{problems}"
    );
    drop(silent_listener);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_pg_read_all_stats_says_what_it_could_not_see() {
    let cluster = Cluster::start();
    let mut admin = PgConnection::connect_with(&cluster.options()).await.unwrap();
    admin.execute("CREATE ROLE plain LOGIN").await.unwrap();
    // Another role's session stuck in a transaction: the plain role cannot see its state.
    let mut other = PgConnection::connect_with(&cluster.options().application_name("admin-job")).await.unwrap();
    other.execute("BEGIN; SELECT pg_advisory_lock(9)").await.unwrap();
    let url = format!("postgres://plain@127.0.0.1:{}/postgres", cluster.port());
    let r = doctor(&[&url, "--json", "--stuck-after", "1ms"]).await;
    assert_eq!(r.code, 0, "no hazard, no dead address: partial visibility is said, not failed");
    let j = r.json();
    assert_eq!(
        (j["server"]["superuser"].as_bool(), j["server"]["read_all_stats"].as_bool()),
        (Some(false), Some(false))
    );
    let hidden = j["sessions"].as_array().unwrap().iter().find(|g| g["application_name"] == "admin-job").cloned();
    assert_eq!(hidden.map(|g| g["state"].clone()), Some("hidden".into()), "{}", j["sessions"]);
    let not_seen = j["not_seen"].to_string();
    assert!(not_seen.contains("pg_read_all_stats") && not_seen.contains("GRANT"), "{not_seen}");
    // Advisory locks (pg_locks) stay visible to any role.
    let lock =
        j["advisory_locks"].as_array().unwrap().iter().any(|l| l["application_name"] == "admin-job" && l["held"] == 1);
    assert!(lock, "{}", j["advisory_locks"]);
    let human = doctor(&[&url]).await;
    assert!(human.stdout.contains("COULD NOT SEE"), "{}", human.stdout);
    other.execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_is_used_and_never_printed() {
    let cluster = Cluster::start();
    let secret = "Sh0uldNeverShow";
    let url = support::password::password_role(&cluster, "app_pw", secret).await;
    for args in [&[url.as_str()][..], &[url.as_str(), "--json"]] {
        let r = doctor(args).await;
        assert_eq!(r.code, 0, "{}", r.stdout);
        assert!(!r.stdout.contains(secret) && !r.stderr.contains(secret), "the password leaked");
        assert!(r.stdout.contains("SCRAM-SHA-256"), "the startup shows what the server asks for");
    }
    // A wrong password: the login fails, and neither password shows.
    let wrong = url.replace(secret, "Wr0ngAndSecret");
    let r = doctor(&[&wrong]).await;
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("logging in") && r.stdout.contains("auth"), "{}", r.stdout);
    assert!(!r.stdout.contains("Wr0ngAndSecret") && !r.stderr.contains("Wr0ngAndSecret"));
    // Bad usage never repeats an argument that may be a secret.
    let r = doctor(&[&url, "extra-argument"]).await;
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("more than one DATABASE_URL") && !r.stderr.contains(secret), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_pools_are_shown_from_the_admin_console() {
    let cluster = Cluster::start();
    let bouncer = PgBouncer::start(cluster.port(), &[("admin_users", "postgres")]);
    // A client through PgBouncer, so the pool exists.
    let mut client = PgConnection::connect_with(&bouncer.options()).await.unwrap();
    client.execute("SELECT 1").await.unwrap();
    let admin = format!("postgres://postgres@127.0.0.1:{}/pgbouncer", bouncer.port());
    let r = doctor(&[&cluster.url(), "--json", "--pooler-admin", &admin]).await;
    assert_eq!(r.code, 0, "{}", r.stdout);
    let pooler = &r.json()["pooler"];
    let columns: Vec<&str> = pooler["columns"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(columns.contains(&"cl_waiting") && columns.contains(&"maxwait"), "{columns:?}");
    let db = columns.iter().position(|c| *c == "database").unwrap();
    let rows = pooler["rows"].as_array().unwrap();
    assert!(rows.iter().any(|row| row[db] == "postgres"), "{rows:?}");
    let human = doctor(&[&cluster.url(), "--pooler-admin", &admin]).await;
    assert!(human.stdout.contains("POOLER: SHOW POOLS") && human.stdout.contains("cl_waiting"));
    // An admin console that refuses is a failed check.
    let r = doctor(&[
        &cluster.url(),
        "--pooler-admin",
        &format!("postgres://nobody@127.0.0.1:{}/pgbouncer", bouncer.port()),
    ])
    .await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    client.close().await.ok();
}

/// Runs the binary with `DATABASE_URL` set in its environment.
async fn doctor_env(url: &str, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(binary())
        .arg("doctor")
        .args(args)
        .env("DATABASE_URL", url)
        .output()
        .await
        .expect("run poolwatch");
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    println!(
        "$ DATABASE_URL=<url> poolwatch doctor {}\n{}{}(exit {})",
        args.join(" "),
        run.stdout,
        run.stderr,
        run.code
    );
    run
}

/// Where `secret` (a whole password, its percent-encoded form, or one of its pieces between
/// `/ ? # @ :`) shows in `text` as a word of its own (pieces of 3 characters or more; a piece
/// inside a longer run of letters and digits, such as a float's digits, is a coincidence).
fn leaks(text: &str, password: &str) -> Vec<String> {
    let encoded: String = password
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() { char::from(b).to_string() } else { format!("%{b:02X}") })
        .collect();
    let mut found = Vec::new();
    for whole in [password.to_owned(), encoded] {
        if text.contains(&whole) {
            found.push(whole);
        }
    }
    for piece in password.split(['/', '?', '#', '@', ':']).filter(|p| p.len() >= 3) {
        let alone = text.match_indices(piece).any(|(i, _)| {
            let before = text[..i].chars().next_back();
            let after = text[i + piece.len()..].chars().next();
            !before.is_some_and(|c| c.is_ascii_alphanumeric()) && !after.is_some_and(|c| c.is_ascii_alphanumeric())
        });
        if alone {
            found.push(piece.to_owned());
        }
    }
    found
}

/// One URL shape: its name, the arguments, the passwords that must not show, the exit status.
type Shape = (&'static str, Vec<String>, Vec<&'static str>, i32);

/// Every shape of the corpus, on `cluster` with the three password roles.
fn corpus(cluster: &Cluster, (slash, split, mixed): (&'static str, &'static str, &'static str)) -> Vec<Shape> {
    let port = cluster.port();
    let at = format!("127.0.0.1:{port}");
    let mixed_encoded = "pqX%3FRt7%23Lm5%40Nx2";
    let mut shapes = vec![
        ("unencoded /", vec![format!("postgres://app_slash:{slash}@{at}/postgres")], vec![slash], 0),
        ("/ after digits", vec![format!("postgres://app_split:{split}@{at}/postgres")], vec![split], 0),
        ("unencoded ? # @", vec![format!("postgres://app_mixed:{mixed}@{at}/postgres")], vec![mixed], 0),
        ("percent-encoded", vec![format!("postgres://app_mixed:{mixed_encoded}@{at}/postgres")], vec![mixed], 0),
        ("postgresql scheme", vec![format!("postgresql://app_slash:{slash}@{at}/postgres")], vec![slash], 0),
        (
            "query parameters",
            vec![format!("postgres://app_split:{split}@{at}/postgres?sslmode=disable&application_name=x")],
            vec![split],
            0,
        ),
        (
            "password in the query",
            vec![format!("postgres://app_slash@{at}/postgres?password=Zx9%2FkQ2")],
            vec![slash],
            0,
        ),
        (
            "key=value",
            vec![format!("host=127.0.0.1 port={port} user=app_slash password={slash} dbname=postgres")],
            vec![slash],
            0,
        ),
        (
            "key=value quoted",
            vec![format!("host=127.0.0.1 port={port} user=app_mixed password='{mixed}' dbname=postgres")],
            vec![mixed],
            0,
        ),
        (
            "key=value host list",
            vec![format!("host=127.0.0.1,127.0.0.2 port={port} user=app_split password={split} dbname=postgres")],
            vec![split],
            1,
        ),
        ("host list", vec![format!("postgres://app_split:{split}@{at},127.0.0.2:{port}/postgres")], vec![split], 1),
        ("IPv6 host", vec![format!("postgres://app_split:{split}@[::1]:{port}/postgres")], vec![split], 1),
        ("IPv6 host, no port", vec![format!("postgres://app_mixed:{mixed}@[::1]/postgres")], vec![mixed], 1),
        (
            "unix socket",
            vec![format!("postgres://app_slash:{slash}@/postgres?host=/nonexistent/socket/dir")],
            vec![slash],
            1,
        ),
        ("empty password", vec![format!("postgres://postgres:@{at}/postgres")], vec![], 0),
        ("wrong password", vec![format!("postgres://app_slash:Wr0ng/Secr3t@{at}/postgres")], vec!["Wr0ng/Secr3t"], 1),
    ];
    shapes.extend(refused(cluster, (slash, split, mixed)));
    shapes
}

/// The shapes refused as bad usage (exit 2), and the pooler's: nothing of them is quoted.
fn refused(cluster: &Cluster, (slash, split, mixed): (&'static str, &'static str, &'static str)) -> Vec<Shape> {
    let port = cluster.port();
    let at = format!("127.0.0.1:{port}");
    vec![
        ("host forgotten", vec![format!("postgres://app_slash:{slash}/postgres")], vec![slash], 2),
        ("host forgotten, digits", vec![format!("postgres://app_split:{split}/postgres")], vec![split], 2),
        ("bad port", vec![format!("postgres://app_slash:{slash}@127.0.0.1:port/postgres")], vec![slash], 2),
        ("bad percent escape", vec![format!("postgres://app_slash:Zx9%zzkQ2@{at}/postgres")], vec!["Zx9%zzkQ2"], 2),
        ("another scheme", vec![format!("mysql://app_slash:{slash}@{at}/postgres")], vec![slash], 2),
        ("no scheme", vec![format!("app_slash:{slash}@{at}")], vec![slash], 2),
        ("key=value unquoted space", vec![format!("host=127.0.0.1 password=Zx9 kQ2 user=x")], vec![slash], 2),
        ("key=value open quote", vec![format!("host=127.0.0.1 password='{slash}")], vec![slash], 2),
        ("bad sslmode", vec![format!("postgres://app_slash:{slash}@{at}/postgres?sslmode=sometimes")], vec![slash], 2),
        (
            "password as a second argument",
            vec![format!("postgres://app_slash@{at}/postgres"), slash.to_owned()],
            vec![slash],
            2,
        ),
        (
            "pooler admin password",
            vec![
                cluster.url(),
                "--pooler-admin".into(),
                format!("postgres://admin:{mixed}@127.0.0.2:{port}/pgbouncer"),
            ],
            vec![mixed],
            1,
        ),
        (
            "pooler admin bad URL",
            vec![cluster.url(), "--pooler-admin".into(), format!("postgres://admin:{split}/pgbouncer")],
            vec![split],
            2,
        ),
        // A flag whose value is missing takes the URL as its value: no error may quote it.
        (
            "URL taken as a count",
            vec!["--max-connections".into(), format!("postgres://app_split:{split}@{at}/postgres")],
            vec![split],
            2,
        ),
        (
            "URL taken as a duration",
            vec!["--query-timeout".into(), format!("postgres://app_slash:{slash}@{at}/postgres")],
            vec![slash],
            2,
        ),
        ("password as an option", vec![cluster.url(), format!("--{mixed}")], vec![mixed], 2),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_url_shape_prints_any_part_of_a_password() {
    let cluster = Cluster::start();
    let port = cluster.port();
    // Base64-style and punctuation-heavy passwords, typed unencoded as users do.
    let (slash, split, mixed) = ("Zx9/kQ2", "4821/kQ2w", "pqX?Rt7#Lm5@Nx2");
    support::password::password_role(&cluster, "app_slash", slash).await;
    support::password::password_role(&cluster, "app_split", split).await;
    support::password::password_role(&cluster, "app_mixed", mixed).await;
    let corpus = corpus(&cluster, (slash, split, mixed));
    let at = format!("127.0.0.1:{port}");
    assert!(corpus.len() >= 20);
    let mut failures = Vec::new();
    for (shape, args, secrets, code) in &corpus {
        for json in [false, true] {
            let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
            if json {
                args.push("--json");
            }
            let r = doctor(&args).await;
            let output = format!("{}\n{}", r.stdout, r.stderr);
            for secret in secrets {
                let found = leaks(&output, secret);
                if !found.is_empty() {
                    failures.push(format!("{shape} (json {json}): printed {found:?}"));
                }
            }
            if r.code != *code {
                failures.push(format!("{shape} (json {json}): exit {} instead of {code}", r.code));
            }
            if json && r.code != 2 {
                // A report, not a crash: the JSON parses, and says whether a password was given.
                let given = r.json()["target"]["password_given"].as_bool();
                let in_url = !shape.starts_with("pooler") && *shape != "empty password";
                if given != Some(in_url && !secrets.is_empty()) && *shape != "empty password" {
                    failures.push(format!("{shape}: password_given {given:?}"));
                }
            }
        }
    }
    // The environment variable takes the same path.
    let r = doctor_env(&format!("postgres://app_split:{split}@{at}/postgres"), &["--json"]).await;
    let found = leaks(&format!("{}{}", r.stdout, r.stderr), split);
    if r.code != 0 || !found.is_empty() {
        failures.push(format!("$DATABASE_URL: exit {}, printed {found:?}", r.code));
    }
    assert!(failures.is_empty(), "{} failure(s):\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_strings_cannot_drive_the_terminal() {
    let cluster = Cluster::start();
    let mut admin = PgConnection::connect_with(&cluster.options()).await.unwrap();
    // A role name may hold any character; this one holds an escape sequence and a bell.
    let evil = "evil\u{1b}[2J\u{1b}]0;pwned\u{7}";
    sqlx::QueryBuilder::<sqlx::Postgres>::new(format!("CREATE ROLE \"{evil}\" LOGIN"))
        .build()
        .execute(&mut admin)
        .await
        .unwrap();
    let mut holder = PgConnection::connect_with(&cluster.options().username(evil)).await.unwrap();
    holder.execute("SELECT pg_advisory_lock(42)").await.unwrap();
    // And a user name the server quotes back in its FATAL answer.
    let ghost = format!("postgres://gh%1B%5B31most@127.0.0.1:{}/postgres", cluster.port());
    let runs = [
        doctor(&[&cluster.url()]).await,
        doctor(&[&cluster.url(), "--json"]).await,
        doctor(&[&ghost]).await,
        doctor(&[&ghost, "--json"]).await,
    ];
    for r in &runs {
        let bad: Vec<char> =
            format!("{}{}", r.stdout, r.stderr).chars().filter(|c| c.is_control() && *c != '\n').collect();
        assert!(bad.is_empty(), "control characters printed: {bad:?}");
        assert!(!r.stdout.contains("\\u001b"), "an escape survives in the JSON: {}", r.stdout);
    }
    assert!(runs[0].stdout.contains("evil?[2J"), "the lock holder is listed, cleaned: {}", runs[0].stdout);
    assert!(runs[2].stdout.contains("gh?[31most"), "the startup's FATAL is shown, cleaned: {}", runs[2].stdout);
    holder.close().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_letter_password_leaves_the_json_whole() {
    let cluster = Cluster::start();
    // "e" is in nearly every key and value: scrubbing the JSON text would break it.
    let url = support::password::password_role(&cluster, "app_e", "e").await;
    let r = doctor(&[&url, "--json"]).await;
    assert_eq!(r.code, 0, "{}", r.stdout);
    let j = r.json();
    assert_eq!(j["target"]["password_given"], true, "{j}");
    assert_eq!(j["server"]["max_connections"], 300, "keys and numbers untouched: {j}");
    assert_eq!(j["addresses"][0]["tcp"], "up");
}

/// A TLS-only server's URL with `query` (sslmode and sslrootcert).
fn tls_url(cluster: &Cluster, query: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{}/postgres?{query}", cluster.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_only_server_is_examined_over_tls() {
    let cluster = Cluster::start_tls();
    let ca = cluster.ca_cert().display().to_string();
    // The startup probe completes TLS itself and checks the certificate as sslmode says.
    for (query, checked) in [
        ("sslmode=require".to_owned(), "certificate not checked (sslmode=require)"),
        (format!("sslmode=verify-full&sslrootcert={ca}"), "certificate verified for 127.0.0.1"),
    ] {
        let r = doctor(&[&tls_url(&cluster, &query), "--json"]).await;
        assert_eq!(r.code, 0, "{query}: {}{}", r.stdout, r.stderr);
        let j = r.json();
        let startup = &j["addresses"][0]["startup"];
        assert_eq!(startup["outcome"], "ok", "{startup}");
        let detail = startup["detail"].as_str().unwrap_or_default();
        assert!(detail.starts_with("TLS 1.") && detail.contains(checked), "{startup}");
        assert!(detail.contains("authentication ok"), "the startup inside TLS got its answer: {startup}");
        assert!(j["server"]["version"].as_str().is_some_and(|v| v.starts_with(char::is_numeric)), "{j}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_only_server_refuses_a_wrong_ca_and_no_tls_with_clear_words() {
    let cluster = Cluster::start_tls();
    let wrong = cluster.wrong_ca_cert().display().to_string();
    let r = doctor(&[&tls_url(&cluster, &format!("sslmode=verify-full&sslrootcert={wrong}"))]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stdout.contains("UnknownIssuer")
            && r.stdout.contains("not signed by a CA")
            && r.stdout.contains("sslrootcert"),
        "the certificate problem is named: {}",
        r.stdout
    );
    let r = doctor(&[&tls_url(&cluster, "sslmode=disable")]).await;
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stdout.contains("the server requires TLS"), "{}", r.stdout);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_url_is_logged_in_through_not_looked_up() {
    let cluster = Cluster::start();
    let dir = cluster.socket_dir().expect("a throwaway cluster").display().to_string();
    let port = cluster.port();
    let encoded = dir.replace('/', "%2F");
    for url in [
        format!("postgres://postgres@/postgres?host={dir}&port={port}"),
        format!("postgres://postgres@{encoded}:{port}/postgres"),
    ] {
        let r = doctor(&[&url, "--json"]).await;
        assert_eq!(r.code, 0, "{url}: {}{}", r.stdout, r.stderr);
        let j = r.json();
        assert!(j["server"]["via"].as_str().is_some_and(|v| v.contains("unix socket")), "{j}");
        assert_eq!(j["addresses"].as_array().map(Vec::len), Some(0), "no DNS lookup, no TCP probe: {j}");
    }
}
