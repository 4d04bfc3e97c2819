//! Logs and traces with `tracing`.
//!
//! Logs are human-readable by default and JSON with `LOG_FORMAT=json`; the
//! level comes from `RUST_LOG` (default `info`). Every span is also an
//! OpenTelemetry span, so that one order's trace can be followed across the
//! services: the W3C `traceparent` travels in HTTP headers (the gateway and
//! every service read and forward it) and in AMQP message headers (written
//! into the outbox with the message, read by the consumer loop). Spans are
//! exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and
//! only propagated otherwise.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use std::collections::HashMap;
use std::sync::OnceLock;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

pub const TRACEPARENT: &str = "traceparent";

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

fn default_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,sqlx=warn,tower_http=info"))
}

fn provider(service: &str) -> SdkTracerProvider {
    let mut builder = SdkTracerProvider::builder()
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service.to_string()).build());
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
            Ok(exporter) => builder = builder.with_batch_exporter(exporter),
            Err(e) => eprintln!("OTLP exporter not started: {e}"),
        }
    }
    builder.build()
}

/// Installs logging and tracing for a process named `service`.
pub fn init(service: &str) {
    let provider = PROVIDER.get_or_init(|| provider(service));
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("order-system"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let registry = tracing_subscriber::registry().with(default_filter()).with(otel);
    // A second init (tests, the launcher) keeps the first subscriber.
    let _ = if json {
        registry.with(fmt::layer().json().with_current_span(true).with_span_list(false)).try_init()
    } else {
        // Colours for a terminal only: a log written to a file or a pipe
        // stays greppable (`grep ' WARN '`), as NO_COLOR would make it.
        use std::io::IsTerminal;
        registry.with(fmt::layer().with_ansi(std::io::stdout().is_terminal())).try_init()
    };
}

/// Exports spans on shutdown (a no-op when nothing is exported).
pub fn flush() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
    }
}

static TEST_SPANS: OnceLock<InMemorySpanExporter> = OnceLock::new();

/// For tests: logs through the harness's capture (shown for failing tests
/// only), and every finished span kept in memory, returned here.
pub fn init_for_tests() -> &'static InMemorySpanExporter {
    TEST_SPANS.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer("tests"));
        let _ = PROVIDER.set(provider);
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,lapin=off"));
        let _ = tracing_subscriber::registry().with(filter).with(otel).with(fmt::layer().with_test_writer()).try_init();
        exporter
    })
}

/// The W3C `traceparent` of `span`, to send along.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Makes `span` a child of the remote span named by `traceparent`.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(cx);
}
