//! The inspection commands: ask the agent's admin API, print a table or the JSON.

use std::{io::Write, process::ExitCode};

use http_body_util::BodyExt;
use hyper::Method;
use serde_json::Value;

use super::{
    Cli, Command, Output, PolicyCommand,
    client::{AdminClient, ClientError},
    render::{age_ms, bytes, cell, short_identity, table},
};
use crate::admin::REFUSED;

/// Runs an inspection command against the agent; the exit code says how it went.
pub fn run(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("ferry: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let client = AdminClient::new(&cli.admin);
    match runtime.block_on(dispatch(&client, cli.command, cli.output)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ferry: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn dispatch(client: &AdminClient, command: Command, output: Output) -> Result<u8, ClientError> {
    let (path, render): (String, fn(&Value) -> String) = match command {
        Command::Status => ("/status".into(), status),
        Command::Workloads => ("/workloads".into(), workloads),
        Command::Services => ("/services".into(), services),
        Command::Policies => ("/policies".into(), policies),
        Command::Certs => ("/certificates".into(), certs),
        Command::Connections => ("/connections".into(), connections),
        Command::Metrics => {
            print!("{}", String::from_utf8_lossy(&client.get("/metrics").await?));
            return Ok(0);
        }
        Command::Flows { follow, denied } => return flows(client, follow, denied, output).await,
        Command::Policy { command: PolicyCommand::Check { from, to } } => {
            let path = format!("/policy/check?from={}&to={}", encode(&from), encode(&to));
            let result = client.get_json(&path).await?;
            print_value(&result, output, check);
            return Ok(if result["verdict"] == "allow" { 0 } else { 1 });
        }
        Command::Agent { .. }
        | Command::Signer { .. }
        | Command::Ca { .. }
        | Command::Completions { .. }
        | Command::Crd => {
            unreachable!("run locally by main")
        }
    };
    let value = client.get_json(&path).await?;
    print_value(&value, output, render);
    Ok(0)
}

fn print_value(value: &Value, output: Output, render: fn(&Value) -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value).unwrap_or_default()),
        Output::Table => println!("{}", render(value)),
    }
}

/// Percent-encodes a query value (identities carry `/`, addresses `:` and `[`).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn rows(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn status(v: &Value) -> String {
    let ready = match v["not_ready"].as_str() {
        Some(why) => format!("no: {why}"),
        None => "yes".into(),
    };
    let keys = [
        "node",
        "version",
        "uptime_seconds",
        "trust_domain",
        "workloads_known",
        "workloads_captured",
        "workloads_uncaptured",
        "policies",
        "node_traffic",
        "connections",
        "undelivered_bytes",
        "stream_window_bytes",
        "certificates",
        "certificates_pending",
        "certificates_expired",
        "signer",
        "trusted_roots",
        "config",
    ];
    let rows = keys.iter().map(|k| vec![k.replace('_', " "), cell(&v[*k])]);
    table(&["field", "value"], std::iter::once(vec!["ready".into(), ready]).chain(rows))
}

fn workloads(v: &Value) -> String {
    table(
        &["workload", "ips", "node", "identity", "meshed", "captured", "netns"],
        rows(v).iter().map(|w| {
            vec![
                format!("{}/{}", cell(&w["namespace"]), cell(&w["name"])),
                cell(&w["ips"]),
                cell(&w["node"]),
                short_identity(&w["identity"]),
                cell(&w["meshed"]),
                match w["capture_error"].as_str() {
                    Some(error) => format!("failing: {error}"),
                    None => cell(&w["captured"]),
                },
                cell(&w["netns"]),
            ]
        }),
    )
}

fn services(v: &Value) -> String {
    if rows(v).is_empty() {
        return "no services".into();
    }
    table(
        &["service", "vips", "ports", "endpoints"],
        rows(v)
            .iter()
            .map(|s| vec![cell(&s["hostname"]), cell(&s["vips"]), cell(&s["ports"]), cell(&s["endpoints"])]),
    )
}

fn policies(v: &Value) -> String {
    table(
        &["policy", "action", "dry-run", "selector", "rules", "warnings"],
        rows(v).iter().map(|p| {
            let selector = match p["selector"].as_object() {
                Some(labels) => {
                    labels.iter().map(|(k, v)| format!("{k}={}", cell(v))).collect::<Vec<_>>().join(",")
                }
                None if p["action"] == REFUSED => "-".into(),
                None => "(namespace)".into(),
            };
            vec![
                format!("{}/{}", cell(&p["namespace"]), cell(&p["name"])),
                cell(&p["action"]),
                cell(&p["dry_run"]),
                selector,
                cell(&p["rules"]),
                cell(&p["warnings"]),
            ]
        }),
    )
}

