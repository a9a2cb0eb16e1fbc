//! The OpenAPI document cannot drift from the code: the checked-in `docs/openapi.json` is the
//! generated one (`UPDATE_OPENAPI=1 cargo test -p volume-mgr --test openapi` rewrites it), the
//! served `/v1/openapi.json` is the same, every route of `router()` is documented with exactly
//! the methods it answers, and every documented operation is routed.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use std::collections::BTreeSet;
use tower::ServiceExt;

const CHECKED_IN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
const SERVER_RS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/server.rs");

#[test]
fn checked_in_document_is_current() {
    let generated = volume_mgr::openapi::json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::create_dir_all(std::path::Path::new(CHECKED_IN).parent().unwrap()).unwrap();
        std::fs::write(CHECKED_IN, &generated).unwrap();
        eprintln!("rewrote {CHECKED_IN}");
        return;
    }
    let on_disk = std::fs::read_to_string(CHECKED_IN).unwrap_or_default();
    if on_disk != generated {
        let line = on_disk
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map(|i| i + 1)
            .unwrap_or(on_disk.lines().count().min(generated.lines().count()) + 1);
        panic!(
            "docs/openapi.json is not the document the code generates (first difference at line {line}); \
             regenerate it with: UPDATE_OPENAPI=1 cargo test -p volume-mgr --test openapi"
        );
    }
}

/// The paths `router()` registers, read from its source (`.route("PATH", …)`).
fn routed_paths() -> BTreeSet<String> {
    let src = std::fs::read_to_string(SERVER_RS).unwrap();
    let start = src.find("pub fn router(").expect("router() in server.rs");
    let body = &src[start..];
    let body = &body[..body.find("\n}\n").expect("end of router()")];
    let mut out = BTreeSet::new();
    let mut rest = body;
    while let Some(i) = rest.find(".route(") {
        rest = &rest[i + ".route(".len()..];
        let q = rest.find('"').unwrap();
        let r = &rest[q + 1..];
        let e = r.find('"').unwrap();
        out.insert(r[..e].to_string());
        rest = &r[e..];
    }
    assert!(out.len() > 20, "found only {out:?} in router()");
    out
}

/// (path, methods) of the document.
fn documented() -> Vec<(String, BTreeSet<String>)> {
    let doc: serde_json::Value = serde_json::from_str(&volume_mgr::openapi::json()).unwrap();
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(p, item)| {
            let methods = item
                .as_object()
                .unwrap()
                .keys()
                .map(|m| m.to_uppercase())
                .filter(|m| ALL.iter().any(|a| a.as_str() == m))
                .collect();
            (p.clone(), methods)
        })
        .collect()
}

const ALL: [Method; 5] = [
    Method::GET,
    Method::PUT,
    Method::POST,
    Method::DELETE,
    Method::PATCH,
];

#[test]
fn every_route_is_documented_and_every_operation_routed() {
    let routed = routed_paths();
    let doc = documented();
    let doc_paths: BTreeSet<String> = doc.iter().map(|(p, _)| p.clone()).collect();
    let undocumented: Vec<_> = routed.difference(&doc_paths).collect();
    let unrouted: Vec<_> = doc_paths.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the OpenAPI document (add #[utoipa::path] and list them in openapi.rs): {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "documented paths router() does not serve: {unrouted:?}"
    );

    // Methods: ask the real router. A documented operation must reach a handler (whatever
    // it answers, not the 404/405 fallbacks); any other method must be 405.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = volume_mgr::server::open(volume_mgr::Config {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    let router = volume_mgr::server::router(app);
    let mut wrong = Vec::new();
    for (path, methods) in &doc {
        let uri = path
            .replace("{addr}", "127.0.0.1:1")
            .replace(['{', '}'], "");
        for m in ALL {
            let req = Request::builder()
                .method(m.clone())
                .uri(&uri)
                .body(Body::empty())
                .unwrap();
            let resp = rt.block_on(router.clone().oneshot(req)).unwrap();
            let status = resp.status();
            let body = rt
                .block_on(axum::body::to_bytes(resp.into_body(), 1 << 20))
                .unwrap();
            let fallback = status == StatusCode::METHOD_NOT_ALLOWED
                || (status == StatusCode::NOT_FOUND
                    && String::from_utf8_lossy(&body).contains("no such route"));
            if methods.contains(m.as_str()) == fallback {
                wrong.push(format!(
                    "{m} {path}: documented {}, router answers {status}",
                    methods.contains(m.as_str())
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "document and router disagree: {wrong:#?}");
}

#[test]
fn every_operation_documents_its_errors() {
    let doc: serde_json::Value = serde_json::from_str(&volume_mgr::openapi::json()).unwrap();
    let mut bad = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            if !responses.keys().any(|s| s.starts_with('2')) {
                bad.push(format!("{method} {path}: no success response"));
            }
            for (status, r) in responses {
                if !status.starts_with('2')
                    && r.pointer("/content/application~1json/schema/$ref")
                        != Some(&serde_json::json!("#/components/schemas/ApiError"))
                {
                    bad.push(format!("{method} {path} {status}: not an ApiError body"));
                }
            }
            let needs = |s: &str| !responses.contains_key(s);
            if path != "/healthz" && needs("401") {
                bad.push(format!("{method} {path}: no 401"));
            }
            if method != "get" && (needs("403") || needs("503")) {
                bad.push(format!("{method} {path}: no 403 or 503"));
            }
            if op.get("requestBody").is_some() && (needs("400") || needs("415")) {
                bad.push(format!("{method} {path}: a body but no 400 or 415"));
            }
        }
    }
    assert!(bad.is_empty(), "{bad:#?}");
}

#[tokio::test]
async fn served_document_is_the_generated_one() {
    let dir = tempfile::tempdir().unwrap();
    let app = volume_mgr::server::open(volume_mgr::Config {
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    let resp = volume_mgr::server::router(app)
        .oneshot(
            Request::get("/v1/openapi.json")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 22)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(body.to_vec()).unwrap(),
        volume_mgr::openapi::json()
    );
}
