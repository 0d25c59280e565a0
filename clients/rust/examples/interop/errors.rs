//! typed_errors: each variant of connmeta::Error against the status the
//! sidecar (or the client itself) gives.

use connmeta::v1::{ConnectionState, ConnectionView};
use connmeta::{Error, ServerUpdate, WatchOptions, Watcher, meta, reason};
use futures_util::TryStreamExt;
use tonic::Code;

use crate::Env;
use crate::proxy::{Proxy, addr, client_snapshot, new_id, server_snapshot};

type R = Result<(), String>;

/// Checks that `result` is the `variant` (by name) with this code and
/// ErrorInfo reason, and that it converts back to the same status.
fn expect<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, Error>,
    variant: fn(&Error) -> bool,
    want: &str,
    code: Code,
    reason: &str,
) -> Result<Error, String> {
    let err = match result {
        Ok(v) => return Err(format!("{what}: succeeded ({v:?}), want Error::{want}")),
        Err(e) => e,
    };
    if !variant(&err) || err.code() != code || !err.is_reason(reason) {
        return Err(format!(
            "{what}: got {err:?}, want Error::{want} with code {code:?} and ErrorInfo {reason}"
        ));
    }
    let status = tonic::Status::from(Error::from_details(err.details().unwrap().clone()));
    if status.code() != code || !connmeta::is_reason(&status, reason) {
        return Err(format!("{what}: back as a status: {status:?}"));
    }
    Ok(err)
}

pub async fn typed_errors(e: &mut Env) -> R {
    // The server runs with the example policy, under which the writer's
    // certificate may not report: the Unix socket may.
    let unix = e.connect(&e.unix_target).await?;
    let mut proxy = Proxy::new(&unix);
    let client_id = new_id();
    let (open_id, closed_id) = (new_id(), new_id());
    proxy
        .report(vec![
            client_snapshot(&client_id),
            server_snapshot(
                &open_id,
                &client_id,
                ConnectionState::Open,
                "open.example",
                443,
            ),
            server_snapshot(
                &closed_id,
                &client_id,
                ConnectionState::Closed,
                "closed.example",
                443,
            ),
        ])
        .await?;

    let c = &e.client;
    expect(
        "get of an unknown id",
        c.get_with_view(&new_id(), ConnectionView::Basic).await,
        |e| matches!(e, Error::NotFound(_)),
        "NotFound",
        Code::NotFound,
        reason::CONNECTION_NOT_FOUND,
    )?;

    let retarget = |id: &str, etag: &str, port: u32| ServerUpdate {
        id: id.to_owned(),
        etag: etag.to_owned(),
        actor: "interop-rust".into(),
        address: Some(addr("elsewhere.example", port)),
        ..Default::default()
    };
    let err = expect(
        "update of an OPEN server",
        c.update_server(retarget(&open_id, "", 8443)).await,
        |e| matches!(e, Error::ConnectionOpen(_)),
        "ConnectionOpen",
        Code::FailedPrecondition,
        reason::CONNECTION_OPEN,
    )?;
    if err
        .details()
        .unwrap()
        .precondition_violations()
        .next()
        .is_none()
    {
        return Err(format!(
            "CONNECTION_OPEN without PreconditionFailure: {err:?}"
        ));
    }

    let etag = c
        .get(&closed_id)
        .await
        .map_err(|e| format!("get: {e}"))?
        .metadata
        .unwrap_or_default()
        .etag;
    c.update_server(retarget(&closed_id, &etag, 8443))
        .await
        .map_err(|e| format!("update with the current etag: {e}"))?;
    expect(
        "update with the etag from before",
        c.update_server(retarget(&closed_id, &etag, 9443)).await,
        |e| matches!(e, Error::EtagMismatch(_)),
        "EtagMismatch",
        Code::Aborted,
        reason::ETAG_MISMATCH,
    )?;

    let current = c
        .current_revision()
        .await
        .map_err(|e| format!("list: {e}"))?;
    let mut watcher = Watcher::new(
        c.clone(),
        WatchOptions {
            start_after_revision: current,
            incarnation: "not-this-sidecar".into(),
            ..Default::default()
        },
    );
    expect(
        "watch resumed with another incarnation",
        watcher.try_next().await,
        |e| matches!(e, Error::Compacted(_)),
        "Compacted",
        Code::OutOfRange,
        reason::REVISION_COMPACTED,
    )?;

    let err = expect(
        "update to port 70000",
        c.update_server(retarget(&closed_id, "", 70000)).await,
        |e| matches!(e, Error::InvalidArgument(_)),
        "InvalidArgument",
        Code::InvalidArgument,
        reason::INVALID_ARGUMENT,
    )?;
    let fields: Vec<_> = err
        .details()
        .unwrap()
        .field_violations()
        .map(|(f, _)| f.to_owned())
        .collect();
    if !fields.iter().any(|f| f.starts_with("address.port")) {
        return Err(format!(
            "port 70000: field violations {fields:?}, want address.port"
        ));
    }
    // Made by the client, in the same shape: an update that names nothing.
    let nothing = ServerUpdate {
        id: closed_id.clone(),
        ..Default::default()
    };
    let err = expect(
        "update that changes nothing (client-made)",
        c.update_server(nothing).await,
        |e| matches!(e, Error::InvalidArgument(_)),
        "InvalidArgument",
        Code::InvalidArgument,
        reason::INVALID_ARGUMENT,
    )?;
    if !err
        .details()
        .unwrap()
        .field_violations()
        .any(|(f, _)| f == "update_mask")
    {
        return Err(format!(
            "client-made INVALID_ARGUMENT does not name update_mask: {err:?}"
        ));
    }

    // The reader's certificate may read, not update.
    let dir = std::path::Path::new(&e.roles_dir);
    let opts = connmeta::ConnectOptions {
        tls: Some(connmeta::TlsConfig::new(
            dir.join("ca.pem"),
            dir.join("reader.pem"),
            dir.join("reader.key"),
        )),
        ..e.opts.clone()
    };
    let reader = connmeta::connect_with(&e.target, &opts)
        .await
        .map_err(|e| format!("connect as reader: {e}"))?;
    let err = expect(
        "update as the reader",
        reader.update_server(retarget(&closed_id, "", 8443)).await,
        |e| matches!(e, Error::PermissionDenied(_)),
        "PermissionDenied",
        Code::PermissionDenied,
        reason::PERMISSION_DENIED,
    )?;
    let method = err
        .details()
        .unwrap()
        .metadata(meta::METHOD)
        .unwrap_or_default();
    if method != "/connmeta.v1.ConnectionService/UpdateServerConnection" {
        return Err(format!("PERMISSION_DENIED names method {method:?}"));
    }
    Ok(())
}
