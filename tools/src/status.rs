//! `fabctl status`: cluster health on one screen — nodes up/down (and out: being re-homed),
//! degraded chunk sets, recovery in progress with bytes left, rate and ETA, rebalancing
//! (sets moving to added nodes, pending, moved); `--watch` redraws it every second.

use crate::{human, print_json};
use volume_mgr::api;
use volume_mgr::client::Client;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Redraw every second until interrupted.
    #[arg(long)]
    watch: bool,
}

/// `1m 05s`, `42s`, `2h 03m`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// `moving: 3 sets moving, 5 pending; 2 moved` and the like (pure).
pub fn rebalance_line(b: &api::Rebalance) -> String {
    if !b.enabled {
        return "disabled (--no-rebalance)".into();
    }
    let state = if b.state.is_empty() { "idle" } else { &b.state };
    let mut s = state.to_string();
    if b.in_progress > 0 || b.pending > 0 {
        s += &format!(": {} sets moving, {} pending", b.in_progress, b.pending);
    }
    if !b.reason.is_empty() {
        s += &format!(" ({})", b.reason);
    }
    s += &format!("; {} moved", b.moved);
    s
}

/// The screen (pure: unit-tested).
pub fn render(r: &api::Recovery, nodes: &[api::Node]) -> String {
    let mut out = String::new();
    let health = if r.degraded_sets == 0 && r.nodes_down == 0 {
        "HEALTHY"
    } else if r.degraded_sets == 0 {
        "OK (nodes down, every set fully replicated)"
    } else if r.syncing_replicas > 0 {
        "DEGRADED, recovering"
    } else {
        "DEGRADED"
    };
    out += &format!("cluster:   {health}\n");
    let down: Vec<String> = nodes
        .iter()
        .filter(|n| n.state == api::NodeState::Down)
        .map(|n| {
            if r.nodes_out.contains(&n.name) {
                format!("{} (out)", n.name)
            } else {
                n.name.clone()
            }
        })
        .collect();
    out += &format!(
        "nodes:     {} up, {} down{}\n",
        r.nodes_up,
        r.nodes_down,
        if down.is_empty() {
            String::new()
        } else {
            format!(": {}", down.join(", "))
        }
    );
    let sets: u64 = r.volumes.iter().map(|v| v.sets).sum();
    out += &format!(
        "sets:      {} of {} degraded, {} replicas syncing\n",
        r.degraded_sets, sets, r.syncing_replicas
    );
    let eta = match r.eta_s {
        Some(s) => duration(s),
        None if r.bytes_left == 0 => "-".into(),
        None => "unknown (nothing moving)".into(),
    };
    out += &format!(
        "recovery:  {} left (at most), {}/s, ETA {eta}; {} copied, {} replicas re-homed\n",
        human(r.bytes_left),
        human(r.rate as u64),
        human(r.bytes_copied),
        r.replaced
    );
    out += &format!("rebalance: {}\n", rebalance_line(&r.rebalance));
    let bad: Vec<&api::VolumeRecovery> = r.volumes.iter().filter(|v| v.degraded_sets > 0).collect();
    if !bad.is_empty() {
        let rows: Vec<Vec<String>> = bad
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    format!("{}/{}", v.degraded_sets, v.sets),
                    v.in_progress.to_string(),
                    human(v.bytes_left),
                    format!("{}/s", human(v.rate as u64)),
                ]
            })
            .collect();
        out += &crate::table::render(&["VOLUME", "DEGRADED", "SYNCING", "LEFT", "RATE"], &rows);
    }
    out
}

pub async fn status(client: &Client, a: StatusArgs, json: bool) -> anyhow::Result<()> {
    loop {
        let r = client.recovery().await?;
        if json {
            print_json(&r)?;
        } else {
            let nodes = client.list_nodes().await?.items;
            let c = client.cluster().await?;
            let screen = format!(
                "control plane: {} store, revision {}, answered by {}, leader {}\n{}",
                if c.store.is_empty() {
                    "embedded"
                } else {
                    &c.store
                },
                c.revision,
                if c.manager.is_empty() {
                    "?"
                } else {
                    &c.manager
                },
                c.leader.as_deref().unwrap_or("none known"),
                render(&r, &nodes)
            );
            if a.watch {
                // Clear the terminal and home the cursor.
                print!("\x1b[2J\x1b[H");
            }
            print!("{screen}");
        }
        if !a.watch {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, up: bool) -> api::Node {
        api::Node {
            name: name.into(),
            address: "127.0.0.1:1".into(),
            nbd_address: String::new(),
            nbd_socket: None,
            zone: name.into(),
            state: if up {
                api::NodeState::Up
            } else {
                api::NodeState::Down
            },
            last_heartbeat_ms: 0,
            registered_ms: 0,
        }
    }

    #[test]
    fn one_screen() {
        let r = api::Recovery {
            nodes_up: 3,
            nodes_down: 1,
            nodes_out: vec!["h3".into()],
            degraded_sets: 2,
            syncing_replicas: 2,
            bytes_left: 8 << 20,
            bytes_copied: 4 << 20,
            rate: (2 << 20) as f64,
            eta_s: Some(4.0),
            replaced: 2,
            volumes: vec![api::VolumeRecovery {
                name: "vol".into(),
                sets: 16,
                degraded_sets: 2,
                in_progress: 2,
                bytes_left: 8 << 20,
                bytes_copied: 4 << 20,
                rate: (2 << 20) as f64,
            }],
            rebalance: api::Rebalance {
                enabled: true,
                state: "waiting".into(),
                reason: "2 chunk sets degraded (recovery first)".into(),
                pending: 5,
                in_progress: 0,
                moved: 3,
            },
            nodes: vec![],
            full_ratio: 0.95,
        };
        let nodes = [node("h1", true), node("h3", false)];
        let s = render(&r, &nodes);
        assert!(s.contains("DEGRADED, recovering"), "{s}");
        assert!(s.contains("3 up, 1 down: h3 (out)"), "{s}");
        assert!(s.contains("2 of 16 degraded"), "{s}");
        assert!(
            s.contains("8 MiB left") && s.contains("2 MiB/s") && s.contains("ETA 4s"),
            "{s}"
        );
        assert!(s.contains("vol") && s.contains("2/16"), "{s}");
        assert!(
            s.contains("rebalance: waiting: 0 sets moving, 5 pending (2 chunk sets degraded (recovery first)); 3 moved"),
            "{s}"
        );
        let off = api::Rebalance::default();
        assert_eq!(rebalance_line(&off), "disabled (--no-rebalance)");
        let idle = api::Rebalance {
            enabled: true,
            state: "idle".into(),
            moved: 7,
            ..off
        };
        assert_eq!(rebalance_line(&idle), "idle; 7 moved");
        let healthy = api::Recovery {
            nodes_down: 0,
            nodes_out: vec![],
            degraded_sets: 0,
            syncing_replicas: 0,
            bytes_left: 0,
            eta_s: None,
            rate: 0.0,
            volumes: vec![],
            ..r
        };
        let s = render(&healthy, &nodes[..1]);
        assert!(s.starts_with("cluster:   HEALTHY"), "{s}");
        assert!(s.contains("ETA -"), "{s}");
        assert_eq!(duration(65.0), "1m 05s");
        assert_eq!(duration(7380.0), "2h 03m");
    }
}
