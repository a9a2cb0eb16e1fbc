//! volume-mgr's request counters.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
}

impl Metrics {
    pub fn count(&self, method: &str, route: &str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap()
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
    }

    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP volume_mgr_http_requests_total API requests by route and status.\n# TYPE volume_mgr_http_requests_total counter");
        for ((m, r, s), n) in self.requests.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "volume_mgr_http_requests_total{{method=\"{m}\",route=\"{r}\",status=\"{s}\"}} {n}"
            );
        }
    }
}
