//! What the per-address reachability probe costs against a real PostgreSQL.
//!
//! `cargo bench --bench reach_cost` prints milliseconds per probe (mean, p50, p99): one
//! address (a host given as an IP), one resolved name (`localhost`), and 16 addresses at once
//! (the cap; the server address 16 times, so 16 backends forked per probe). Under `cargo test`
//! it runs a quick smoke pass.

#[path = "../tests/support/cluster.rs"]
mod cluster;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use poolwatch::reach::{probe_addresses, probe_host};

/// Between probes, as between two censuses (seconds apart in production). Back to back (about
/// 650 connects/s to one server), the 16-address probe hit a 1 s connect (a SYN retransmit)
/// in about 1 % of rounds; spaced, it does not.
const PAUSE: Duration = Duration::from_millis(20);

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rounds = if full { 500 } else { 5 };
    let cluster = cluster::Cluster::start();
    let port = cluster.port();
    let timeout = Duration::from_secs(5);
    println!("reachability probe cost ({rounds} probes each, PostgreSQL on 127.0.0.1:{port}):");

    let mut ms = Vec::new();
    for _ in 0..rounds {
        tokio::time::sleep(PAUSE).await;
        let t = Instant::now();
        let r = probe_host("127.0.0.1", port, timeout).await;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(r.up(), 1, "{r:?}");
    }
    report("  1 address (IP literal, no lookup):", ms);

    let mut ms = Vec::new();
    for _ in 0..rounds {
        tokio::time::sleep(PAUSE).await;
        let t = Instant::now();
        let r = probe_host("localhost", port, timeout).await;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(r.up() >= 1, "{r:?}");
    }
    report("  `localhost` (lookup + probe):", ms);

    let sixteen = [SocketAddr::from(([127, 0, 0, 1], port)); 16];
    let mut ms = Vec::new();
    for _ in 0..rounds {
        tokio::time::sleep(PAUSE).await;
        let t = Instant::now();
        let r = probe_addresses(&sixteen, timeout).await;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(r.iter().all(|a| a.up), "{r:?}");
    }
    report("  16 addresses at once:", ms);
}

fn report(what: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len() as f64;
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    let max = ms.last().copied().unwrap_or_default();
    println!("{what:<40} mean {mean:.3} ms, p50 {:.3} ms, p99 {:.3} ms, max {max:.3} ms", at(0.5), at(0.99));
}
