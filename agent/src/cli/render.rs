//! Tables for people: kubectl-like, aligned, one line per row.

use comfy_table::{ContentArrangement, Table, presets};
use serde_json::Value;

/// Rows are never wrapped to a width, as kubectl's are not: a row split over lines would break
/// `grep` and `awk` and cut identities and IPv6 addresses in two.
pub(super) fn table(headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_content_arrangement(ContentArrangement::Disabled);
    table.set_header(headers.iter().map(|h| h.to_uppercase()));
    for row in rows {
        table.add_row(row);
    }
    // The preset pads every cell with one space: trim the line ends.
    table.lines().map(|l| l.trim_end().to_owned()).collect::<Vec<_>>().join("\n")
}

/// A JSON value as a cell: strings bare, null as "-", lists comma-joined.
pub(super) fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".to_owned(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_owned(),
        other => other.to_string(),
    }
}

/// `spiffe://td/ns/x/sa/y` as `x/y`: tables show the namespace and service account.
pub(super) fn short_identity(value: &Value) -> String {
    match value.as_str() {
        Some(id) => match id.split('/').collect::<Vec<_>>().as_slice() {
            ["spiffe:", "", _, "ns", ns, "sa", sa] => format!("{ns}/{sa}"),
            _ => id.to_owned(),
        },
        None => "-".to_owned(),
    }
}

/// Bytes in a short human form.
pub(super) fn bytes(value: &Value) -> String {
    let n = value.as_u64().unwrap_or(0) as f64;
    match n {
        n if n >= 1e9 => format!("{:.1}G", n / 1e9),
        n if n >= 1e6 => format!("{:.1}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}k", n / 1e3),
        n => format!("{n}"),
    }
}

/// Milliseconds as a short duration.
pub(super) fn age_ms(value: &Value) -> String {
    let ms = value.as_u64().unwrap_or(0);
    match ms {
        ms if ms >= 3_600_000 => format!("{}h{}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
        ms if ms >= 60_000 => format!("{}m{}s", ms / 60_000, ms % 60_000 / 1000),
        ms if ms >= 1000 => format!("{:.1}s", ms as f64 / 1000.0),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn cells_and_tables() {
        assert_eq!(short_identity(&json!("spiffe://cluster.local/ns/shop/sa/web")), "shop/web");
        assert_eq!(cell(&json!(["10.0.0.1", "10.0.0.2"])), "10.0.0.1,10.0.0.2");
        assert_eq!(bytes(&json!(1500)), "1.5k");
        assert_eq!(age_ms(&json!(61_000)), "1m1s");
        let long = format!("spiffe://cluster.local/ns/default/sa/{}", "x".repeat(120));
        let text = table(
            &["name", "value", "identity"],
            vec![
                vec!["a".into(), "1".into(), long.clone()],
                vec!["long-name".into(), "2".into(), "-".into()],
            ],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with(" NAME"), "{text}");
        // Columns line up, and a long cell stays whole on its row.
        assert_eq!(lines[1].find('1'), lines[2].find('2'), "{text}");
        assert!(lines[1].ends_with(&long), "{text}");
    }
}
