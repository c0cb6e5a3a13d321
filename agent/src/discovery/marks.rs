//! The other side of [`CAPTURED_ANNOTATION`]: Kubernetes discovery reads it on other nodes'
//! pods; this agent writes it on its own, so that agents elsewhere tunnel to them only once they
//! are captured here.

use std::{collections::BTreeSet, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use tokio::sync::watch;

use super::kube::CAPTURED_ANNOTATION;

/// Keeps [`CAPTURED_ANNOTATION`] on exactly the local pods the agent has captured. The agent
/// says which after every change; a task patches the difference and retries what failed.
pub struct CaptureMarks {
    /// `None` until the agent has captured what it will: a new agent taking over from another
    /// leaves the marks alone until then.
    wanted: watch::Sender<Option<BTreeSet<(String, String)>>>,
    /// How many pods carry a mark now.
    marked: watch::Receiver<usize>,
}

impl CaptureMarks {
    /// How long failed patches wait before they are tried again, doubling up to `MAX_RETRY`.
    const RETRY: Duration = Duration::from_secs(2);
    const MAX_RETRY: Duration = Duration::from_secs(60);

    pub fn start(client: Client, node: &str) -> CaptureMarks {
        let (wanted, wanted_rx) = watch::channel(None);
        let (marked_tx, marked) = watch::channel(0);
        tokio::spawn(keep_capture_marks(client, node.to_owned(), wanted_rx, marked_tx));
        CaptureMarks { wanted, marked }
    }

    /// The local pods (namespace, name) captured now.
    pub fn set(&self, captured: BTreeSet<(String, String)>) {
        self.wanted.send_if_modified(|wanted| {
            let modified = wanted.as_ref() != Some(&captured);
            *wanted = Some(captured);
            modified
        });
    }

    /// Removes every mark (the agent stops and detaches capture), waiting at most `within`.
    pub async fn clear(&self, within: Duration) {
        self.set(BTreeSet::new());
        let mut marked = self.marked.clone();
        if tokio::time::timeout(within, marked.wait_for(|n| *n == 0)).await.is_err() {
            let left = *marked.borrow();
            tracing::warn!(
                "{left} pods still marked captured after {within:?}: agents on other nodes tunnel to them until an agent here removes the marks"
            );
        }
    }
}

/// The task behind [`CaptureMarks`]: patches the marks towards what `wanted` says, retrying
/// failures with backoff, and reports how many pods are marked.
async fn keep_capture_marks(
    client: Client,
    node: String,
    mut wanted: watch::Receiver<Option<BTreeSet<(String, String)>>>,
    marked_count: watch::Sender<usize>,
) {
    // Marks a previous agent left on this node's pods: kept if still wanted, else removed.
    let pods: Api<Pod> = Api::all(client.clone());
    let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let mut marked: BTreeSet<(String, String)> = match pods.list_metadata(&on_node).await {
        Ok(list) => list
            .items
            .iter()
            .filter(|p| p.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(CAPTURED_ANNOTATION)))
            .filter_map(|p| Some((p.metadata.namespace.clone()?, p.metadata.name.clone()?)))
            .collect(),
        Err(e) => {
            tracing::warn!("listing this node's pods for their capture marks: {e}");
            BTreeSet::new()
        }
    };
    if wanted.wait_for(Option::is_some).await.is_err() {
        return;
    }
    let mut retry = CaptureMarks::RETRY;
    loop {
        let target = wanted.borrow_and_update().clone().unwrap_or_default();
        let to_mark = target.difference(&marked).map(|pod| (pod.clone(), true));
        let to_unmark = marked.difference(&target).map(|pod| (pod.clone(), false));
        let changes: Vec<_> = to_mark.chain(to_unmark).collect();
        let mut failed = Vec::new();
        for (pod, mark) in changes {
            match set_capture_mark(&client, &pod, mark).await {
                Ok(()) if mark => marked.insert(pod),
                Ok(()) => marked.remove(&pod),
                Err(e) => {
                    failed.push(format!("{}/{}: {e}", pod.0, pod.1));
                    continue;
                }
            };
        }
        marked_count.send_replace(marked.len());
        let next = if failed.is_empty() {
            retry = CaptureMarks::RETRY;
            wanted.changed().await
        } else {
            // One line per attempt, however many pods: an API server refusing every patch
            // (a ClusterRole without it) must not flood the log.
            tracing::warn!(
                "capture marks not set on {} pods, trying again in {retry:?}: {}",
                failed.len(),
                failed[0]
            );
            let next = tokio::time::timeout(retry, wanted.changed()).await.unwrap_or(Ok(()));
            retry = (retry * 2).min(CaptureMarks::MAX_RETRY);
            next
        };
        if next.is_err() {
            return;
        }
    }
}

/// Sets (or removes) [`CAPTURED_ANNOTATION`] on a pod; a pod gone needs neither.
async fn set_capture_mark(
    client: &Client,
    (namespace, name): &(String, String),
    mark: bool,
) -> kube::Result<()> {
    let value = if mark { serde_json::json!("true") } else { serde_json::Value::Null };
    let patch = serde_json::json!({"metadata": {"annotations": {CAPTURED_ANNOTATION: value}}});
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match pods.patch_metadata(name, &PatchParams::default(), &Patch::Merge(patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}
