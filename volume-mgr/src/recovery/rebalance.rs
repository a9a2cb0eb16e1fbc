//! Rebalancing: moves chunk sets to nodes (or disks) added after they were placed.
//!
//! # Rules
//! - The *ideal* placement of a set is [`crate::placement::place`] over the up nodes that
//!   are not draining, weighted by their disks' capacity (not their free bytes: the ideal
//!   must not move as data is written, or the cluster would never settle). A set is
//!   *misplaced* when a node of its ideal placement is not a member; only those sets move
//!   (rendezvous hashing: adding a node makes it ideal for about its share of the sets and
//!   changes nothing between the old nodes).
//! - A move is copy-then-switch, the drain's path: the ideal node joins the set as a new
//!   member recorded *not in service* (the lease holder's blockd copies it and records it in
//!   service), and only once every member is in service does the member that left the ideal
//!   placement leave the record. A set never has fewer in-service copies than before.
//! - Damping: data moves only to a node up for `rebalance_after` (not flapping) and not
//!   full; a misplaced set whose ideal node is not eligible yet waits (it does not move to a
//!   second-best node meanwhile).
//! - New moves start only when no set is degraded, no replica is being re-homed and no node
//!   is draining (recovery first); at most [`MAX_REBALANCING`] sets move at once, within the
//!   cluster-wide copy budget ([`super::MAX_SYNCING`]).

use super::{DrainStep, NodeView};
use crate::api;
use crate::placement::{place, score, Candidate};
use std::collections::{BTreeSet, HashMap};

/// Most chunk sets being rebalanced at once in the cluster.
pub const MAX_REBALANCING: usize = 4;

/// What one rebalancer pass plans (pure: unit-tested).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RebalancePlan {
    /// New members on ideal nodes ([`DrainStep::Add`]) and old members leaving
    /// ([`DrainStep::Remove`]).
    pub steps: Vec<DrainStep>,
    /// Misplaced sets for which no move started (no budget, not allowed now, or no eligible
    /// node yet).
    pub pending: u64,
    /// Sets with a move under way at the start of the pass (a new member syncing, or all in
    /// service and one member too many).
    pub in_progress: u64,
    /// Ideal nodes that cannot take data yet (up too shortly, flapping or full).
    pub waiting_for: BTreeSet<String>,
}

/// Sets with a move under way: more members than the volume wants.
pub fn moves_under_way(volumes: &[api::Volume]) -> usize {
    volumes
        .iter()
        .flat_map(|v| v.sets.iter().map(move |s| (v, s)))
        .filter(|(v, s)| s.members.len() > v.replicas.max(1) as usize)
        .count()
}

/// The member of a set with one member too many that leaves: one on a node that is not up
/// first, then one that shares a failure domain with another member, then the one with the
/// lowest placement score; never a member of the ideal placement `want`.
fn victim(
    v: &api::Volume,
    s: usize,
    members: &[api::Member],
    want: &[String],
    nodes: &HashMap<String, NodeView>,
    ideal: &[Candidate],
) -> Option<String> {
    let zone = |n: &str| nodes.get(n).map(|x| x.zone.clone()).unwrap_or_default();
    members
        .iter()
        .filter(|m| !want.contains(&m.node))
        .map(|m| {
            let up = nodes.get(&m.node).is_some_and(|n| n.up);
            let z = zone(&m.node);
            let shared = members
                .iter()
                .any(|o| o.node != m.node && !z.is_empty() && zone(&o.node) == z);
            let sc = ideal
                .iter()
                .find(|c| c.name == m.node)
                .map(|c| score(v.id, s as u64, c))
                .unwrap_or(f64::NEG_INFINITY);
            (up, !shared, sc, m.node.clone())
        })
        // Smallest first: not up, then shared zone, then lowest score (ties: by name).
        .min_by(|a, b| {
            (a.0, a.1)
                .cmp(&(b.0, b.1))
                .then(a.2.total_cmp(&b.2))
                .then_with(|| a.3.cmp(&b.3))
        })
        .map(|x| x.3)
}

