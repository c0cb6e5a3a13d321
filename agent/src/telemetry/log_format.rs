//! How a log line is laid out. The shapes are tracing-subscriber's own (text: `name=value` with
//! strings quoted; JSON: one object per line with the event's fields at top level), written
//! straight into the line: its formatters cost each access-log line about 25k (text) and 38k
//! (JSON) instructions, a fifth of a proxied connection's work in the agent. The text one styles
//! every field name and `=` through a formatting pass even with colours off; the JSON one hands
//! every piece of every value (quotes, escapes, digits) through an `io::Write` to `fmt::Write`
//! adaptor that checks it is UTF-8. Only values that need escaping take the slower paths.

use std::{
    fmt::{self, Write},
    time::SystemTime,
};

use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_log::NormalizeEvent;
use tracing_subscriber::{
    field::{RecordFields, VisitOutput},
    fmt::{
        FmtContext, FormatEvent, FormatFields, FormattedFields,
        format::{DefaultFields, DefaultVisitor, JsonFields, Writer},
        time::FormatTime,
    },
    registry::LookupSpan,
};

/// A line is put together in a `String` of its own and handed on in one write: each write to
/// the formatter's [`Writer`] is a call through `dyn fmt::Write`, and a line takes about a hundred.
const LINE_CAPACITY: usize = 512;

/// The time a line starts with: RFC 3339 in UTC to the microsecond, tracing-subscriber's own
/// format, written in one piece (its own timer formats each part of the date in turn).
pub(super) struct Timestamp;

impl FormatTime for Timestamp {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write!(w, "{}", humantime::format_rfc3339_micros(SystemTime::now()))
    }
}

/// Fields of a text line, byte for byte as tracing-subscriber's [`DefaultFields`] writes them
/// without colours (with colours, a terminal's, it writes them itself).
pub(super) struct TextFields;

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'writer>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        let mut visitor = TextVisitor { line: String::with_capacity(LINE_CAPACITY), result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result?;
        writer.write_str(&visitor.line)
    }
}

struct TextVisitor {
    line: String,
    result: fmt::Result,
}

impl TextVisitor {
    /// Writes ` name=` and returns the line for the value, unless the field is one the line
    /// already shows.
    fn field(&mut self, field: &Field) -> Option<&mut String> {
        let name = field.name();
        // `log.*` fields carry a bridged `log` record's metadata, shown in the line's head.
        if self.result.is_err() || name.starts_with("log.") {
            return None;
        }
        if !self.line.is_empty() {
            self.line.push(' ');
        }
        self.line.push_str(name.strip_prefix("r#").unwrap_or(name));
        self.line.push('=');
        Some(&mut self.line)
    }

    /// The message and errors keep the default's treatment (escaping of control sequences,
    /// error sources).
    fn by_default(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let empty = self.line.is_empty();
        let mut visitor = DefaultVisitor::new(Writer::new(&mut self.line), empty);
        record(&mut visitor);
        self.result = visitor.finish();
    }
}