fn certs(v: &Value) -> String {
    table(
        &["identity", "state", "serial", "not after", "expires in", "root"],
        rows(v).iter().map(|c| {
            let serial = cell(&c["serial"]);
            let root = cell(&c["root"]);
            let root_name = root.rsplit_once("CN=").map_or(root.as_str(), |(_, cn)| cn).to_owned();
            vec![
                short_identity(&c["identity"]),
                cell(&c["state"]),
                serial.chars().take(12).collect(),
                cell(&c["not_after"]),
                c["expires_in_seconds"].as_u64().map_or("-".into(), |s| age_ms(&Value::from(s * 1000))),
                root_name,
            ]
        }),
    )
}

fn connections(v: &Value) -> String {
    table(
        &["dir", "path", "source", "destination", "src id", "dst id", "bytes >/<", "age"],
        rows(v).iter().map(|c| {
            vec![
                cell(&c["direction"]),
                cell(&c["route"]),
                cell(&c["src"]),
                cell(&c["dst"]),
                short_identity(&c["src_identity"]),
                short_identity(&c["dst_identity"]),
                format!("{}/{}", bytes(&c["bytes_src_to_dst"]), bytes(&c["bytes_dst_to_src"])),
                age_ms(&c["age_ms"]),
            ]
        }),
    )
}

fn check(v: &Value) -> String {
    let verdict = cell(&v["verdict"]).to_uppercase();
    let mut text = format!(
        "{verdict}: {}\n  from {} ({})\n  to   {} {} ({})",
        cell(&v["explanation"]),
        cell(&v["source"]["ip"]),
        cell(&v["source"]["identity"]),
        cell(&v["destination"]["workload"]),
        cell(&v["destination"]["address"]),
        cell(&v["destination"]["identity"]),
    );
    if let Some(dry) = v["dry_run"].as_object() {
        text.push_str(&format!(
            "\n  dry-run policy {} would {}",
            cell(&dry["policy"]),
            cell(&dry["verdict"])
        ));
    }
    text
}

const FLOW_HEADERS: [&str; 7] =
    ["time (utc)", "event", "dir", "source", "destination", "src id", "policy / reason"];

fn flow_row(e: &Value) -> Vec<String> {
    // Time of day is enough to follow events; -o json has the full timestamp.
    let time = e["time_ms"].as_u64().map_or("-".into(), |ms| {
        let stamp =
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms));
        stamp.to_string().get(11..23).unwrap_or_default().to_owned()
    });
    let why = match (e["policy"].as_str(), e["reason"].as_str()) {
        (Some(p), Some(r)) => format!("{p}: {r}"),
        (Some(p), None) => p.to_owned(),
        (None, Some(r)) => r.to_owned(),
        (None, None) => "-".to_owned(),
    };
    vec![
        time,
        cell(&e["kind"]),
        cell(&e["direction"]),
        cell(&e["src"]),
        cell(&e["dst"]),
        short_identity(&e["src_identity"]),
        why,
    ]
}

async fn flows(client: &AdminClient, follow: bool, denied: bool, output: Output) -> Result<u8, ClientError> {
    let path = format!("/flows?follow={}&denied={}", u8::from(follow), u8::from(denied));
    if !follow {
        let body = client.get(&path).await?;
        let events: Vec<Value> =
            String::from_utf8_lossy(&body).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        match output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&events).unwrap_or_default()),
            Output::Table => println!("{}", table(&FLOW_HEADERS, events.iter().map(flow_row))),
        }
        return Ok(0);
    }
    // Streaming: one JSON object or one tab-separated row per event, as they happen.
    let mut body = client.send(Method::GET, &path).await?.into_body();
    let mut pending = Vec::new();
    let mut stdout = std::io::stdout();
    if output == Output::Table {
        let _ = writeln!(stdout, "{}", FLOW_HEADERS.map(str::to_uppercase).join("\t"));
    }
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ClientError::Api(format!("flow stream ended: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line);
            let printed = match output {
                Output::Json => writeln!(stdout, "{}", text.trim_end()),
                Output::Table => match serde_json::from_str::<Value>(&text) {
                    Ok(event) => writeln!(stdout, "{}", flow_row(&event).join("\t")),
                    Err(_) => continue,
                },
            };
            // The reader went away (e.g. `| head`): stop quietly.
            if printed.and_then(|()| stdout.flush()).is_err() {
                return Ok(0);
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn encodes_query_values() {
        assert_eq!(super::encode("default/sa-a"), "default%2Fsa-a");
        assert_eq!(super::encode("[fd00::1]:80"), "%5Bfd00%3A%3A1%5D%3A80");
    }

    #[test]
    fn a_pending_certificate_and_a_failing_capture_read_as_such() {
        let certs = serde_json::json!([
            {"identity": "spiffe://cluster.local/ns/shop/sa/web", "state": "pending"},
        ]);
        let line =
            super::certs(&certs).lines().nth(1).unwrap().split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(line, "shop/web pending - - - -");
        let workloads = serde_json::json!([{
            "name": "web", "namespace": "shop", "captured": false,
            "capture_error": "binding the pod's listeners: 0.0.0.0:15008: Address in use",
        }]);
        assert!(super::workloads(&workloads).contains("failing: binding the pod's listeners: 0.0.0.0:15008"));
    }
}
