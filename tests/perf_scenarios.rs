//! Every load-generator scenario, run for about a second against a real server, so perf/
//! cannot rot. Counts are asserted (no loss, no duplicates at a low rate), never timings.

mod common;

use common::*;
use shardcast_bench::adapter::Proto;
use shardcast_bench::{connect, fanout};

fn fanout_params(server: &Server) -> fanout::Params {
    fanout::Params {
        addr: server.addr,
        publish_addr: None,
        proto: Proto::Shardcast,
        key: ADMIN.into(),
        subscribers: 40,
        channels: 3,
        publishers: 2,
        rate: 400,
        window: 16,
        size: 100,
        duration: 1.0,
        concurrency: 16,
        churn: 0,
        read_bytes: 256 * 1024,
        pid: Some(server.child.id()),
        label: "shardcast".into(),
        tls_ca: None,
    }
}

fn connect_params(server: &Server) -> connect::Params {
    connect::Params {
        addr: server.addr,
        proto: Proto::Shardcast,
        key: ADMIN.into(),
        connections: 300,
        concurrency: 32,
        hold: 0.1,
        pid: Some(server.child.id()),
        label: "shardcast".into(),
        rooms: 0,
        presence: false,
        jwt_secret: None,
        tls_ca: None,
    }
}

fn figure(report: &shardcast_bench::report::Report, name: &str) -> f64 {
    report
        .get(name)
        .unwrap_or_else(|| panic!("no figure {name:?} in {:?}", report.figures))
}

fn assert_complete(report: &shardcast_bench::report::Report) {
    assert!(figure(report, "expected") > 0.0, "nothing was published");
    assert_eq!(
        figure(report, "received"),
        figure(report, "expected"),
        "{:?}",
        report.figures
    );
    assert_eq!(figure(report, "lost"), 0.0);
    assert_eq!(figure(report, "duplicated"), 0.0);
    assert_eq!(figure(report, "out of order"), 0.0);
    assert_eq!(figure(report, "connections failed"), 0.0);
    assert!(report.latency.as_ref().is_some_and(|l| l.count > 0));
}

#[test]
fn connect_scenario_opens_and_holds_every_connection() {
    let server = Server::start("");
    let params = connect_params(&server);
    let report = connect::run(&params).expect("connect scenario");
    assert_eq!(figure(&report, "connections ok"), 300.0);
    assert_eq!(figure(&report, "connections failed"), 0.0);
    assert!(figure(&report, "server rss after") > 0.0);
    // Connected means SUBSCRIBED, in one of 10 channels, as a presence member.
    let rooms = connect::Params {
        rooms: 10,
        presence: true,
        ..params.clone()
    };
    let report = connect::run(&rooms).expect("connect scenario with rooms");
    assert_eq!(figure(&report, "connections ok"), 300.0);
    // With a token each: every one READY (a bad token would be refused).
    let tokens = connect::Params {
        jwt_secret: Some(JWT_SECRET.into()),
        ..params.clone()
    };
    let report = connect::run(&tokens).expect("connect scenario with tokens");
    assert_eq!(figure(&report, "connections ok"), 300.0);
    let wrong = connect::Params {
        jwt_secret: Some("not-the-secret".into()),
        connections: 10,
        ..params
    };
    let report = connect::run(&wrong).expect("connect scenario with bad tokens");
    assert_eq!(figure(&report, "connections ok"), 0.0);
    // Each one joined (the members themselves may be gone by now: they held 0.1 s).
    server.wait_metric("shardcast_presence_changes_total", 300);
}

#[test]
fn fanout_scenario_at_a_rate_loses_nothing() {
    let server = Server::start("");
    let report = fanout::run(&fanout_params(&server), false, "fanout").expect("fanout");
    assert_complete(&report);
}

#[test]
fn fanout_and_connect_scenarios_run_over_tls() {
    let ca = common::ca::Ca::new();
    let (cert, key) = ca.issue("server");
    let server = Server::start(&format!(
        "[tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    ));
    let params = fanout::Params {
        addr: server.tls_addr.expect("a TLS listener"),
        tls_ca: Some(ca.path("ca.pem")),
        // Small reads: records split across reads.
        read_bytes: 1_000,
        ..fanout_params(&server)
    };
    let report = fanout::run(&params, false, "fanout").expect("fanout over TLS");
    assert_complete(&report);
    let params = connect::Params {
        addr: server.tls_addr.expect("a TLS listener"),
        connections: 100,
        tls_ca: Some(ca.path("ca.pem")),
        ..connect_params(&server)
    };
    let report = connect::run(&params).expect("connect over TLS");
    assert_eq!(figure(&report, "connections ok"), 100.0);
}

#[test]
fn fanout_scenario_with_an_ack_window_loses_nothing() {
    let server = Server::start("");
    let params = fanout::Params {
        rate: 0,
        ..fanout_params(&server)
    };
    let report = fanout::run(&params, false, "fanout").expect("fanout");
    assert_complete(&report);
}

#[test]
fn ingest_scenario_gets_every_ack() {
    let server = Server::start("");
    let params = fanout::Params {
        publishers: 4,
        rate: 0,
        window: 8,
        ..fanout_params(&server)
    };
    let report = fanout::run(&params, true, "ingest").expect("ingest");
    assert!(figure(&report, "acked") > 0.0);
    assert_eq!(figure(&report, "acked"), figure(&report, "sent"));
    server.wait_health("decisions to be counted", |h| {
        h["metrics"]["decisions"]["processed"].as_f64() == report.get("acked")
    });
}

#[test]
fn churn_scenario_keeps_fanout_whole_while_connections_come_and_go() {
    let server = Server::start("");
    let params = fanout::Params {
        churn: 100,
        ..fanout_params(&server)
    };
    let report = fanout::run(&params, false, "churn").expect("churn");
    assert_complete(&report);
    assert!(figure(&report, "churned connections") > 0.0);
}

/// Clients that read 512 bytes at a time still get everything (the queue absorbs the burst).
#[test]
fn fanout_with_small_reads_loses_nothing() {
    let server = Server::start("");
    let params = fanout::Params {
        read_bytes: 512,
        ..fanout_params(&server)
    };
    let report = fanout::run(&params, false, "fanout").expect("fanout");
    assert_complete(&report);
}

/// The cross-node scenario: subscribers on one cluster node, publishers on another.
#[test]
fn fanout_across_two_cluster_nodes_loses_nothing() {
    let Some(url) = redis_url("perf_fanout_across_two_cluster_nodes") else {
        return;
    };
    let prefix = format!("scperf.{}.{}", std::process::id(), unix_now());
    let config = format!(
        "[cluster]\nredis_url = \"{url}\"\nprefix = \"{prefix}\"\n\n[storage]\nurl = \"memory\"\n"
    );
    let (subscribers, publishers) = (
        Server::start_with(2, &config),
        Server::start_with(2, &config),
    );
    let params = fanout::Params {
        publish_addr: Some(publishers.addr),
        ..fanout_params(&subscribers)
    };
    let report = fanout::run(&params, false, "fanout").expect("fanout");
    assert_complete(&report);
}
