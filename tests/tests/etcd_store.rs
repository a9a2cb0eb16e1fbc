//! The etcd store backend, its change feed and leader election against a real 3-member etcd
//! cluster (Debian's etcd-server) on loopback. The tests take turns (one cluster at a time) so
//! that their timing holds on a loaded 2-core machine.

use fabric_tests::etcd::EtcdCluster;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use volume_mgr::etcd_store::EtcdStore;
use volume_mgr::leader::Leadership;
use volume_mgr::store::{conformance, conformance_compacted, Kind, Op, Store, StoreError};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const TIMEOUT: Duration = Duration::from_secs(2);

fn prefix(test: &str) -> String {
    format!("/fabric-test-{}-{test}/", std::process::id())
}

fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < timeout, "timed out after {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn etcd_store_conformance_feed_across_instances_and_calls_from_async_code() {
    let _g = serial();
    let t0 = Instant::now();
    let c = EtcdCluster::start(3);
    eprintln!("3-member etcd cluster up in {:?}", t0.elapsed());
    let p = prefix("conf");
    let s = EtcdStore::connect(&c.endpoints(), &p, TIMEOUT).unwrap();
    let t = Instant::now();
    conformance(&s);
    eprintln!("conformance on etcd: {:?}", t.elapsed());

    // A second store on the same prefix sees the first's commits, through `changes` and
    // `subscribe`; and the other way round.
    let s2 = EtcdStore::connect(&c.endpoints()[1..], &p, TIMEOUT).unwrap();
    assert_eq!(s2.revision().unwrap(), s.revision().unwrap());
    assert_eq!(
        s2.list(Kind::Volume).unwrap(),
        s.list(Kind::Volume).unwrap()
    );
    let mut sub2 = s2.subscribe();
    let mut sub1 = s.subscribe();
    let since = s2.revision().unwrap();
    let t = Instant::now();
    let r = s
        .commit(&[], &[Op::Put(Kind::Port, "p1".into(), b"v".to_vec())])
        .unwrap();
    let heard = wait("s2 hears s's commit", Duration::from_secs(10), || {
        sub2.try_recv().ok()
    });
    eprintln!(
        "commit on one store to subscribe on the other: {:?}",
        t.elapsed()
    );
    assert_eq!(heard, r);
    let ch = s2.changes(since, 100).unwrap();
    assert_eq!(ch.len(), 1);
    assert_eq!(
        (ch[0].rev, ch[0].kind, ch[0].name.as_str()),
        (r, Kind::Port, "p1")
    );
    assert_eq!(ch[0].value.as_deref(), Some(&b"v"[..]));
    let r2 = s2
        .commit(&[], &[Op::Delete(Kind::Port, "p1".into())])
        .unwrap();
    let heard = wait("s hears s2's commit", Duration::from_secs(10), || {
        sub1.try_recv().ok().filter(|&v| v == r2)
    });
    assert_eq!(heard, r2);
    assert_eq!(s.changes(r, 100).unwrap()[0].value, None);

    // A store under another prefix shares nothing, not even revisions or feed entries.
    let other = EtcdStore::connect(&c.endpoints(), &prefix("other"), TIMEOUT).unwrap();
    assert_eq!(other.revision().unwrap(), 0);
    assert!(other.list(Kind::Volume).unwrap().1.is_empty());
    let ro = other
        .commit(&[], &[Op::Put(Kind::Volume, "x".into(), b"o".to_vec())])
        .unwrap();
    assert_eq!(other.changes(0, 100).unwrap().len(), 1);
    assert!(s.changes(s.revision().unwrap(), 100).unwrap().is_empty());
    assert!(ro > s.revision().unwrap());

    // The sync trait from async code: a multi-thread runtime's worker, and a current-thread
    // runtime, do not panic ("cannot block inside a runtime") or deadlock.
    let s = Arc::new(s);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let s1 = s.clone();
    let got = rt.block_on(async move {
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = s1.clone();
            tasks.push(tokio::spawn(async move {
                s.commit(
                    &[],
                    &[Op::Put(Kind::Node, format!("async{i}"), vec![i as u8])],
                )
                .unwrap();
                s.get(Kind::Node, &format!("async{i}")).unwrap()
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    });
    assert_eq!(got, (0..8u8).map(|i| Some(vec![i])).collect::<Vec<_>>());
    let s1 = s.clone();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            assert_eq!(s1.list(Kind::Node).unwrap().1.len(), 9);
        });
    // Connected and dropped inside async code: no panic either.
    let eps = c.endpoints();
    let p2 = p.clone();
    rt.block_on(async move {
        tokio::spawn(async move {
            let s = EtcdStore::connect(&eps, &p2, TIMEOUT).unwrap();
            assert!(s.revision().unwrap() > 0);
            drop(s);
        })
        .await
        .unwrap();
    });
    drop(rt);

    // Compaction last (it compacts the whole cluster's history).
    conformance_compacted(s.as_ref(), &|rev| s.compact(rev).unwrap());
    eprintln!("total {:?}", t0.elapsed());
}

