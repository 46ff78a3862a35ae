//! `--metrics ADDR:PORT`: the figures of `pesto --stats` over HTTP, in the
//! Prometheus (OpenMetrics) text format, at `/metrics`.
//!
//! Each scrape takes a snapshot ([`Shared::stats`]) and renders it with
//! prometheus-client: counters live in the data plane, where forwarding
//! bumps them, not in a metrics registry that would need updating twice.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::control::state::Shared;
use crate::stats::RuleCounters;

/// The content type of the OpenMetrics text format, which Prometheus reads.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The labels of a rule's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    pif: String,
    rule: String,
}

/// The labels of failed connects.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailedLabels {
    pif: String,
    rule: String,
    errno: String,
}

/// The labels of control outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

/// A running metrics endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    stop: CancellationToken,
    tasks: TaskTracker,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Serves `/metrics` on `listener` (bound already, so that a port in
    /// use is a start-up error) from `shared`'s figures.
    pub fn start(
        listener: std::net::TcpListener,
        shared: Arc<Shared>,
    ) -> std::io::Result<MetricsServer> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(accept_loop(listener, shared, stop.clone(), tasks.clone()));
        info!(%addr, "metrics at http://{addr}/metrics");
        Ok(MetricsServer { stop, tasks, addr })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the scrapes in progress.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "metrics: accept failed");
                    // EMFILE and the like: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(answer(req, &shared).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                r = conn => if let Err(e) = r {
                    debug!(error = %e, "metrics: connection failed");
                },
            }
        });
    }
}

async fn answer(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String, kind: &str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "see /metrics\n".into(), "text/plain");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".into(),
            "text/plain",
        );
    }
    match render(shared).await {
        Ok(text) => reply(StatusCode::OK, text, CONTENT_TYPE),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{e}\n"),
            "text/plain",
        ),
    }
}

/// The figures now, in the text format.
pub async fn render(shared: &Shared) -> Result<String, std::fmt::Error> {
    let stats = shared.stats().await;
    let config = shared.config();
    let mut registry = Registry::with_prefix("pestod");
    let d = &stats.daemon;
    let gauge = |registry: &mut Registry, name: &str, help: &str, v: u64| {
        let g: Gauge = Gauge::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        registry.register(name, help, g);
    };
    gauge(
        &mut registry,
        "uptime_seconds",
        "Seconds since pestod started",
        d.uptime,
    );
    gauge(
        &mut registry,
        "open_files",
        "Descriptors open now",
        d.fds_open,
    );
    gauge(
        &mut registry,
        "open_files_limit",
        "The open-files limit",
        d.fds_limit,
    );
    let refused: Counter = Counter::default();
    refused.inc_by(d.refused);
    registry.register(
        "refused",
        "TCP connections and UDP flows refused for want of descriptors",
        refused,
    );
    let outcomes = Family::<OutcomeLabels, Counter>::default();
    for (outcome, n) in [
        ("committed", d.committed),
        ("rolled_back", d.rolled_back),
        ("stale", d.stale),
        ("busy", d.busy),
        ("denied", d.denied),
        ("timed_out", d.timed_out),
        ("invalid", d.invalid),
        ("protocol", d.protocol),
    ] {
        outcomes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc_by(n);
    }
    registry.register("transactions", "Control transactions by outcome", outcomes);

    type Field = fn(&RuleCounters) -> u64;
    let gauges: [(&str, &str, Field); 2] = [
        ("tcp_connections_open", "TCP connections open now", |c| {
            c.tcp_active
        }),
        ("udp_flows_open", "UDP flows open now", |c| c.udp_active),
    ];
    let counters: [(&str, &str, Field); 7] = [
        ("tcp_connections", "TCP connections accepted", |c| {
            c.tcp_total
        }),
        ("received_bytes", "Bytes from clients to the target", |c| {
            c.bytes_in
        }),
        ("sent_bytes", "Bytes from the target back to clients", |c| {
            c.bytes_out
        }),
        ("udp_flows", "UDP flows opened", |c| c.udp_total),
        (
            "received_datagrams",
            "Datagrams from peers to the target",
            |c| c.datagrams_in,
        ),
        (
            "sent_datagrams",
            "Datagrams from the target to peers",
            |c| c.datagrams_out,
        ),
        (
            "dropped_datagrams",
            "Datagrams dropped: no flow could be opened",
            |c| c.dropped,
        ),
    ];
    let rows: Vec<(RuleLabels, &RuleCounters)> = config
        .pifs
        .iter()
        .filter_map(|p| stats.pifs.iter().find(|s| s.id == p.id).map(|s| (p, s)))
        .flat_map(|(p, s)| {
            p.table.rules().iter().zip(&s.rules).map(|(r, c)| {
                (
                    RuleLabels {
                        pif: p.name.clone(),
                        rule: r.to_string().trim_end().to_owned(),
                    },
                    c,
                )
            })
        })
        .collect();
    for (name, help, field) in gauges {
        let family = Family::<RuleLabels, Gauge>::default();
        for (labels, c) in &rows {
            family
                .get_or_create(labels)
                .set(i64::try_from(field(c)).unwrap_or(i64::MAX));
        }
        registry.register(name, help, family);
    }
    for (name, help, field) in counters {
        let family = Family::<RuleLabels, Counter>::default();
        for (labels, c) in &rows {
            family.get_or_create(labels).inc_by(field(c));
        }
        registry.register(name, help, family);
    }
    let failed = Family::<FailedLabels, Counter>::default();
    for (labels, c) in &rows {
        for (errno, n) in &c.connect_failed {
            failed
                .get_or_create(&FailedLabels {
                    pif: labels.pif.clone(),
                    rule: labels.rule.clone(),
                    errno: errno.to_string(),
                })
                .inc_by(*n);
        }
    }
    registry.register(
        "connect_failures",
        "Failed connects to the target, by errno",
        failed,
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}