impl Visit for TextVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        // Debug of a string is the string in quotes when nothing in it needs escaping.
        if field.name() == "message"
            || any_byte(value, |b| !(b' '..=b'~').contains(&b) || b == b'"' || b == b'\\')
        {
            return self.by_default(|visitor| visitor.record_str(field, value));
        }
        if let Some(line) = self.field(field) {
            line.push('"');
            line.push_str(value);
            line.push('"');
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if let Some(line) = self.field(field) {
            line.push_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if let Some(line) = self.field(field) {
            line.push_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if let Some(line) = self.field(field) {
            line.push_str(if value { "true" } else { "false" });
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.by_default(|visitor| visitor.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            return self.by_default(|visitor| visitor.record_debug(field, value));
        }
        if let Some(line) = self.field(field) {
            self.result = write!(line, "{value:?}");
        }
    }
}

/// A JSON line: `timestamp`, `level`, the event's fields, `target`, and `spans` (each span's
/// fields and `name`, outermost first) when the event is inside any: the object
/// tracing-subscriber's `json().flatten_event(true).with_current_span(false)` writes.
pub(super) struct JsonLines;

impl<S> FormatEvent<S, JsonFields> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // A record bridged from `log` (eBPF log lines) carries its own level and target.
        let normalized = event.normalized_metadata();
        let metadata = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut object = JsonObject { line: String::with_capacity(LINE_CAPACITY), result: Ok(()) };
        object.key("timestamp");
        object.line.push('"');
        Timestamp.format_time(&mut Writer::new(&mut object.line))?;
        object.line.push('"');
        object.key("level");
        object.string(metadata.level().as_str());
        event.record(&mut object);
        object.result?;
        object.key("target");
        object.string(metadata.target());
        if let Some(scope) = ctx.event_scope() {
            object.key("spans");
            for (i, span) in scope.from_root().enumerate() {
                object.line.push_str(if i == 0 { "[{" } else { ",{" });
                // JsonFields keeps a span's fields as a JSON object: its members go in as they are.
                let extensions = span.extensions();
                let fields =
                    extensions.get::<FormattedFields<JsonFields>>().map_or("", |f| f.fields.as_str());
                let members = fields.strip_prefix('{').and_then(|f| f.strip_suffix('}')).unwrap_or("");
                if !members.is_empty() {
                    object.line.push_str(members);
                    object.line.push(',');
                }
                object.line.push_str("\"name\":");
                object.string(span.name());
                object.line.push('}');
            }
            object.line.push(']');
        }
        object.line.push_str("}\n");
        writer.write_str(&object.line)
    }
}

/// Whether any byte of `text` matches: all bytes are looked at, which lets the compiler check
/// them many at a time (an early exit made it one by one).
fn any_byte(text: &str, matches: impl Fn(u8) -> bool) -> bool {
    text.bytes().fold(false, |found, b| found | matches(b))
}

/// What JSON requires escaped in a string.
fn needs_json_escape(text: &str) -> bool {
    any_byte(text, |b| b < b' ' || b == b'"' || b == b'\\')
}

struct JsonObject {
    line: String,
    result: fmt::Result,
}

impl JsonObject {
    /// Opens the object or separates the member from the last one, then writes `"key":`.
    fn key(&mut self, key: &str) {
        self.line.push(if self.line.is_empty() { '{' } else { ',' });
        self.string(key);
        self.line.push(':');
    }

    fn string(&mut self, value: &str) {
        if needs_json_escape(value) {
            // serde_json knows JSON's escapes; Display of a Value cannot fail.
            let escaped = serde_json::Value::from(value).to_string();
            self.line.push_str(&escaped);
        } else {
            self.line.push('"');
            self.line.push_str(value);
            self.line.push('"');
        }
    }

    /// Writes the field's key, and says whether to go on with its value.
    fn member(&mut self, field: &Field) -> bool {
        if self.result.is_ok() {
            self.key(field.name());
        }
        self.result.is_ok()
    }
}

