//! informer_converges: the reflector (connmeta::reflector) against churn,
//! compaction and a sidecar restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connmeta::reflector::Change;
use connmeta::v1::{
    ConnectionFilter, ConnectionKind, ConnectionRecord, ConnectionState, ListConnectionsRequest,
};
use connmeta::{RelistCause, WatchOptions};
use futures_util::StreamExt;
use tokio::net::{TcpListener, TcpStream};

use crate::Env;
use crate::proxy::{Proxy, client_snapshot, new_id, server_snapshot};
use crate::restart::restart_server;

type R = Result<(), String>;
const OPEN: ConnectionState = ConnectionState::Open;
const WAIT: Duration = Duration::from_secs(8);

/// What the reflector's changes did to a model of the handlers' view.
#[derive(Default)]
struct Seen {
    model: HashMap<String, ConnectionRecord>,
    changes: Vec<Change>,
    /// The first change that did not fit the model (an Added of a known id,
    /// an Updated whose old is not what was held, a Deleted of an unknown).
    wrong: Option<String>,
}

impl Seen {
    fn apply(&mut self, change: Change) {
        let problem = match &change {
            Change::Added(r) => self
                .model
                .insert(r.id().to_owned(), (**r).clone())
                .map(|_| format!("Added {} which the handlers already held", r.id())),
            Change::Updated { old, new } => {
                match self.model.insert(new.id().to_owned(), (**new).clone()) {
                    Some(held) if held == **old => None,
                    held => Some(format!(
                        "Updated {} with old {old:?}, the handlers held {held:?}",
                        new.id()
                    )),
                }
            }
            Change::Deleted(r) => match self.model.remove(r.id()) {
                Some(_) => None,
                None => Some(format!(
                    "Deleted {} which the handlers did not hold",
                    r.id()
                )),
            },
            Change::Synced { .. } => None,
        };
        if self.wrong.is_none() {
            self.wrong = problem;
        }
        self.changes.push(change);
    }
}

/// The changes after index `from` as sorted "+id", "~id", "-id", "synced
/// Cause" (ids named by `name`).
fn summary(changes: &[Change], name: &HashMap<String, String>) -> Vec<String> {
    let n = |r: &ConnectionRecord| {
        name.get(r.id())
            .cloned()
            .unwrap_or_else(|| r.id().to_owned())
    };
    let mut out: Vec<String> = changes
        .iter()
        .map(|c| match c {
            Change::Added(r) => format!("+{}", n(r)),
            Change::Updated { new, .. } => format!("~{}", n(new)),
            Change::Deleted(r) => format!("-{}", n(r)),
            Change::Synced { cause, .. } => format!("synced {cause:?}"),
        })
        .collect();
    out.sort();
    out
}