#[test]
fn etcd_store_bad_input_is_an_error_within_the_timeout() {
    let _g = serial();
    let e = EtcdStore::connect(&[], "/p/", TIMEOUT).err().unwrap();
    assert!(e.to_string().contains("no etcd endpoints"), "{e}");
    let e = EtcdStore::connect(&["http://127.0.0.1:1".into()], "", TIMEOUT)
        .err()
        .unwrap();
    assert!(e.to_string().contains("prefix"), "{e}");
    let e = EtcdStore::connect(&["not a url\n".into()], "/p/", TIMEOUT)
        .err()
        .unwrap();
    assert!(matches!(e, StoreError::Backend(_)), "{e}");
    // Nothing listens there: an error after about the timeout, not a hang.
    let port = fabric_tests::free_port();
    let t = Instant::now();
    let e = EtcdStore::connect(&[format!("http://127.0.0.1:{port}")], "/p/", TIMEOUT)
        .err()
        .unwrap();
    assert!(matches!(e, StoreError::Backend(_)), "{e}");
    assert!(t.elapsed() < TIMEOUT * 3, "{:?}", t.elapsed());
}

#[test]
fn etcd_quorum_loss_is_a_backend_error_within_the_timeout_then_recovers() {
    let _g = serial();
    let mut c = EtcdCluster::start(3);
    let s = EtcdStore::connect(&c.endpoints(), &prefix("quorum"), TIMEOUT).unwrap();
    let r = s
        .commit(
            &[],
            &[Op::Put(Kind::Volume, "v".into(), b"before".to_vec())],
        )
        .unwrap();
    let mut sub = s.subscribe();
    c.stop(1);
    c.kill(2);
    // Give the survivor time to notice it has no leader; calls before that also must fail in
    // time, checked below all the same.
    let deadline = TIMEOUT + Duration::from_millis(1500);
    let mut worst = Duration::ZERO;
    for round in 0..3 {
        type Call<'a> = Box<dyn Fn() -> Result<(), StoreError> + 'a>;
        let calls: Vec<(&str, Call)> = vec![
            ("get", Box::new(|| s.get(Kind::Volume, "v").map(|_| ()))),
            ("list", Box::new(|| s.list(Kind::Volume).map(|_| ()))),
            ("revision", Box::new(|| s.revision().map(|_| ()))),
            ("changes", Box::new(|| s.changes(0, 10).map(|_| ()))),
            (
                "commit",
                Box::new(|| {
                    s.commit(
                        &[],
                        &[Op::Put(Kind::Volume, "w".into(), b"during".to_vec())],
                    )
                    .map(|_| ())
                }),
            ),
        ];
        for (what, f) in calls {
            let t = Instant::now();
            let r = f();
            let took = t.elapsed();
            worst = worst.max(took);
            assert!(
                matches!(r, Err(StoreError::Backend(_))),
                "round {round}: {what} without quorum gave {r:?} (stale data or no error)"
            );
            assert!(took < deadline, "round {round}: {what} took {took:?}");
        }
    }
    eprintln!("without quorum: every call failed, the slowest in {worst:?}");
    let t = Instant::now();
    let e = EtcdStore::connect(&c.endpoints(), &prefix("quorum"), TIMEOUT)
        .err()
        .unwrap();
    assert!(matches!(e, StoreError::Backend(_)) && t.elapsed() < deadline * 2);

    c.restart(1);
    c.restart(2);
    c.wait_healthy(&[0, 1, 2], Duration::from_secs(60));
    let t = Instant::now();
    let r2 = wait(
        "a commit after the restart",
        Duration::from_secs(30),
        || {
            s.commit(&[], &[Op::Put(Kind::Volume, "x".into(), b"after".to_vec())])
                .ok()
        },
    );
    eprintln!("quorum back: first commit after {:?}", t.elapsed());
    assert!(r2 > r);
    assert_eq!(s.get(Kind::Volume, "v").unwrap(), Some(b"before".to_vec()));
    // The background watch reconnected: the subscriber hears the new commit.
    wait(
        "the subscriber hears the commit after the outage",
        Duration::from_secs(15),
        || sub.try_recv().ok().filter(|&v| v >= r2),
    );
    let ch = s.changes(r, 10).unwrap();
    assert!(ch.iter().any(|c| c.name == "x" && c.rev == r2), "{ch:?}");
}