impl Visit for JsonObject {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.member(field) {
            self.string(value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.member(field) {
            self.line.push_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.member(field) {
            self.line.push_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.member(field) {
            self.line.push_str(if value { "true" } else { "false" });
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json writes what JSON cannot hold (NaN, infinities) as null.
        if self.member(field) {
            self.line.push_str(&serde_json::Value::from(value).to_string());
        }
    }

    /// Rendered in place, and escaped only if the rendering needs it.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.member(field) {
            return;
        }
        let start = self.line.len();
        self.result = write!(self.line, "\"{value:?}");
        if needs_json_escape(&self.line[start + 1..]) {
            let rendered = self.line.split_off(start + 1);
            self.line.truncate(start);
            self.string(&rendered);
        } else {
            self.line.push('"');
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use serde_json::Value;
    use tracing_subscriber::{fmt::MakeWriter, layer::SubscriberExt};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;

        fn make_writer(&'a self) -> Buffer {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Failure;

    impl fmt::Display for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("it \"broke\"")
        }
    }

    impl std::error::Error for Failure {}

    /// Events of every kind of field, some needing escapes, two inside two spans, and a record
    /// of the `log` crate (as eBPF log lines arrive).
    fn log_samples() {
        let addr: std::net::SocketAddr = "10.1.0.2:25584".parse().unwrap();
        let failure = Failure;
        tracing::info!(
            target: "access",
            direction = "outbound",
            src = %addr,
            dst_hbone = Some(tracing::field::display(addr)),
            src_workload = Some("a"),
            dst_workload = None::<&str>,
            bytes = 1234u64,
            delta = -5i64,
            big = 3u128,
            ok = true,
            ratio = 0.5f64,
            quoted = "say \"hi\"\\ \u{7}",
            unicode = "pod-ü",
            r#type = "raw",
            error = &failure as &(dyn std::error::Error + 'static),
            "connection closed"
        );
        let outer = tracing::info_span!("outer", node = "node1", n = 2);
        let _outer = outer.enter();
        let inner = tracing::info_span!("inner");
        let _inner = inner.enter();
        tracing::warn!(detail = ?vec![1, 2], "message with \"quotes\"\nand a newline");
        tracing::error!("message only");
        drop((_inner, _outer));
        log::warn!(target: "ferry::datapath", "bridged from log");
    }

    fn capture(layer: impl tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync) {
        // Sends `log` records to the thread's subscriber; already done by an earlier test.
        let _ = tracing_log::LogTracer::init();
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), log_samples);
    }

    fn text(buffer: &Buffer) -> String {
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn text_fields_are_written_as_the_default_formatter_writes_them() {
        let (ours, theirs) = (Buffer::default(), Buffer::default());
        let layer = || tracing_subscriber::fmt::layer().without_time().with_ansi(false);
        capture(layer().fmt_fields(TextFields).with_writer(ours.clone()));
        capture(layer().with_writer(theirs.clone()));
        let (ours, theirs) = (text(&ours), text(&theirs));
        assert_eq!(ours, theirs);
        assert!(
            ours.contains(r#" src=10.1.0.2:25584 dst_hbone=10.1.0.2:25584 src_workload="a" bytes=1234"#),
            "{ours}"
        );
        assert!(ours.contains(r#"outer{node="node1" n=2}:inner:"#), "{ours}");
        assert!(ours.contains(" WARN ferry::datapath: bridged from log\n"), "{ours}");
    }

    #[test]
    fn timestamps_have_the_default_timers_shape() {
        let (mut ours, mut theirs) = (String::new(), String::new());
        Timestamp.format_time(&mut Writer::new(&mut ours)).unwrap();
        tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut theirs)).unwrap();
        let shape = |time: &str| time.replace(|c: char| c.is_ascii_digit(), "0");
        assert_eq!(shape(&ours), shape(&theirs));
        assert_eq!(shape(&ours), "0000-00-00T00:00:00.000000Z");
        // Written a moment apart: the same up to the minute, unless one fell on either side of it.
        assert!(ours[..16] == theirs[..16] || ours[17..19] == *"59", "{ours} {theirs}");
    }

    #[test]
    fn json_lines_hold_what_the_default_formatter_writes() {
        let (ours, theirs) = (Buffer::default(), Buffer::default());
        capture(
            tracing_subscriber::fmt::layer()
                .fmt_fields(JsonFields::new())
                .event_format(JsonLines)
                .with_writer(ours.clone()),
        );
        capture(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_writer(theirs.clone()),
        );
        let parse = |line: &str| -> Value {
            let mut value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            let timestamp = value.as_object_mut().unwrap().remove("timestamp").unwrap();
            assert!(timestamp.as_str().unwrap().ends_with('Z'), "{line}");
            value
        };
        let (ours, theirs): (Vec<Value>, Vec<Value>) =
            (text(&ours).lines().map(parse).collect(), text(&theirs).lines().map(parse).collect());
        assert_eq!(ours.len(), 4, "{ours:#?}");
        assert_eq!(
            (&ours[3]["target"], &ours[3]["level"]),
            (&Value::from("ferry::datapath"), &Value::from("WARN"))
        );
        assert_eq!(ours, theirs);
        assert_eq!(ours[0]["quoted"], "say \"hi\"\\ \u{7}");
        assert_eq!(
            ours[1]["spans"],
            serde_json::json!([{"name": "outer", "node": "node1", "n": 2}, {"name": "inner"}])
        );
    }
}