/// A TCP relay to the server that can cut every connection and refuse new
/// ones: the reflector's watch is then away while the history moves on.
struct Relay {
    addr: String,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start(upstream: &str) -> Result<Relay, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("relay: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| e.to_string())?
            .to_string();
        let open = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (up, o, c) = (upstream.to_owned(), open.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection fail
                }
                let up = up.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect(&up).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut upstream).await;
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Ok(Relay { addr, open, conns })
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn reopen(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

pub async fn informer_converges(e: &mut Env) -> R {
    let client_id = new_id();
    // Servers of this client under *.in.test: moving one elsewhere takes it
    // out of the filter, which is a deletion for the informer.
    let filter = ConnectionFilter {
        kind: ConnectionKind::Server as i32,
        host: "*.in.test".into(),
        client_id: client_id.clone(),
        ..Default::default()
    };
    let ids: Vec<String> = (0..12).map(|_| new_id()).collect();
    let name: HashMap<String, String> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), format!("s{i}")))
        .collect();
    let server =
        |i: usize, host: &str, port: u32| server_snapshot(&ids[i], &client_id, OPEN, host, port);
    let inside = |i: usize| format!("s{i}.in.test");

    e.proxy.report(vec![client_snapshot(&client_id)]).await?;
    e.proxy
        .report((0..6).map(|i| server(i, &inside(i), 443)).collect())
        .await?;

    // The informer, through the relay, its changes applied to the model.
    let relay = Relay::start(&e.target).await?;
    let reflector_client = e.connect(&relay.addr).await?;
    let opts = WatchOptions {
        filter: Some(filter.clone()),
        ..Default::default()
    };
    let (store, mut changes) = reflector_client.reflect(opts.clone());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(change) = changes.next().await {
            // Errors are retried by the watcher; a wrong state shows below.
            if let Ok(change) = change {
                shared.lock().unwrap().apply(change);
            }
        }
    });
    let _stop = AbortOnDrop(task.abort_handle());
    tokio::time::timeout(WAIT, store.wait_until_ready())
        .await
        .map_err(|_| format!("the store was not ready within {WAIT:?}"))?
        .map_err(|e| e.to_string())?;

    let list_req = ListConnectionsRequest {
        filter: Some(filter.clone()),
        view: opts.view as i32,
        ..Default::default()
    };
    // Until the store, the handlers' model and a fresh listing agree.
    let converged = |what: &'static str| {
        let (store, seen, client, req) = (
            store.clone(),
            seen.clone(),
            e.client.clone(),
            list_req.clone(),
        );
        let name = name.clone();
        async move {
            let until = Instant::now() + WAIT;
            loop {
                let listed = client.list_all(req.clone()).await.map(|(r, _)| r);
                let in_store: Vec<ConnectionRecord> =
                    store.state().iter().map(|r| (**r).clone()).collect();
                let (wrong, mut model, n) = {
                    let seen = seen.lock().unwrap();
                    let model: Vec<_> = seen.model.values().cloned().collect();
                    (seen.wrong.clone(), model, seen.changes.len())
                };
                if let Some(wrong) = wrong {
                    return Err(format!("{what}: a handler call does not fit: {wrong}"));
                }
                model.sort_by(|a, b| a.id().cmp(b.id()));
                if let Ok(listed) = &listed
                    && *listed == in_store
                    && *listed == model
                {
                    return Ok(n);
                }
                if Instant::now() > until {
                    return Err(format!(
                        "{what}: not converged within {WAIT:?}: listing {:?}, store {:?}, handlers {:?}",
                        listed.map(|l| l
                            .iter()
                            .map(|r| name.get(r.id()).cloned())
                            .collect::<Vec<_>>()),
                        in_store
                            .iter()
                            .map(|r| name.get(r.id()).cloned())
                            .collect::<Vec<_>>(),
                        model
                            .iter()
                            .map(|r| name.get(r.id()).cloned())
                            .collect::<Vec<_>>(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let mut mark = converged("after the first listing").await?;
    let check_phase = |from: usize, want: &[&str], what: &str| -> R {
        let seen = seen.lock().unwrap();
        let got = summary(&seen.changes[from..], &name);
        let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
        want.sort();
        if got != want {
            return Err(format!("{what}: handler calls {got:?}, want {want:?}"));
        }
        Ok(())
    };
    check_phase(
        0,
        &["+s0", "+s1", "+s2", "+s3", "+s4", "+s5", "synced Start"],
        "first listing",
    )?;

    // 1. Live churn: creates, a change, two deletions.
    let mut batch: Vec<_> = (6..10).map(|i| server(i, &inside(i), 443)).collect();
    batch.push(server(1, &inside(1), 8443));
    batch.push(server(2, "s2.out.test", 443));
    batch.push(server(3, "s3.out.test", 443));
    e.proxy.report(batch).await?;
    let next = converged("after the churn").await?;
    check_phase(
        mark,
        &["+s6", "+s7", "+s8", "+s9", "~s1", "-s2", "-s3"],
        "churn",
    )?;
    mark = next;

    // 2. Compaction: the watch is away while more than the history (64)
    // changes happen, a deletion among them.
    relay.cut();
    e.proxy
        .report(vec![
            server(4, "s4.out.test", 443),
            server(10, &inside(10), 443),
            server(5, &inside(5), 9443),
        ])
        .await?;
    let filler = new_id();
    for port in 0..70 {
        e.proxy
            .report(vec![server_snapshot(
                &filler,
                &client_id,
                OPEN,
                "filler.test",
                1000 + port,
            )])
            .await?;
    }
    relay.reopen();
    let next = converged("after the compaction").await?;
    check_phase(
        mark,
        &["-s4", "+s10", "~s5", "synced Compacted"],
        "compaction",
    )?;
    mark = next;

    // 3. A sidecar restart (kill -9, a new empty store): the proxy reports
    // what is still there; everything else vanished.
    let before: HashMap<String, ConnectionRecord> = seen.lock().unwrap().model.clone();
    restart_server().await?;
    let until = Instant::now() + WAIT;
    while e.client.current_revision().await.is_err() {
        if Instant::now() > until {
            return Err("the restarted server is not reachable".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut proxy = Proxy::new(&e.client);
    proxy.report(vec![client_snapshot(&client_id)]).await?;
    proxy
        .report(vec![
            server(0, &inside(0), 443),
            server(1, &inside(1), 7443),
            server(11, &inside(11), 443),
        ])
        .await?;
    converged("after the restart").await?;
    let seen = seen.lock().unwrap();
    let after = &seen.changes[mark..];
    if !after.iter().any(|c| {
        matches!(
            c,
            Change::Synced {
                cause: RelistCause::Restarted,
                ..
            }
        )
    }) {
        return Err(format!(
            "after the restart: no relist with cause Restarted among {:?}",
            summary(after, &name)
        ));
    }
    for (id, held) in &before {
        if [&ids[0], &ids[1]].contains(&id) {
            continue;
        }
        let deleted = after
            .iter()
            .any(|c| matches!(c, Change::Deleted(r) if r.id() == id && **r == *held));
        if !deleted {
            return Err(format!(
                "after the restart: {} vanished but no Deleted with the version held before came ({:?})",
                name[id],
                summary(after, &name)
            ));
        }
    }
    Ok(())
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