/// Three candidates, each connected to its own member only (so killing a member cuts its
/// candidate off). A sampler checks every 2 ms that no two handles think they lead.
#[test]
fn etcd_leader_election_takeover_and_fencing() {
    let _g = serial();
    let mut c = EtcdCluster::start(3);
    let p = prefix("leader");
    let ttl = Duration::from_secs(3);
    let bound = Duration::from_secs(10);
    type Slot = Option<(Arc<EtcdStore>, Leadership)>;
    let start = |c: &EtcdCluster, i: usize, gen: u32| -> (Arc<EtcdStore>, Leadership) {
        let s = Arc::new(EtcdStore::connect(&[c.endpoint(i)], &p, TIMEOUT).unwrap());
        let l = Leadership::etcd(&s, &format!("http://mgr{i}.{gen}"), ttl).unwrap();
        (s, l)
    };
    let slots: RwLock<Vec<Slot>> = RwLock::new((0..3).map(|i| Some(start(&c, i, 0))).collect());
    // Handles whose store is gone (a crashed manager): still checked by the sampler.
    let orphans: Mutex<Vec<Leadership>> = Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    let samples = AtomicUsize::new(0);
    let leaders_now = || -> Vec<String> {
        let mut v: Vec<String> = slots
            .read()
            .unwrap()
            .iter()
            .flatten()
            .filter(|(_, l)| l.is_leader())
            .map(|(_, l)| l.id().to_string())
            .collect();
        v.extend(
            orphans
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.is_leader())
                .map(|l| l.id().to_string()),
        );
        v
    };
    // Waits for exactly one leader, not `not` (a deposed one still counting down its term).
    let one_leader = |what: &str, not: &str| -> (usize, String) {
        let t = Instant::now();
        let id = wait(what, bound, || {
            let v = leaders_now();
            (v.len() == 1 && v[0] != not).then(|| v[0].clone())
        });
        eprintln!("{what}: {id} after {:?}", t.elapsed());
        let slot = slots
            .read()
            .unwrap()
            .iter()
            .position(|s| s.as_ref().is_some_and(|(_, l)| l.id() == id))
            .expect("the leader is in a slot");
        (slot, id)
    };
    std::thread::scope(|sc| {
        let sampler = sc.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let v = leaders_now();
                assert!(v.len() <= 1, "two leaders at once: {v:?}");
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // 1. Exactly one of three; the others know who.
            let (l, id) = one_leader("first leader", "");
            wait("followers name the leader", bound, || {
                slots
                    .read()
                    .unwrap()
                    .iter()
                    .flatten()
                    .all(|(_, h)| h.leader().as_deref() == Some(id.as_str()))
                    .then_some(())
            });
            // Fenced writes apply while the term holds.
            let (fence, store) = {
                let g = slots.read().unwrap();
                let (s, h) = g[l].as_ref().unwrap();
                (h.fence().expect("the leader has a fence"), s.clone())
            };
            assert_eq!(fence.len(), 1);
            for (i, (_, h)) in slots.read().unwrap().iter().flatten().enumerate() {
                assert_eq!(h.fence().is_some(), h.is_leader(), "slot {i}");
            }
            store
                .commit(&fence, &[Op::Put(Kind::Meta, "work".into(), b"1".to_vec())])
                .unwrap();

            // 2. The leader resigns (handle dropped): another takes over at once.
            let t = Instant::now();
            slots.write().unwrap()[l] = None;
            let (l2, id2) = one_leader("leader after a resignation", &id);
            assert!(t.elapsed() < bound);
            let e = store.commit(&fence, &[Op::Put(Kind::Meta, "work".into(), b"2".to_vec())]);
            assert!(
                matches!(&e, Err(StoreError::Conflict(k)) if k == "leader/controller"),
                "a resigned leader's fenced commit: {e:?}"
            );
            drop(store);
            slots.write().unwrap()[l] = Some(start(&c, l, 1));

            // 3. The leader crashes (its store and runtime gone: no resignation, the lease
            // expires): its handle stops counting itself leader on its own, and another
            // leads within the bound.
            let t = Instant::now();
            let (_store, h) = slots.write().unwrap()[l2].take().unwrap();
            orphans.lock().unwrap().push(h);
            drop(_store);
            let (l3, _) = one_leader("leader after a crash", &id2);
            assert!(t.elapsed() < bound);
            assert!(!orphans.lock().unwrap()[0].is_leader());
            slots.write().unwrap()[l2] = Some(start(&c, l2, 2));

            // 4. The leader is cut off from etcd (its member killed): it fences itself before
            // its lease can expire, another leads, and the deposed leader's fenced commit
            // fails once it reaches etcd again.
            let (fence, store, old_id) = {
                let g = slots.read().unwrap();
                let (s, h) = g[l3].as_ref().unwrap();
                (h.fence().unwrap(), s.clone(), h.id().to_string())
            };
            let t = Instant::now();
            c.kill(l3);
            let (_, new_id) = one_leader("leader after the leader's member died", &old_id);
            assert!(t.elapsed() < bound);
            assert_ne!(new_id, old_id);
            {
                let g = slots.read().unwrap();
                let h = &g[l3].as_ref().unwrap().1;
                assert!(!h.is_leader() && h.fence().is_none());
            }
            c.restart(l3);
            c.wait_healthy(&[0, 1, 2], Duration::from_secs(60));
            let e = wait(
                "the deposed leader reaches etcd",
                Duration::from_secs(30),
                || match store.commit(&fence, &[Op::Put(Kind::Meta, "work".into(), b"x".to_vec())])
                {
                    Err(StoreError::Backend(_)) => None,
                    r => Some(r),
                },
            );
            assert!(
                matches!(&e, Err(StoreError::Conflict(k)) if k == "leader/controller"),
                "a deposed leader's fenced commit: {e:?}"
            );
            assert_eq!(store.get(Kind::Meta, "work").unwrap(), Some(b"1".to_vec()));
            // It rejoins as a follower and learns who leads.
            wait(
                "the deposed leader follows",
                Duration::from_secs(15),
                || {
                    let g = slots.read().unwrap();
                    let h = &g[l3].as_ref().unwrap().1;
                    (!h.is_leader() && h.leader().as_deref() == Some(new_id.as_str())).then_some(())
                },
            );
        }));
        done.store(true, Ordering::Relaxed);
        let sampled = sampler.join();
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
        if let Err(e) = sampled {
            std::panic::resume_unwind(e);
        }
    });
    eprintln!(
        "sampler: {} samples, never two leaders",
        samples.load(Ordering::Relaxed)
    );
    assert!(samples.load(Ordering::Relaxed) > 100);
}

#[test]
fn embedded_leadership_always_leads_with_an_empty_fence() {
    let l = Leadership::embedded("http://127.0.0.1:7700");
    assert!(l.is_leader());
    assert!(*l.watch().borrow());
    assert_eq!(l.leader().as_deref(), Some("http://127.0.0.1:7700"));
    assert_eq!(l.fence(), Some(vec![]));
}
