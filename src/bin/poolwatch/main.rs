//! `poolwatch doctor <DATABASE_URL>`: the on-call engineer's check of a PostgreSQL server:
//! every address, the startup, sessions, stuck sessions, advisory locks, headroom, config
//! hazards and the pooler. Install with `cargo install --path . --features cli`.

mod args;
mod doctor;
mod render;
mod startup;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = match args::parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            print!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("poolwatch: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("poolwatch: cannot start the Tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let report = runtime.block_on(doctor::run(&args));
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("poolwatch: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", render::human(&report));
    }
    // Probe tasks still waiting on a dead address are abandoned, not awaited.
    runtime.shutdown_background();
    if report.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}
