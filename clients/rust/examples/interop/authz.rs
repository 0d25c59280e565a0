//! Case authz_roles: each role certificate of `connmeta certs init` against
//! a server run with its example policy.

use std::path::Path;
use std::time::Duration;

use connmeta::health::{HealthCheckRequest, HealthClient};
use connmeta::v1::connection_service_client::ConnectionServiceClient;
use connmeta::v1::report_service_client::ReportServiceClient;
use connmeta::v1::router_service_client::RouterServiceClient;
use connmeta::v1::{
    ConnectionFilter, GetConnectionRequest, ListConnectionsRequest, ReportRequest, RouteRequest,
    UpdateServerConnectionRequest, WatchConnectionsRequest,
};
use connmeta::{ConnectOptions, ErrorDetails, TlsConfig, meta, reason};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::Env;
use crate::proxy::{addr, new_id};

type R = Result<(), String>;

// The example policy of `connmeta certs init` (policy.json), as the
// contract states it: every role may use health and reflection and read;
// writer may also update, router route, reporter report. Written out here
// rather than read from the policy file, so a policy that drifted from the
// contract fails the case.
const GET: &str = "/connmeta.v1.ConnectionService/GetConnection";
const LIST: &str = "/connmeta.v1.ConnectionService/ListConnections";
const WATCH: &str = "/connmeta.v1.ConnectionService/WatchConnections";
const UPDATE: &str = "/connmeta.v1.ConnectionService/UpdateServerConnection";
const ROUTE: &str = "/connmeta.v1.RouterService/Route";
const REPORT: &str = "/connmeta.v1.ReportService/Report";
const HEALTH: &str = "/grpc.health.v1.Health/Check";
const REFLECTION: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
const READ: &[&str] = &[GET, LIST, WATCH, HEALTH, REFLECTION];
const METHODS: &[&str] = &[GET, LIST, WATCH, UPDATE, ROUTE, REPORT, HEALTH, REFLECTION];
const ROLES: &[(&str, Option<&str>)] = &[
    ("reader", None),
    ("writer", Some(UPDATE)),
    ("router", Some(ROUTE)),
    ("reporter", Some(REPORT)),
];

/// grpc.reflection.v1alpha.ServerReflectionRequest with only
/// `list_services` (field 7): the crate has no reflection stubs, and only
/// the call's status matters here.
#[derive(Clone, PartialEq, prost::Message)]
struct ListServices {
    #[prost(string, tag = "7")]
    list_services: String,
}

/// Any response: prost skips the fields it does not know.
#[derive(Clone, PartialEq, prost::Message)]
struct AnyResponse {}

/// One call of `method` with a request it answers at once when allowed (an
/// unknown id, an empty stream); its status, OK included.
async fn call(channel: &Channel, method: &str) -> Result<(), Status> {
    let connections = || ConnectionServiceClient::new(channel.clone());
    match method {
        GET => connections()
            .get_connection(GetConnectionRequest {
                id: new_id(),
                ..Default::default()
            })
            .await
            .map(drop),
        LIST => connections()
            .list_connections(ListConnectionsRequest {
                page_size: 1,
                ..Default::default()
            })
            .await
            .map(drop),
        WATCH => {
            // Matching nothing, it still answers at once (the end of the
            // initial events): any first response proves it was let through.
            let request = WatchConnectionsRequest {
                filter: Some(ConnectionFilter {
                    client_id: new_id(),
                    ..Default::default()
                }),
                send_initial_events: true,
                allow_bookmarks: true,
                ..Default::default()
            };
            let first = async {
                let mut stream = connections().watch_connections(request).await?.into_inner();
                stream.message().await.map(drop)
            };
            tokio::time::timeout(Duration::from_secs(3), first)
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("no first watch response")))
        }
        UPDATE => connections()
            .update_server_connection(UpdateServerConnectionRequest {
                id: new_id(),
                address: Some(addr("authz.example", 443)),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["address".into()],
                }),
                ..Default::default()
            })
            .await
            .map(drop),
        ROUTE => {
            let empty = tokio_stream::iter(Vec::<RouteRequest>::new());
            let mut stream = RouterServiceClient::new(channel.clone())
                .route(empty)
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }
        REPORT => {
            let empty = tokio_stream::iter(Vec::<ReportRequest>::new());
            let mut stream = ReportServiceClient::new(channel.clone())
                .report(empty)
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }
        HEALTH => HealthClient::new(channel.clone())
            .check(HealthCheckRequest::default())
            .await
            .map(drop),
        REFLECTION => {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let request = tokio_stream::iter(vec![ListServices {
                list_services: "*".into(),
            }]);
            let mut stream = grpc
                .streaming(
                    tonic::Request::new(request),
                    PathAndQuery::from_static(REFLECTION),
                    tonic_prost::ProstCodec::<ListServices, AnyResponse>::default(),
                )
                .await?
                .into_inner();
            while stream.message().await?.is_some() {}
            Ok(())
        }
        _ => unreachable!("no call for {method}"),
    }
}

