//! The OpenAPI 3 document of the `/v1` API, generated from the handlers' `#[utoipa::path]`
//! attributes and the `ToSchema` derives of [`crate::api`], served at `GET /v1/openapi.json`
//! and checked in as `docs/openapi.json` (a test fails when they differ; `UPDATE_OPENAPI=1
//! cargo test -p volume-mgr --test openapi` rewrites the file).
//!
//! Each operation lists its success answer and the errors only it can give (404, 409, 507);
//! [`Common`] adds the ones every operation shares: 400 `invalid_argument` (bad path segment,
//! query or body), 415 `unsupported_media_type` (a body that is not JSON), 401
//! `unauthenticated` and 403 `forbidden` (when tokens are configured, see [`crate::auth`]), 500
//! `internal` (a corrupt record) and 503 `store_unavailable`.

use crate::api;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

/// `GET /healthz`: always open, never touches the store.
#[utoipa::path(get, path = "/healthz", tag = "cluster", security(()),
    responses((status = 200, content_type = "text/plain", body = String, description = "`ok`")))]
#[allow(dead_code)]
fn healthz() {}

/// `GET /v1/openapi.json`: this document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "cluster",
    responses((status = 200, content_type = "application/json", body = Object, description = "The OpenAPI 3 document")))]
pub(crate) async fn openapi_json() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        json(),
    )
        .into_response()
}

/// `GET /v1/recovery` (handler in [`crate::recovery`]).
#[utoipa::path(get, path = "/v1/recovery", tag = "recovery",
    responses((status = 200, body = api::Recovery)))]
#[allow(dead_code)]
fn get_recovery() {}

/// `PUT /v1/recovery/progress/{name}` (handler in [`crate::recovery`]).
#[utoipa::path(put, path = "/v1/recovery/progress/{name}", tag = "recovery",
    params(("name" = String, Path, description = "Reporting blockd node")),
    request_body = api::RecoveryProgress,
    responses((status = 204, description = "Recorded"),
        (status = 404, body = api::ApiError, description = "not_found: the node is not registered")))]
#[allow(dead_code)]
fn report_progress() {}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Fabric volume-mgr API",
        description = "The Fabric control plane: nodes, disks, volumes and their leases, overlay networks, ports, vswitches, load-balanced VIPs. Errors are `ApiError` `{code, message}`. Authentication: `Authorization: Bearer TOKEN` when the manager has tokens configured (an `admin` token may do everything, a `read-only` token GET only); without tokens the API is open.",
        license(name = "Apache-2.0")
    ),
    paths(
        healthz,
        openapi_json,
        crate::server::metrics,
        crate::server::cluster,
        crate::server::list_nodes,
        crate::server::register,
        crate::server::get_node,
        crate::server::remove_node,
        crate::server::drain_node,
        crate::server::heartbeat,
        crate::server::list_disks,
        crate::server::list_volumes,
        crate::server::create_volume,
        crate::server::get_volume,
        crate::server::delete_volume,
        crate::server::update_replicas,
        crate::server::list_leases,
        crate::server::acquire_lease,
        crate::server::get_lease,
        get_recovery,
        report_progress,
        crate::server::watch::watch,
        crate::server::update::update_volume,
        crate::server::update::update_network,
        crate::server::update::get_switch,
        crate::server::backup::backup,
        crate::server::backup::restore,
        crate::server::network::list_networks,
        crate::server::network::create_network,
        crate::server::network::get_network,
        crate::server::network::delete_network,
        crate::server::network::list_ports,
        crate::server::network::create_port,
        crate::server::network::get_port,
        crate::server::network::delete_port,
        crate::server::network::move_port,
        crate::server::network::list_switches,
        crate::server::network::register_switch,
        crate::server::network::switch_heartbeat,
        crate::server::network::net_state,
        crate::server::vip::list_vips,
        crate::server::vip::create_vip,
        crate::server::vip::get_vip,
        crate::server::vip::delete_vip,
        crate::server::vip::add_backend,
        crate::server::vip::remove_backend,
        crate::server::vip::drain_backend,
        crate::server::vip::report,
        crate::server::vip::acquire_lease,
        crate::server::vip::release_lease,
    ),
    modifiers(&Common),
    tags(
        (name = "cluster", description = "Identity, health, metrics, this document"),
        (name = "nodes", description = "blockd nodes and their disks"),
        (name = "volumes", description = "Replicated volumes and their writer leases"),
        (name = "recovery", description = "Re-replication state"),
        (name = "networks", description = "Overlay (VXLAN) networks"),
        (name = "ports", description = "NICs on overlay networks"),
        (name = "switches", description = "vswitches and what they program"),
        (name = "vips", description = "Load-balanced virtual IPs"),
    )
)]
pub struct ApiDoc;

/// Adds the responses every operation shares and the bearer security scheme.
pub struct Common;

fn error(description: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ApiError")))
                .build(),
        )
        .build()
        .into()
}

fn add(op: &mut Operation, status: &str, description: &str) {
    op.responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| error(description));
}

/// The operations of a path item with whether each mutates.
fn operations(item: &mut PathItem) -> Vec<(&mut Operation, bool)> {
    let mut out = Vec::new();
    if let Some(o) = item.get.as_mut() {
        out.push((o, false));
    }
    for o in [
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        out.push((o, true));
    }
    out
}

impl Modify for Common {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        doc.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
        for (path, item) in doc.paths.paths.iter_mut() {
            let open = path == "/healthz";
            let uses_store = path.starts_with("/v1/") && path != "/v1/openapi.json";
            for (op, mutates) in operations(item) {
                let has_input = op.request_body.is_some()
                    || op.parameters.as_ref().is_some_and(|p| !p.is_empty());
                if has_input {
                    add(
                        op,
                        "400",
                        "invalid_argument: a bad path segment, query or body",
                    );
                }
                if op.request_body.is_some() {
                    add(op, "415", "unsupported_media_type: the body is not JSON");
                }
                if !open {
                    add(
                        op,
                        "401",
                        "unauthenticated: tokens are configured and none or an unknown one was given",
                    );
                }
                if mutates {
                    add(op, "403", "forbidden: a read-only token");
                }
                if uses_store {
                    add(op, "500", "internal: a corrupt record");
                    add(
                        op,
                        "503",
                        "store_unavailable: the state store cannot be reached",
                    );
                }
            }
        }
    }
}

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as served and checked in: pretty JSON with a final newline.
pub fn json() -> String {
    let mut v = serde_json::to_value(document()).expect("the OpenAPI document serialises");
    unsigned_bounds(&mut v);
    let mut s = serde_json::to_string_pretty(&v).expect("JSON serialises");
    s.push('\n');
    s
}

/// utoipa writes Rust's unsigned integers as `int32`/`int64` with `minimum: 0`; their real
/// range is wider than those formats say (a u64 field takes 2^63), so they get their own
/// format and an explicit maximum.
fn unsigned_bounds(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("minimum") == Some(&serde_json::json!(0)) && !m.contains_key("maximum") {
                let max = match m.get("format").and_then(|f| f.as_str()) {
                    Some("int64") => Some(("uint64", serde_json::json!(u64::MAX))),
                    Some("int32") => Some(("uint32", serde_json::json!(u32::MAX))),
                    _ => None,
                };
                if let Some((format, max)) = max {
                    m.insert("format".into(), format.into());
                    m.insert("maximum".into(), max);
                }
            }
            m.values_mut().for_each(unsigned_bounds);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(unsigned_bounds),
        _ => {}
    }
}