/// Plans this pass's rebalancing. `ideal` are the up, non-draining nodes weighted by
/// capacity; `eligible` the nodes data may move to now; `start` whether new moves may start
/// (nothing degraded, re-homed or draining); `budget` how many may start.
pub fn plan_rebalance(
    volumes: &[api::Volume],
    nodes: &HashMap<String, NodeView>,
    ideal: &[Candidate],
    eligible: &BTreeSet<String>,
    start: bool,
    budget: usize,
) -> RebalancePlan {
    let mut p = RebalancePlan::default();
    let mut added = 0;
    for v in volumes {
        let r = v.replicas.max(1) as usize;
        for (s, set) in v.sets.iter().enumerate() {
            let syncing = set.members.iter().any(|m| !m.in_service);
            if set.members.len() > r {
                p.in_progress += 1;
                if syncing {
                    continue; // the lease holder is copying
                }
                let Ok(want) = place(v.id, s as u64, ideal, r) else {
                    continue;
                };
                if let Some(node) = victim(v, s, &set.members, &want, nodes, ideal) {
                    // The ones that stay: at least R in service on up nodes.
                    let good = set
                        .members
                        .iter()
                        .filter(|m| m.node != node && nodes.get(&m.node).is_some_and(|n| n.up))
                        .count();
                    if good >= r {
                        p.steps.push(DrainStep::Remove {
                            volume: v.name.clone(),
                            set: s,
                            node,
                        });
                    }
                }
                continue;
            }
            if syncing || set.members.len() < r {
                continue; // re-replication's business
            }
            let Ok(want) = place(v.id, s as u64, ideal, r) else {
                continue;
            };
            let missing: Vec<&String> = want
                .iter()
                .filter(|n| !set.members.iter().any(|m| &&m.node == n))
                .collect();
            if missing.is_empty() {
                continue;
            }
            let to = missing.iter().find(|n| eligible.contains(**n));
            for n in missing.iter().filter(|n| !eligible.contains(**n)) {
                p.waiting_for.insert((*n).clone());
            }
            match to {
                Some(to) if start && added < budget => {
                    added += 1;
                    p.steps.push(DrainStep::Add {
                        volume: v.name.clone(),
                        set: s,
                        to: (*to).clone(),
                    });
                }
                _ => p.pending += 1,
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(names: &[&str]) -> Vec<Candidate> {
        names
            .iter()
            .map(|n| Candidate {
                name: n.to_string(),
                zone: n.to_string(),
                weight: 1.0,
            })
            .collect()
    }

    fn views(names: &[&str]) -> HashMap<String, NodeView> {
        names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    NodeView {
                        zone: n.to_string(),
                        up: true,
                        out: false,
                    },
                )
            })
            .collect()
    }

    /// A volume of `sets` sets placed over `nodes` the way volume creation places them.
    fn placed(name: &str, id: u64, sets: usize, r: usize, nodes: &[Candidate]) -> api::Volume {
        api::Volume {
            name: name.into(),
            id,
            size: sets as u64 * api::DEFAULT_CHUNK_SIZE,
            chunk_size: api::DEFAULT_CHUNK_SIZE,
            replicas: r as u32,
            min_replicas: 2.min(r as u32),
            sets: (0..sets)
                .map(|s| api::ChunkSet {
                    members: place(id, s as u64, nodes, r)
                        .unwrap()
                        .into_iter()
                        .map(|node| api::Member {
                            node,
                            in_service: true,
                        })
                        .collect(),
                })
                .collect(),
            created_ms: 0,
        }
    }

    /// Applies steps the way the controller records them; `copied` puts new members in
    /// service (what the lease holder does once it copied them).
    fn apply(vols: &mut [api::Volume], steps: &[DrainStep], copied: bool) {
        for st in steps {
            match st {
                DrainStep::Add { volume, set, to } => {
                    let v = vols.iter_mut().find(|v| &v.name == volume).unwrap();
                    v.sets[*set].members.push(api::Member {
                        node: to.clone(),
                        in_service: copied,
                    });
                }
                DrainStep::Remove { volume, set, node } => {
                    let v = vols.iter_mut().find(|v| &v.name == volume).unwrap();
                    v.sets[*set].members.retain(|m| &m.node != node);
                }
            }
        }
    }

    fn in_service(vols: &[api::Volume]) -> Vec<usize> {
        vols.iter()
            .flat_map(|v| {
                v.sets
                    .iter()
                    .map(|s| s.members.iter().filter(|m| m.in_service).count())
            })
            .collect()
    }

    #[test]
    fn balanced_cluster_plans_nothing() {
        let old = cands(&["a", "b", "c", "d"]);
        let vols = vec![placed("v", 1, 32, 3, &old), placed("w", 2, 32, 2, &old)];
        let all: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
        let p = plan_rebalance(&vols, &views(&["a", "b", "c", "d"]), &old, &all, true, 8);
        assert_eq!(p, RebalancePlan::default());
    }

    /// A fifth node: only the sets whose ideal placement now lists it move, each to it, in
    /// moves bounded by the budget; R in service at every step; it converges to nothing.
    #[test]
    fn added_node_takes_its_share_then_it_stops() {
        let old = cands(&["a", "b", "c", "d"]);
        let new = cands(&["a", "b", "c", "d", "e"]);
        let mut vols = vec![placed("v", 1, 32, 3, &old), placed("w", 2, 32, 2, &old)];
        let target: Vec<api::Volume> =
            vec![placed("v", 1, 32, 3, &new), placed("w", 2, 32, 2, &new)];
        let should_move: usize = vols
            .iter()
            .zip(&target)
            .map(|(a, b)| a.sets.iter().zip(&b.sets).filter(|(x, y)| x != y).count())
            .sum();
        assert!(should_move > 10, "{should_move}");
        let nodes = views(&["a", "b", "c", "d", "e"]);
        // e is not eligible yet (up too shortly): nothing moves, the sets wait for it.
        let some: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
        let p = plan_rebalance(&vols, &nodes, &new, &some, true, 8);
        assert!(p.steps.is_empty());
        assert_eq!(p.pending as usize, should_move);
        assert_eq!(p.waiting_for, ["e".to_string()].into());
        let all: BTreeSet<String> = ["a", "b", "c", "d", "e"].map(String::from).into();
        // Not allowed to start (a set degraded elsewhere): nothing starts either.
        let p = plan_rebalance(&vols, &nodes, &new, &all, false, 8);
        assert!(p.steps.is_empty() && p.pending as usize == should_move);
        let mut passes = 0;
        let mut adds = 0;
        loop {
            passes += 1;
            assert!(passes < 100, "does not converge");
            let p = plan_rebalance(&vols, &nodes, &new, &all, true, 3);
            if p.steps.is_empty() {
                assert_eq!((p.pending, p.in_progress), (0, 0), "{p:?}");
                break;
            }
            let a: Vec<&DrainStep> = p
                .steps
                .iter()
                .filter(|s| matches!(s, DrainStep::Add { .. }))
                .collect();
            assert!(a.len() <= 3);
            for s in &a {
                assert!(matches!(s, DrainStep::Add { to, .. } if to == "e"), "{s:?}");
            }
            adds += a.len();
            // Recorded syncing: R in service still, nothing more planned for those sets.
            apply(&mut vols, &p.steps, false);
            assert!(in_service(&vols)
                .iter()
                .zip(
                    vols.iter()
                        .flat_map(|v| v.sets.iter().map(move |_| v.replicas))
                )
                .all(|(n, r)| *n >= r as usize));
            let again = plan_rebalance(&vols, &nodes, &new, &all, true, 0);
            assert!(again.steps.is_empty(), "{again:?}");
            // Copied: the lease holder records them in service.
            for v in &mut vols {
                for set in &mut v.sets {
                    for m in &mut set.members {
                        m.in_service = true;
                    }
                }
            }
        }
        assert_eq!(adds, should_move);
        let sorted = |vs: &[api::Volume]| -> Vec<Vec<String>> {
            vs.iter()
                .flat_map(|v| {
                    v.sets.iter().map(|s| {
                        let mut n: Vec<String> = s.members.iter().map(|m| m.node.clone()).collect();
                        n.sort();
                        n
                    })
                })
                .collect()
        };
        assert_eq!(sorted(&vols), sorted(&target));
    }

    #[test]
    fn zones_stay_distinct_and_the_duplicate_leaves() {
        // b and e share a zone: a set {a, b, c} whose ideal is {a, e, c} swaps b for e.
        let mut new = cands(&["a", "b", "c", "d", "e"]);
        new[4].zone = "b".into();
        let mut nodes = views(&["a", "b", "c", "d", "e"]);
        nodes.get_mut("e").unwrap().zone = "b".into();
        let all: BTreeSet<String> = ["a", "b", "c", "d", "e"].map(String::from).into();
        for s in 0..200u64 {
            let want = place(9, s, &new, 3).unwrap();
            if !want.contains(&"e".to_string()) {
                continue;
            }
            let mut cur: Vec<String> = want.iter().filter(|n| *n != "e").cloned().collect();
            cur.push("b".into());
            let mut v = placed("v", 9, s as usize + 1, 3, &new);
            v.sets[s as usize].members = cur
                .iter()
                .map(|n| api::Member {
                    node: n.clone(),
                    in_service: true,
                })
                .collect();
            let mut vols = vec![v];
            let p = plan_rebalance(&vols, &nodes, &new, &all, true, 8);
            assert_eq!(p.steps.len(), 1, "{p:?}");
            apply(&mut vols, &p.steps, true);
            let p = plan_rebalance(&vols, &nodes, &new, &all, true, 8);
            assert_eq!(
                p.steps,
                vec![DrainStep::Remove {
                    volume: "v".into(),
                    set: s as usize,
                    node: "b".into()
                }]
            );
            return;
        }
        panic!("no set prefers e");
    }

    #[test]
    fn old_member_stays_while_too_few_others_are_up() {
        let new = cands(&["a", "b", "c", "d"]);
        let mut nodes = views(&["a", "b", "c", "d"]);
        let want = place(4, 0, &new, 2).unwrap();
        let other = ["a", "b", "c", "d"]
            .into_iter()
            .find(|n| !want.contains(&n.to_string()))
            .unwrap();
        let v = api::Volume {
            sets: vec![api::ChunkSet {
                members: [want[0].as_str(), want[1].as_str(), other]
                    .into_iter()
                    .map(|n| api::Member {
                        node: n.into(),
                        in_service: true,
                    })
                    .collect(),
            }],
            ..placed("v", 4, 1, 2, &new)
        };
        let all: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
        let p = plan_rebalance(std::slice::from_ref(&v), &nodes, &new, &all, true, 8);
        assert_eq!(
            p.steps,
            vec![DrainStep::Remove {
                volume: "v".into(),
                set: 0,
                node: other.into()
            }]
        );
        // One of the ideal members is down: the extra copy is kept.
        nodes.get_mut(&want[0]).unwrap().up = false;
        let p = plan_rebalance(&[v], &nodes, &new, &all, true, 8);
        assert!(p.steps.is_empty(), "{p:?}");
    }
}
