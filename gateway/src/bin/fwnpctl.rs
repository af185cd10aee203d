//! `fwnpctl`: the operator's and auditor's command line for FWNP.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use fwnp_gateway::admin_client::{AdminClient, AdminClientError, DEFAULT_ADMIN_SOCKET};
use fwnp_gateway::api::{
    AppView, AuditEventView, AuditFollowAnswer, AuditPageAnswer, ExplainAnswer, ExplainRequest,
    GrantView, LeasesAnswer, LifetimeAsked, ReloadAnswer, ReportAnswer, RevokeAnswer,
    RevokeRequest,
};
use fwnp_gateway::policy::Policy;
use fwnp_trust::pki::{self, RevocationReason, Validity};
use serde_json::{Value, json};

const EXIT_NEGATIVE: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_FAILED: u8 = 4;

/// Operate and audit an FWNP gateway: certificates, policy, live leases, the audit trail.
///
/// Most commands talk to the running gateway over its admin socket (root only); `pki`,
/// `policy check` and `policy explain --policy FILE` work on files and need no gateway.
///
/// Exit codes: 0 success; 1 a negative answer (invalid policy, request denied by `explain`,
/// no such lease); 2 usage error; 3 the gateway's admin socket cannot be reached; 4 any other
/// failure (files, certificates).
#[derive(Debug, Parser)]
#[command(name = "fwnpctl", version, about, long_about)]
struct Cli {
    /// The gateway's admin socket.
    #[arg(long, global = true, env = "FWNP_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    admin: PathBuf,
    /// Print JSON for machines instead of tables for people.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Certificates: a CA for the deployment, gateway and host certificates, revocation.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Check, explain and reload the policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Live leases with the time they have left, soonest expiry first, then by lease id.
    ///
    /// Example: fwnpctl leases --host 'fwnp://host/web-*' --port 443
    Leases {
        /// Host identity, exact or a glob such as 'fwnp://host/web-*'.
        #[arg(long)]
        host: Option<String>,
        /// Application: its name or executable as the host told, or an application id.
        #[arg(long)]
        app: Option<String>,
        /// A port one of the lease's grants covers.
        #[arg(long)]
        port: Option<u16>,
        /// Only grants of this protocol (tcp, udp, sctp, udplite).
        #[arg(long)]
        protocol: Option<String>,
        /// Only leases last opened or renewed with the certificate of this serial (hexadecimal,
        /// colons allowed): what revoking it would end.
        #[arg(long)]
        serial: Option<String>,
    },
    /// Revoke a live lease now: the kernel closes it and its host is told.
    Revoke {
        /// The lease id (32 hexadecimal digits, as `fwnpctl leases` shows).
        id: String,
        /// Why, recorded in the audit trail and sent to the host.
        #[arg(long)]
        reason: Option<String>,
    },
    /// The audit trail: every request, decision, renewal, release, expiry and revocation. In a
    /// cluster, every member's events merged by time; members whose events may be missing are
    /// named on standard error. `--follow` then prints the new events as they come: in a
    /// cluster every member's, as each publishes them (within a second or so).
    ///
    /// Examples: fwnpctl audit --since 1h --outcome denied
    ///           fwnpctl audit --host 'fwnp://host/web-01' --follow
    Audit {
        /// Only events since this long ago (e.g. 1h, 7d) or since this Unix time in ms.
        #[arg(long)]
        since: Option<String>,
        /// Only events before this long ago or this Unix time in ms.
        #[arg(long)]
        until: Option<String>,
        /// Host identity, exact or glob.
        #[arg(long)]
        host: Option<String>,
        /// Application name, executable or id.
        #[arg(long)]
        app: Option<String>,
        /// A port asked for or granted.
        #[arg(long)]
        port: Option<u16>,
        /// Only these outcomes: granted, denied, renewed, released, expired, revoked, error.
        #[arg(long, value_delimiter = ',')]
        outcome: Vec<String>,
        /// Only these kinds of event (request, decision, grant, renewal, release, expiry,
        /// revocation, auth-failure, policy-reload, reconcile).
        #[arg(long, value_delimiter = ',')]
        kind: Vec<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Keep printing new events as they happen (until interrupted).
        #[arg(long, short)]
        follow: bool,
    },
    /// What each host and application asked for, how often and how long, and a suggested
    /// policy in the policy file's own format: which ports do applications really need? In a
    /// cluster, through every member; members whose events may be missing are named on
    /// standard error.
    Report {
        /// The window: since this long ago.
        #[arg(long, default_value = "30d")]
        since: String,
        /// Only this host (exact or glob).
        #[arg(long)]
        host: Option<String>,
        /// Print only the suggested policy.
        #[arg(long)]
        policy_only: bool,
    },
    /// The gateway's epoch, counts and uptime; in a cluster, every member (live or absent)
    /// with the etcd revision it last applied and the policy version it holds.
    Status,
    /// Shell completions, e.g. `fwnpctl completions bash > /etc/bash_completion.d/fwnpctl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum PkiCommand {
    /// Create the deployment's CA (ca.pem, ca.key mode 0600, an empty crl.pem) in DIR.
    Init {
        /// The CA directory, e.g. /etc/fwnp/pki.
        dir: PathBuf,
        /// The CA's common name. The CA's key identifier joins it in the CA's name (as its
        /// serialNumber attribute), so that two CAs of the same common name are never confused.
        #[arg(long, default_value = "FWNP CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = pki::DEFAULT_CA_VALIDITY_DAYS)]
        days: u32,
    },
    /// Issue a certificate signed by the CA: `pki issue gateway NAME` or `pki issue host NAME`.
    Issue {
        /// gateway or host.
        role: Role,
        /// The certificate's name: files NAME.pem and NAME.key in the CA directory; a host's
        /// identity is fwnp://host/NAME unless --uri or --dns say otherwise.
        name: String,
        /// The CA directory.
        #[arg(long, env = "FWNP_PKI_DIR", default_value = "/etc/fwnp/pki")]
        dir: PathBuf,
        /// DNS names (a gateway: the names hosts connect to; a host: identity fallback).
        #[arg(long)]
        dns: Vec<String>,
        /// IP addresses (a host: the addresses it may open; a gateway: where hosts reach it).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// URI identities for a host, e.g. spiffe://example.org/host/web-01.
        #[arg(long)]
        uri: Vec<String>,
        /// Sign this CSR instead of making a key (the host keeps its key).
        #[arg(long)]
        csr: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = pki::DEFAULT_LEAF_VALIDITY_DAYS)]
        days: u32,
    },
    /// Revoke a certificate: it is added to the CRL (crl.pem) the gateway reads on reload.
    Revoke {
        /// The certificate (PEM).
        cert: PathBuf,
        /// The CA directory.
        #[arg(long, env = "FWNP_PKI_DIR", default_value = "/etc/fwnp/pki")]
        dir: PathBuf,
        /// unspecified, key-compromise, affiliation-changed, superseded, cessation-of-operation...
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
    /// The certificates revoked so far.
    Revoked {
        /// The CA directory.
        #[arg(long, env = "FWNP_PKI_DIR", default_value = "/etc/fwnp/pki")]
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Role {
    Gateway,
    Host,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy file: every mistake with its line and reason.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// The decision for a request, the rule that made it and why, step by step.
    ///
    /// Example: fwnpctl policy explain --host fwnp://host/web-01 --address 10.1.0.5 --open tcp/443
    Explain {
        /// The host's identity.
        #[arg(long)]
        host: String,
        /// What it asks to open: tcp/8080, udp/5000-5010 or app:https.
        #[arg(long)]
        open: String,
        /// The host address to open (and the address the host holds).
        #[arg(long)]
        address: IpAddr,
        /// Remote prefixes it asks for.
        #[arg(long)]
        from: Vec<String>,
        /// Lifetime asked, e.g. 10m.
        #[arg(long = "for")]
        lifetime: Option<String>,
        /// Evaluate this file instead of asking the running gateway.
        #[arg(long)]
        policy: Option<PathBuf>,
    },
    /// Make the gateway load its policy file again; live leases it no longer allows are revoked.
    Reload,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fwnpctl: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(Failure::Admin(e)) => {
            eprintln!("fwnpctl: {e}");
            ExitCode::from(match e {
                AdminClientError::Connect { .. } => EXIT_UNREACHABLE,
                AdminClientError::Refused { status: 404, .. } => EXIT_NEGATIVE,
                _ => EXIT_FAILED,
            })
        }
        Err(Failure::Other(message)) => {
            eprintln!("fwnpctl: {message}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

enum Failure {
    Admin(AdminClientError),
    Other(String),
}

impl From<AdminClientError> for Failure {
    fn from(e: AdminClientError) -> Self {
        Failure::Admin(e)
    }
}

impl From<pki::PkiError> for Failure {
    fn from(e: pki::PkiError) -> Self {
        Failure::Other(e.to_string())
    }
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", percent_encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn run(cli: Cli) -> Result<ExitCode, Failure> {
    let admin = AdminClient::new(&cli.admin);
    let json_out = cli.json;
    match cli.command {
        Command::Pki(command) => pki_command(command, json_out),
        Command::Policy(PolicyCommand::Check { file }) => Ok(policy_check(&file, json_out)),
        Command::Policy(PolicyCommand::Explain {
            host,
            open,
            address,
            from,
            lifetime,
            policy,
        }) => {
            let lifetime = match lifetime {
                Some(text) => Some(
                    fwnp_proto::duration::parse_argument(&text)
                        .map_err(|e| Failure::Other(format!("--for {text:?}: {e}")))?
                        .as_secs(),
                ),
                None => None,
            };
            let request = ExplainRequest {
                host,
                open,
                addresses: Vec::new(),
                address: Some(address.to_string()),
                from,
                lifetime: lifetime.map(LifetimeAsked::Secs),
            };
            let answer: ExplainAnswer = match policy {
                Some(file) => {
                    let policy = Policy::load(&file).map_err(|e| Failure::Other(e.to_string()))?;
                    fwnp_gateway::explain::explain(&policy, &request)
                        .map_err(|e| Failure::Other(e.to_string()))?
                }
                None => {
                    let path = "/v1/policy/explain";
                    let answer = admin.post(path, &AdminClient::body(&request)?).await?;
                    AdminClient::typed(path, &answer)?
                }
            };
            if json_out {
                println!("{}", json!(answer));
            } else {
                println!("{}", answer.text);
            }
            Ok(if answer.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NEGATIVE)
            })
        }
        Command::Policy(PolicyCommand::Reload) => {
            let path = "/v1/policy/reload";
            let answer = admin.post(path, &Value::Object(Default::default())).await?;
            if json_out {
                println!("{answer}");
            } else {
                let answer: ReloadAnswer = AdminClient::typed(path, &answer)?;
                let reloaded = answer.reloaded;
                match &reloaded.superseded {
                    Some(s) => println!(
                        "policy {} published as cluster policy version {}, but not in force: \
                         a newer version is ({}); 0 live leases revoked",
                        reloaded.policy, s.version, s.in_force
                    ),
                    None => println!(
                        "policy {} loaded; {} live leases revoked",
                        reloaded.policy,
                        reloaded.revoked.len()
                    ),
                }
                for r in reloaded.revoked {
                    println!("  revoked {} ({}): {}", r.lease, r.host, r.why);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Leases {
            host,
            app,
            port,
            protocol,
            serial,
        } => {
            let q = query(&[
                ("host", host),
                ("app", app),
                ("port", port.map(|p| p.to_string())),
                ("protocol", protocol),
                ("serial", serial),
            ]);
            let path = format!("/v1/leases{q}");
            let answer = admin.get(&path).await?;
            if json_out {
                println!("{answer}");
            } else {
                print_leases(&AdminClient::typed(&path, &answer)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Revoke { id, reason } => {
            let path = format!("/v1/leases/{}/revoke", percent_encode(&id));
            let answer = admin
                .post(&path, &AdminClient::body(&RevokeRequest { reason })?)
                .await?;
            if json_out {
                println!("{answer}");
            } else {
                let answer: RevokeAnswer = AdminClient::typed(&path, &answer)?;
                println!("revoked {} held by {}", answer.revoked, answer.host);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            since,
            until,
            host,
            app,
            port,
            outcome,
            kind,
            limit,
            follow,
        } => {
            let base = [
                ("host", host),
                ("app", app),
                ("port", port.map(|p| p.to_string())),
                ("outcome", (!outcome.is_empty()).then(|| outcome.join(","))),
                ("kind", (!kind.is_empty()).then(|| kind.join(","))),
                ("until", until),
            ];
            let mut first = base.to_vec();
            first.push(("since", since));
            first.push(("limit", Some(limit.to_string())));
            let path = format!("/v1/audit{}", query(&first));
            let page: AuditPageAnswer = AdminClient::typed(&path, &admin.get(&path).await?)?;
            for member in &page.unreachable {
                eprintln!(
                    "fwnpctl: the events of member {} may be missing: {}",
                    member.site, member.why
                );
            }
            let mut events = page.events;
            events.reverse(); // oldest first on screen, like a log
            print_audit(&events, json_out, true);
            if follow {
                follow_audit(&admin, &base, &events, page.follow_from, json_out).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            since,
            host,
            policy_only,
        } => {
            let path = format!(
                "/v1/report{}",
                query(&[("since", Some(since)), ("host", host)])
            );
            let answer = admin.get(&path).await?;
            if json_out {
                println!("{answer}");
            } else {
                let report: ReportAnswer = AdminClient::typed(&path, &answer)?;
                for member in &report.unreachable {
                    eprintln!(
                        "fwnpctl: the events of member {} may be missing from the report: {}",
                        member.site, member.why
                    );
                }
                if !policy_only {
                    print_report(&report);
                    println!();
                    println!("# Suggested policy:");
                }
                print!("{}", report.suggested_policy);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let answer = admin.get("/v1/status").await?;
            if json_out {
                println!("{answer}");
            } else if let Some(map) = answer.as_object() {
                // A backend this fwnpctl does not know (a newer gateway's) is printed as JSON.
                let store: Option<fwnp_gateway::api::StoreStatus> = map
                    .get("store_backend")
                    .and_then(|v| AdminClient::typed("/v1/status", v).ok());
                for (k, v) in map {
                    if k == "cluster" || (k == "store_backend" && store.is_some()) {
                        continue;
                    }
                    if let (true, Some(store)) = (k == "store", &store) {
                        print_store(store);
                        continue;
                    }
                    println!(
                        "{k:<18} {}",
                        if let Some(s) = v.as_str() {
                            s.to_owned()
                        } else {
                            v.to_string()
                        }
                    );
                }
                if let Some(cluster) = map.get("cluster") {
                    print_cluster(&AdminClient::typed("/v1/status", cluster)?);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "fwnpctl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn pki_command(command: PkiCommand, json_out: bool) -> Result<ExitCode, Failure> {
    let report = |issued: &pki::IssuedCertificate| {
        if json_out {
            println!(
                "{}",
                json!({
                    "certificate": issued.cert_path.display().to_string(),
                    "key": issued.key_path.as_ref().map(|p| p.display().to_string()),
                    "serial": issued.serial.as_str(),
                    "sha256": issued.fingerprint.to_string(),
                })
            );
        } else {
            println!("certificate  {}", issued.cert_path.display());
            if let Some(key) = &issued.key_path {
                println!("key          {} (mode 0600)", key.display());
            }
            println!("serial       {}", issued.serial.as_str());
            println!("sha256       {}", issued.fingerprint);
        }
    };
    match command {
        PkiCommand::Init { dir, name, days } => {
            report(&pki::init_ca(&dir, &name, Validity::days(days))?);
        }
        PkiCommand::Issue {
            role,
            name,
            dir,
            dns,
            ip,
            uri,
            csr,
            days,
        } => {
            let validity = Validity::days(days);
            let issued = match (role, csr) {
                (Role::Gateway, None) => pki::issue_gateway(&dir, &name, &dns, &ip, validity)?,
                (Role::Host, None) => pki::issue_host(&dir, &name, &ip, &uri, &dns, validity)?,
                (Role::Host, Some(csr)) => {
                    pki::issue_from_csr(&dir, &csr, &name, &ip, &uri, &dns, validity)?
                }
                (Role::Gateway, Some(_)) => {
                    return Err(Failure::Other("--csr is for host certificates".into()));
                }
            };
            report(&issued);
        }
        PkiCommand::Revoke { cert, dir, reason } => {
            let reason: RevocationReason = reason
                .parse()
                .map_err(|e: pki::UnknownRevocationReason| Failure::Other(e.to_string()))?;
            let revocation = pki::revoke(&dir, &cert, reason)?;
            if json_out {
                println!(
                    "{}",
                    json!({ "serial": revocation.serial.as_str(), "newly_revoked": revocation.newly_revoked, "crl": revocation.crl_path.display().to_string(), "revoked_count": revocation.revoked_count })
                );
            } else {
                println!(
                    "{} serial {}; {} now lists {} certificates. Reload the gateway (fwnpctl policy reload, or SIGHUP) to apply it.",
                    if revocation.newly_revoked {
                        "revoked"
                    } else {
                        "already revoked:"
                    },
                    revocation.serial.as_str(),
                    revocation.crl_path.display(),
                    revocation.revoked_count
                );
            }
        }
        PkiCommand::Revoked { dir } => {
            let list = pki::revoked_list(&dir)?;
            if json_out {
                let rows: Vec<Value> = list
                    .iter()
                    .map(|(serial, when, reason)| json!({ "serial": serial.as_str(), "revoked_at": humantime::format_rfc3339_seconds(*when).to_string(), "reason": reason.as_str() }))
                    .collect();
                println!("{}", Value::Array(rows));
            } else {
                table(
                    &["SERIAL", "REVOKED", "REASON"],
                    list.iter()
                        .map(|(serial, when, reason)| {
                            vec![
                                serial.as_str().to_owned(),
                                humantime::format_rfc3339_seconds(*when).to_string(),
                                reason.as_str().to_owned(),
                            ]
                        })
                        .collect(),
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn policy_check(file: &Path, json_out: bool) -> ExitCode {
    match Policy::load(file) {
        Ok(policy) => {
            if json_out {
                println!(
                    "{}",
                    json!({ "valid": true, "summary": policy.summary(), "warnings": policy.warnings() })
                );
            } else {
                println!("{}: valid", file.display());
                let summary = policy.summary();
                if let Ok(Value::Object(map)) = serde_json::to_value(&summary) {
                    for key in ["groups", "rules", "applications"] {
                        if let Some(Value::Array(items)) = map.get(key) {
                            println!("  {} {key}", items.len());
                        }
                    }
                }
                for warning in policy.warnings() {
                    println!(
                        "{}:{}: warning: {}",
                        file.display(),
                        warning.line,
                        warning.message
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json_out {
                println!("{}", json!({ "valid": false, "error": e.to_string() }));
            } else {
                eprintln!("{e}");
            }
            ExitCode::from(EXIT_NEGATIVE)
        }
    }
}

fn time_left(ms: u64) -> String {
    let secs = ms / 1000;
    if secs >= 3600 {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    } else if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

fn when(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn grants_text(grants: &[GrantView]) -> String {
    grants
        .iter()
        .map(GrantView::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        println!("{}", text.join("  "));
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row);
    }
}

fn print_leases(answer: &LeasesAnswer) {
    if answer.leases.is_empty() {
        println!("no live leases");
        return;
    }
    table(
        &["LEASE", "HOST", "APP", "LEFT", "GRANTS"],
        answer
            .leases
            .iter()
            .map(|l| {
                vec![
                    l.id.clone(),
                    l.identity.clone(),
                    shortened(
                        l.app.as_ref().and_then(AppView::label).unwrap_or("-"),
                        APP_COLUMN_WIDTH,
                    ),
                    time_left(l.remaining_ms),
                    grants_text(&l.grants),
                ]
            })
            .collect(),
    );
}

/// The widest the APP column of `fwnpctl leases` gets: an application's name may be a whole
/// command line, which `--json` gives in full.
const APP_COLUMN_WIDTH: usize = 32;

/// `text` cut to at most `width` characters, the cut marked with `…`.
fn shortened(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The store as what it is; an etcd store with its cluster and what its transactions met.
fn print_store(store: &fwnp_gateway::api::StoreStatus) {
    use fwnp_gateway::api::StoreStatus;
    match store {
        StoreStatus::Sqlite { database } => println!("{:<18} sqlite {database}", "store"),
        StoreStatus::Etcd(etcd) => {
            println!("{:<18} etcd", "store");
            println!("{:<18} {}", "  endpoints", etcd.endpoints.join(","));
            println!("{:<18} {}", "  prefix", etcd.prefix);
            println!("{:<18} {}", "  site", etcd.site);
            println!(
                "{:<18} {}",
                "  applied revision",
                etcd.applied_revision
                    .map_or_else(|| "none yet".to_owned(), |r| r.to_string())
            );
            println!(
                "{:<18} {} ({} found a key changed and were retried, {} without an answer)",
                "  transactions", etcd.transactions, etcd.conflicts, etcd.unanswered
            );
            println!("{:<18} {}", "  audit database", etcd.audit_database);
        }
        other => println!("{:<18} {other:?}", "store"),
    }
}

fn print_cluster(cluster: &fwnp_gateway::api::ClusterStatus) {
    let policy = &cluster.policy;
    println!("{:<18} {}", "site", cluster.site);
    println!("{:<18} {}", "revision", cluster.revision);
    println!(
        "{:<18} version {} sha256 {}{}",
        "cluster policy",
        policy.version,
        policy.hash,
        if policy.file_differs {
            format!(
                " (this gateway's file differs: sha256 {})",
                policy.file_hash
            )
        } else {
            String::new()
        }
    );
    if let Some(error) = &cluster.error {
        println!("{:<18} not listed: {error}", "members");
        return;
    }
    println!("members:");
    for m in &cluster.members {
        println!(
            "  {:<16} {:<7} revision {:<8} policy v{} {} since {} {}",
            m.site,
            if m.live { "live" } else { "absent" },
            m.revision,
            m.policy_version,
            m.quic.join(","),
            when(m.started_ms),
            m.version
        );
    }
}

/// Prints the audit events that follow those of the page just printed (`printed`), as they
/// happen, until interrupted: in a cluster every member's (from the page's `follow_from`),
/// else this gateway's own.
async fn follow_audit(
    admin: &AdminClient,
    base: &[(&str, Option<String>)],
    printed: &[AuditEventView],
    follow_from: Option<String>,
    json_out: bool,
) -> Result<(), Failure> {
    // The newest event printed of each member: nothing that follows repeats one of them,
    // whatever cursor the gateway gave.
    let mut shown: HashMap<Option<String>, u64> = HashMap::new();
    for event in printed {
        let at = shown.entry(event.site.clone()).or_default();
        *at = (*at).max(event.id);
    }
    let mut after = match follow_from {
        Some(cursor) => cursor,
        // From the newest event printed; with none printed, from the newest of any kind.
        None => match shown.get(&None) {
            Some(id) => id.to_string(),
            None => {
                let path = "/v1/audit?limit=1&scope=local";
                let newest: AuditPageAnswer = AdminClient::typed(path, &admin.get(path).await?)?;
                newest.events.first().map_or(0, |e| e.id).to_string()
            }
        },
    };
    let mut warned: Vec<String> = Vec::new();
    loop {
        let mut pairs = base.to_vec();
        pairs.push(("after", Some(after.clone())));
        pairs.push(("wait", Some("30s".into())));
        pairs.push(("order", Some("oldest".into())));
        let path = format!("/v1/audit{}", query(&pairs));
        let answer: AuditFollowAnswer = AdminClient::typed(&path, &admin.get(&path).await?)?;
        // A member's warning once, again only after its events could be read meanwhile.
        let now: Vec<String> = answer.unreachable.iter().map(|m| m.site.clone()).collect();
        for member in &answer.unreachable {
            if !warned.contains(&member.site) {
                eprintln!(
                    "fwnpctl: the events of member {} may be missing: {}",
                    member.site, member.why
                );
            }
        }
        warned = now;
        let fresh: Vec<AuditEventView> = answer
            .events
            .into_iter()
            .filter(|e| shown.get(&e.site).is_none_or(|&id| e.id > id))
            .collect();
        print_audit(&fresh, json_out, false);
        after = answer
            .next_cluster_after
            .unwrap_or_else(|| answer.next_after.to_string());
    }
}

fn print_audit(events: &[AuditEventView], json_out: bool, header: bool) {
    if json_out {
        for e in events {
            println!("{}", serde_json::to_value(e).unwrap_or_default());
        }
        return;
    }
    if header && events.is_empty() {
        println!("no matching events");
        return;
    }
    for e in events {
        let mut parts = vec![when(e.time_ms)];
        if let Some(site) = &e.site {
            parts.push(format!("[{site}]"));
        }
        parts.extend([
            format!("{:<12}", e.kind),
            format!("{:<9}", e.outcome.as_deref().unwrap_or("-")),
            e.identity.as_deref().unwrap_or("-").to_owned(),
        ]);
        if let Some(label) = e.request.as_ref().and_then(|r| r.opening.as_deref()) {
            parts.push(label.to_owned());
        } else if !e.grants.is_empty() {
            parts.push(grants_text(&e.grants));
        }
        if let Some(lease) = &e.lease {
            parts.push(format!("lease {lease}"));
        }
        if let Some(rule) = &e.rule {
            parts.push(format!("rule {rule}"));
        }
        if let Some(code) = &e.code {
            parts.push(format!("[{code}]"));
        }
        if let Some(reason) = &e.reason {
            parts.push(format!("- {reason}"));
        }
        println!("{}", parts.join(" "));
    }
}

fn print_report(answer: &ReportAnswer) {
    if answer.rows.is_empty() {
        println!("no requests in the window");
        return;
    }
    table(
        &[
            "HOST",
            "APP",
            "OPENING",
            "ASKED",
            "GRANTED",
            "DENIED",
            "LEASES",
            "MEDIAN HELD",
            "P90 HELD",
        ],
        answer
            .rows
            .iter()
            .map(|r| {
                vec![
                    r.identity.clone(),
                    r.app.clone().unwrap_or_else(|| "-".into()),
                    r.opening.clone(),
                    r.requests.to_string(),
                    r.granted.to_string(),
                    r.denied.to_string(),
                    r.leases.to_string(),
                    time_left(r.median_held_ms),
                    time_left(r.p90_held_ms),
                ]
            })
            .collect(),
    );
}
