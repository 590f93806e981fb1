//! `poolwatch doctor <DATABASE_URL>`: the on-call engineer's check of a PostgreSQL server:
//! every address, the startup, sessions, stuck sessions, advisory locks, headroom, config
//! hazards and the pooler. Install with `cargo install poolwatch-cli`.

// Who uses whom, one way only: `text` (cleaning, durations) and `report` (the plain data found)
// use no other module; `target` uses text; `args` uses target; `startup` uses report, tls and text;
// `tls` (the probe's rustls client) uses text; `doctor` (the checks) uses args, startup, tls,
// report and text; `render` uses report and text.
mod args;
mod doctor;
mod render;
mod report;
mod startup;
mod target;
mod text;
mod tls;

// The sqlx the library is built with (one per build, chosen by this crate's features), with
// TLS on: the CLI's own queries and logins go through it.
#[cfg(all(feature = "sqlx-0_8", not(feature = "sqlx-0_9")))]
extern crate sqlx08 as sqlx;
#[cfg(feature = "sqlx-0_9")]
extern crate sqlx09 as sqlx;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = match args::parse(std::env::args_os()) {
        Ok(args) => args,
        Err(args::Stop::Info(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(args::Stop::Usage(message)) => {
            eprintln!("poolwatch: {message}");
            return ExitCode::from(2);
        }
    };
    for warning in &args.target.warnings {
        eprintln!("poolwatch: warning: {warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("poolwatch: cannot start the Tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let report = runtime.block_on(doctor::run(&args));
    // Server strings are cleaned where they are read; the whole output is cleaned and the
    // password scrubbed once more here, so that no path can print either.
    if args.json {
        match render::json(&report, &args.target.secrets) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("poolwatch: {}", target::scrub(&text::clean(&e.to_string()), &args.target.secrets));
                return ExitCode::from(2);
            }
        }
    } else {
        print!("{}", target::scrub(&text::clean_output(&render::human(&report)), &args.target.secrets));
    }
    // Probe tasks still waiting on a dead address are abandoned, not awaited.
    runtime.shutdown_background();
    if report.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}
