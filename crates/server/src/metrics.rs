//! `GET /metrics` in Prometheus' text format: HTTP requests by status, and
//! the scheduler's counters and gauges.

use gemma3_engine::scheduler::Stats;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    by_status: Mutex<BTreeMap<u16, u64>>,
}

impl Metrics {
    /// Count one answered HTTP request.
    pub fn count(&self, status: u16) {
        let mut m = self.by_status.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(status).or_default() += 1;
    }

    pub fn render(&self, s: &Stats) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "gemma3_prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests (cached ones included).",
            s.prompt_tokens.to_string(),
        );
        metric(
            "gemma3_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens taken from the prefix cache instead of evaluated.",
            s.cached_tokens.to_string(),
        );
        metric(
            "gemma3_generated_tokens_total",
            "counter",
            "Tokens generated.",
            s.generated_tokens.to_string(),
        );
        metric(
            "gemma3_engine_requests_done_total",
            "counter",
            "Requests the scheduler has finished, cancelled or rejected.",
            s.requests_done.to_string(),
        );
        metric(
            "gemma3_decode_steps_total",
            "counter",
            "Forward passes run by the scheduler.",
            s.steps.to_string(),
        );
        metric(
            "gemma3_queue_depth",
            "gauge",
            "Requests waiting for a slot.",
            s.waiting.to_string(),
        );
        metric(
            "gemma3_active_sequences",
            "gauge",
            "Sequences in a slot (reading their prompt or generating).",
            s.active.to_string(),
        );
        metric(
            "gemma3_slots",
            "gauge",
            "Slots (sequences that can run at once, --parallel).",
            s.parallel.to_string(),
        );
        metric(
            "gemma3_tokens_per_second",
            "gauge",
            "Tokens generated per second over the last 10 seconds, all sequences together.",
            format!("{:.3}", s.tokens_per_second),
        );
        let _ = writeln!(
            out,
            "# HELP gemma3_requests_total HTTP requests answered, by status code.\n# TYPE gemma3_requests_total counter"
        );
        let m = self.by_status.lock().unwrap_or_else(|e| e.into_inner());
        for (status, n) in m.iter() {
            let _ = writeln!(out, "gemma3_requests_total{{status=\"{status}\"}} {n}");
        }
        out
    }
}
