//! The server's own view of a run, from shardcast's `/metrics`: how late its event loop ran
//! (the lag probe's histogram) and its slow polls, read at the start and the end of the
//! measured window so that a stall on the server shows beside the client's latency figures.
//! Other servers have no such endpoint: [`scrape`] then finds nothing and nothing is reported.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::report::Report;

/// The event-loop figures at one moment.
#[derive(Debug, Clone, Default)]
pub struct LoopStats {
    /// The lag histogram's buckets: upper bound in seconds (infinity last), cumulative count.
    lag: Vec<(f64, u64)>,
    /// Polls of 1 ms or more, all tasks.
    slow_polls: u64,
    /// The longest single poll since start, any task, in seconds.
    longest_poll: f64,
}

/// Read shardcast's event-loop figures at `addr`; `None` if it has none (or cannot be read).
pub fn scrape(addr: SocketAddr) -> Option<LoopStats> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let request = "GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let stats = parse(&response);
    (!stats.lag.is_empty()).then_some(stats)
}

/// The figures in a `/metrics` body.
fn parse(text: &str) -> LoopStats {
    let mut stats = LoopStats::default();
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(bound) = name
            .strip_prefix("shardcast_event_loop_lag_seconds_bucket{le=\"")
            .and_then(|rest| rest.strip_suffix("\"}"))
        {
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().unwrap_or(f64::INFINITY)
            };
            stats.lag.push((bound, value.parse().unwrap_or(0)));
        } else if name.starts_with("shardcast_event_loop_slow_polls_total{") {
            stats.slow_polls += value.parse::<u64>().unwrap_or(0);
        } else if name.starts_with("shardcast_event_loop_longest_poll_seconds{") {
            stats.longest_poll = stats.longest_poll.max(value.parse().unwrap_or(0.0));
        }
    }
    stats
}

/// Add the window's figures to `report`: the lag's p99 and maximum (as the upper bounds of
/// their histogram buckets), the polls of 1 ms or more in the window, and the longest poll
/// since the server started (a gauge: it cannot be told for the window alone).
pub fn report(before: &LoopStats, after: &LoopStats, report: &mut Report) {
    let window: Vec<(f64, u64)> = after
        .lag
        .iter()
        .map(|&(bound, n)| {
            let earlier = before.lag.iter().find(|b| b.0 == bound).map_or(0, |b| b.1);
            (bound, n.saturating_sub(earlier))
        })
        .collect();
    let total = window.last().map_or(0, |w| w.1);
    if total == 0 {
        return;
    }
    let bound_at = |share: f64| {
        let wanted = (total as f64 * share).ceil() as u64;
        window
            .iter()
            .find(|w| w.1 >= wanted)
            .map_or(f64::INFINITY, |w| w.0)
    };
    report.add("server lag p99 (bucket)", bound_at(0.99) * 1e3, "ms");
    report.add("server lag max (bucket)", bound_at(1.0) * 1e3, "ms");
    let slow = after.slow_polls.saturating_sub(before.slow_polls);
    report.add("server polls >= 1 ms", slow as f64, "");
    report.add("server longest poll", after.longest_poll * 1e3, "ms");
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "shardcast_event_loop_lag_seconds_bucket{le=\"0.001\"} 10\n\
        shardcast_event_loop_lag_seconds_bucket{le=\"0.01\"} 10\n\
        shardcast_event_loop_lag_seconds_bucket{le=\"+Inf\"} 10\n\
        shardcast_event_loop_slow_polls_total{task=\"connection\"} 2\n\
        shardcast_event_loop_longest_poll_seconds{task=\"connection\"} 0.002\n";
    const AFTER: &str = "shardcast_event_loop_lag_seconds_bucket{le=\"0.001\"} 108\n\
        shardcast_event_loop_lag_seconds_bucket{le=\"0.01\"} 109\n\
        shardcast_event_loop_lag_seconds_bucket{le=\"+Inf\"} 110\n\
        shardcast_event_loop_slow_polls_total{task=\"connection\"} 5\n\
        shardcast_event_loop_slow_polls_total{task=\"mesh\"} 1\n\
        shardcast_event_loop_longest_poll_seconds{task=\"connection\"} 0.02\n\
        shardcast_event_loop_longest_poll_seconds{task=\"mesh\"} 0.003\n";

    #[test]
    fn the_window_is_the_difference_of_two_scrapes() {
        let mut r = Report::new("ingest", "shardcast", serde_json::Value::Null);
        report(&parse(BEFORE), &parse(AFTER), &mut r);
        // 100 probes in the window: 98 under 1 ms, one under 10 ms, one above.
        assert_eq!(r.get("server lag p99 (bucket)"), Some(10.0));
        assert_eq!(r.get("server lag max (bucket)"), Some(f64::INFINITY));
        assert_eq!(r.get("server polls >= 1 ms"), Some(4.0));
        assert_eq!(r.get("server longest poll"), Some(20.0));
    }

    #[test]
    fn a_server_without_the_metrics_reports_nothing() {
        let mut r = Report::new("ingest", "tokio", serde_json::Value::Null);
        report(&parse(""), &parse("other_metric 1\n"), &mut r);
        assert_eq!(r.get("server lag p99 (bucket)"), None);
    }
}