/// What is wrong with a call's outcome, or None. A denial must be
/// PERMISSION_DENIED with ErrorInfo {connmeta.v1, PERMISSION_DENIED,
/// method}; an allowed call may end any other way but PERMISSION_DENIED or
/// UNAUTHENTICATED (NOT_FOUND for an unknown id is a call let through).
fn judge(method: &str, allowed: bool, result: &Result<(), Status>) -> Option<String> {
    let status = match result {
        Ok(()) if allowed => return None,
        Ok(()) => return Some("succeeded, want PERMISSION_DENIED".into()),
        Err(s) => s,
    };
    let denied = matches!(
        status.code(),
        Code::PermissionDenied | Code::Unauthenticated
    );
    if allowed {
        return denied.then(|| format!("denied ({status:?}), the policy allows it"));
    }
    if status.code() != Code::PermissionDenied {
        return Some(format!("ended {status:?}, want PERMISSION_DENIED"));
    }
    let d = ErrorDetails::from_status(status);
    let Some(info) = d.error_info else {
        return Some(format!("PERMISSION_DENIED without ErrorInfo: {status:?}"));
    };
    let named = info.metadata.get(meta::METHOD).map(String::as_str);
    if info.domain != connmeta::DOMAIN
        || info.reason != reason::PERMISSION_DENIED
        || named != Some(method)
    {
        return Some(format!(
            "ErrorInfo {info:?}, want domain {}, reason {}, metadata method={method}",
            connmeta::DOMAIN,
            reason::PERMISSION_DENIED
        ));
    }
    None
}

pub async fn authz_roles(e: &mut Env) -> R {
    if e.roles_dir.is_empty() {
        return Err(
            "case authz_roles needs --roles-dir DIR (ca.pem, <role>.pem, <role>.key)".into(),
        );
    }
    let dir = Path::new(&e.roles_dir);
    let ca = dir.join("ca.pem");
    let opts = |identity: Option<&str>| ConnectOptions {
        tls: Some(TlsConfig {
            ca: ca.clone(),
            identity: identity
                .map(|r| (dir.join(format!("{r}.pem")), dir.join(format!("{r}.key")))),
            server_name: None,
        }),
        ..Default::default()
    };
    let mut failures = Vec::new();
    for (role, extra) in ROLES {
        let channel = connmeta::connect_channel(&e.target, &opts(Some(role)))
            .await
            .map_err(|err| format!("{role}: {err}"))?;
        for method in METHODS {
            let allowed = READ.contains(method) || *extra == Some(*method);
            let result = call(&channel, method).await;
            if let Some(why) = judge(method, allowed, &result) {
                failures.push(format!("{role} {method}: {why}"));
            }
        }
    }
    // The Unix socket is not subject to the policy: a write there is let through.
    if !e.unix_target.is_empty() {
        let channel = connmeta::connect_channel(&e.unix_target, &ConnectOptions::default())
            .await
            .map_err(|err| err.to_string())?;
        if let Some(why) = judge(UPDATE, true, &call(&channel, UPDATE).await) {
            failures.push(format!("unix socket {UPDATE}: {why}"));
        }
    }
    // No client certificate: the handshake fails, no method is reached.
    // With TLS 1.3 the client finishes its side of the handshake before the
    // server checks the certificate, so tonic's eager connect may succeed
    // and the refusal shows on the first call: UNAVAILABLE, or (hyper's
    // "connection closed") CANCELLED made from the transport error. Either
    // way a status with a transport error as its source, not an answer.
    match connmeta::connect_channel(&e.target, &opts(None)).await {
        Err(_) => {}
        Ok(channel) => match call(&channel, GET).await {
            Err(s)
                if s.code() == Code::Unavailable
                    || std::error::Error::source(&s)
                        .is_some_and(|e| e.is::<tonic::transport::Error>()) => {}
            other => failures.push(format!(
                "no client certificate: GetConnection {other:?}, want UNAVAILABLE (handshake refused)"
            )),
        },
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n  "))
    }
}
