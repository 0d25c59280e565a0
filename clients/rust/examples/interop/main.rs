//! Runs the named interoperability cases of tests/interop/cases.md against a
//! real connmeta server. Each case first acts as the proxy (ReportService)
//! to create the state it needs, then as a consumer through the `connmeta`
//! crate.
//!
//! ```text
//! cargo run --example interop -- --target 127.0.0.1:50051 --case get_not_found
//! cargo run --example interop -- --target 127.0.0.1:50051 --tls-ca certs/ca.pem \
//!     --tls-cert certs/writer.pem --tls-key certs/writer.key --case health
//! cargo run --example interop -- --list
//! ```
//!
//! Exits 0 when the case passed, 1 with a message saying what differed when
//! it failed, 2 on a usage error.

mod authz;
mod cases;
mod errors;
mod informer;
mod keepalive;
mod proxy;
mod restart;
mod router;

use std::process::ExitCode;
use std::time::Duration;

pub struct Env {
    pub target: String,
    pub unix_target: String,
    /// How long the keepalive case holds its idle watch.
    pub keepalive: Duration,
    pub client: connmeta::Client,
    pub proxy: proxy::Proxy,
    /// What every connection of a case is made with: mutual TLS for TCP
    /// targets when --tls-ca is given (Unix sockets ignore it).
    pub opts: connmeta::ConnectOptions,
    /// Case authz_roles: ca.pem and <role>.pem/.key.
    pub roles_dir: String,
}

impl Env {
    /// Connects to `target` with the case's options (TLS included).
    pub async fn connect(&self, target: &str) -> Result<connmeta::Client, String> {
        connmeta::connect_with(target, &self.opts)
            .await
            .map_err(|e| e.to_string())
    }
}

const USAGE: &str = "usage: interop --target ADDR [--unix-target unix:///path] [--tls-ca CA --tls-cert CERT --tls-key KEY] [--roles-dir DIR] --case NAME [--keepalive-duration SECONDS] | --list";

struct Args {
    target: String,
    unix_target: String,
    case: String,
    list: bool,
    keepalive: Duration,
    tls_ca: String,
    tls_cert: String,
    tls_key: String,
    roles_dir: String,
}

fn parse_args() -> Result<Args, String> {
    let secs = |v: &str, what: &str| {
        v.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("{what}={v:?}: want a number of seconds"))
    };
    let mut args = Args {
        target: String::new(),
        unix_target: String::new(),
        case: String::new(),
        list: false,
        keepalive: match std::env::var("CONNMETA_INTEROP_KEEPALIVE_SECONDS") {
            Ok(v) if !v.is_empty() => secs(&v, "CONNMETA_INTEROP_KEEPALIVE_SECONDS")?,
            _ => Duration::from_secs(60),
        },
        tls_ca: String::new(),
        tls_cert: String::new(),
        tls_key: String::new(),
        roles_dir: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // Accept both "--flag value" and "--flag=value", like Go's flag package.
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (flag.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.trim_start_matches('-') {
            "target" => args.target = value()?,
            "unix-target" => args.unix_target = value()?,
            "case" => args.case = value()?,
            "keepalive-duration" => args.keepalive = secs(&value()?, "--keepalive-duration")?,
            "tls-ca" => args.tls_ca = value()?,
            "tls-cert" => args.tls_cert = value()?,
            "tls-key" => args.tls_key = value()?,
            "roles-dir" => args.roles_dir = value()?,
            "list" => args.list = true,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.tls_cert.is_empty() != args.tls_key.is_empty() {
        return Err("--tls-cert and --tls-key go together".into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.list {
        for c in cases::CASES {
            println!("{}\t{}", c.name, c.proves);
        }
        return ExitCode::SUCCESS;
    }
    let Some(case) = cases::CASES.iter().find(|c| c.name == args.case) else {
        let names: Vec<_> = cases::CASES.iter().map(|c| c.name).collect();
        eprintln!(
            "{USAGE}\nunknown case {:?}; cases: {}",
            args.case,
            names.join(", ")
        );
        return ExitCode::from(2);
    };
    if args.target.is_empty() {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    // Generous but finite: a hung server must fail the case, not CI.
    let limit = Duration::from_secs(60) + args.keepalive;
    let result = tokio::time::timeout(limit, run(case, args)).await;
    match result {
        Ok(Ok(())) => {
            println!("PASS rust {}", case.name);
            ExitCode::SUCCESS
        }
        Ok(Err(e)) => {
            eprintln!("FAIL rust {}: {e}", case.name);
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("FAIL rust {}: no result within {limit:?}", case.name);
            ExitCode::FAILURE
        }
    }
}

async fn run(case: &cases::Case, args: Args) -> Result<(), String> {
    let mut opts = connmeta::ConnectOptions::default();
    if !args.tls_ca.is_empty() {
        opts.tls = Some(connmeta::TlsConfig {
            ca: args.tls_ca.into(),
            identity: (!args.tls_cert.is_empty())
                .then(|| (args.tls_cert.into(), args.tls_key.into())),
            server_name: None,
        });
    }
    let client = connmeta::connect_with(&args.target, &opts)
        .await
        .map_err(|e| e.to_string())?;
    let _ = proxy::CASE_NAME.set(case.name);
    let proxy = proxy::Proxy::new(&client);
    let mut env = Env {
        target: args.target,
        unix_target: args.unix_target,
        keepalive: args.keepalive,
        client,
        proxy,
        opts,
        roles_dir: args.roles_dir,
    };
    (case.run)(&mut env).await
}
