//! Kubernetes metadata for the processes on this node: a watch on this node's pods (the only
//! API access kspan needs), indexed by pod UID, which each process's cgroup names.
//!
//! Spans' resources get `k8s.pod.name`, `k8s.namespace.name`, `k8s.node.name`,
//! `k8s.container.name` and the workload (`k8s.deployment.name`, `k8s.statefulset.name`, …).
//! A process without `OTEL_SERVICE_NAME` is named as the OpenTelemetry conventions suggest for
//! Kubernetes: the pod's `resource.opentelemetry.io/service.name` annotation, else its
//! `app.kubernetes.io/name` label, else its workload, else its container, else the pod.
use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt as _, watcher};
use rustc_hash::FxHashMap as HashMap;

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "Kubernetes metadata needs the node's name (--node-name or KSPAN_NODE_NAME, from the downward API's spec.nodeName)"
    )]
    NoNodeName,
    #[error("bad --kube-api-url {0:?}: expected an http:// or https:// URL")]
    Url(String),
    #[error("could not set up the Kubernetes client: {0}")]
    Client(String),
}

/// What spans need to know about one pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodMeta {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    /// Workload as (resource attribute, name), outermost known owner first.
    pub workloads: Vec<(&'static str, String)>,
    /// `resource.opentelemetry.io/service.name` annotation, else `app.kubernetes.io/name`.
    pub service_label: Option<String>,
    /// Container id (runtime prefix stripped) → container name.
    pub containers: Vec<(String, String)>,
}

impl PodMeta {
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let md = &pod.metadata;
        let empty = BTreeMap::new();
        let labels = md.labels.as_ref().unwrap_or(&empty);
        let annotations = md.annotations.as_ref().unwrap_or(&empty);
        let mut workloads = Vec::new();
        for owner in md.owner_references.iter().flatten() {
            match owner.kind.as_str() {
                "ReplicaSet" => {
                    // A Deployment's ReplicaSet is named <deployment>-<pod-template-hash>.
                    let deployment = labels
                        .get("pod-template-hash")
                        .and_then(|h| owner.name.strip_suffix(&format!("-{h}")));
                    if let Some(d) = deployment {
                        workloads.push(("k8s.deployment.name", d.to_string()));
                    }
                    workloads.push(("k8s.replicaset.name", owner.name.clone()));
                }
                "StatefulSet" => workloads.push(("k8s.statefulset.name", owner.name.clone())),
                "DaemonSet" => workloads.push(("k8s.daemonset.name", owner.name.clone())),
                "Job" => workloads.push(("k8s.job.name", owner.name.clone())),
                _ => {}
            }
        }
        let containers = pod
            .status
            .iter()
            .flat_map(|s| {
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(s.init_container_statuses.iter().flatten())
            })
            .filter_map(|c| {
                // "containerd://<id>", "cri-o://<id>", "docker://<id>".
                let id = c.container_id.as_deref()?.rsplit("://").next()?;
                Some((id.to_ascii_lowercase(), c.name.clone()))
            })
            .collect();
        Some(Self {
            uid: md.uid.clone()?,
            name: md.name.clone()?,
            namespace: md.namespace.clone().unwrap_or_default(),
            node: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            workloads,
            service_label: annotations
                .get("resource.opentelemetry.io/service.name")
                .or_else(|| labels.get("app.kubernetes.io/name"))
                .cloned(),
            containers,
        })
    }

    pub fn container_name(&self, container_id: Option<&str>) -> Option<&str> {
        let id = container_id?;
        self.containers
            .iter()
            .find(|(c, _)| c == id)
            .map(|(_, n)| n.as_str())
    }

    /// The service name of a process in this pod that names none itself.
    pub fn service_name(&self, container_id: Option<&str>) -> String {
        self.service_label
            .clone()
            .or_else(|| self.workloads.first().map(|(_, n)| n.clone()))
            .or_else(|| self.container_name(container_id).map(str::to_string))
            .unwrap_or_else(|| self.name.clone())
    }
}

/// This node's pods by UID, shared between the watch task and the pipeline.
#[derive(Default)]
pub struct PodIndex {
    pods: RwLock<HashMap<String, Arc<PodMeta>>>,
    /// The first full list has arrived.
    pub synced: std::sync::atomic::AtomicBool,
    pub watch_errors: std::sync::atomic::AtomicU64,
}

impl PodIndex {
    pub fn get(&self, uid: &str) -> Option<Arc<PodMeta>> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.pods.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn upsert(&self, pod: &Pod) {
        if let Some(meta) = PodMeta::from_pod(pod) {
            self.pods
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(meta.uid.clone(), Arc::new(meta));
        }
    }

    fn remove(&self, pod: &Pod) {
        if let Some(uid) = &pod.metadata.uid {
            self.pods
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(uid);
        }
    }

    fn replace(&self, pods: HashMap<String, Arc<PodMeta>>) {
        *self.pods.write().unwrap_or_else(|e| e.into_inner()) = pods;
    }
}

/// How to reach the API server.
pub enum ApiServer {
    /// In-cluster: the service account's token and CA, `KUBERNETES_SERVICE_HOST`.
    InCluster,
    /// An explicit URL, e.g. `kubectl proxy`'s `http://127.0.0.1:8001`.
    Url(String),
}

/// Builds the client; must run inside the tokio runtime.
pub fn client(api: &ApiServer) -> Result<kube::Client, K8sError> {
    let config = match api {
        ApiServer::InCluster => {
            kube::Config::incluster().map_err(|e| K8sError::Client(e.to_string()))?
        }
        ApiServer::Url(url) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(K8sError::Url(url.clone()));
            }
            kube::Config::new(url.parse().map_err(|_| K8sError::Url(url.clone()))?)
        }
    };
    kube::Client::try_from(config).map_err(|e| K8sError::Client(e.to_string()))
}

/// Keeps `index` in step with the pods of `node` until the task is dropped. API errors are
/// retried with backoff and counted; the index keeps what it had meanwhile.
pub async fn watch(client: kube::Client, node: String, index: Arc<PodIndex>) {
    use std::sync::atomic::Ordering::Relaxed;
    let api: kube::Api<Pod> = kube::Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    // A relist is gathered apart and swapped in whole, so lookups never see a half list.
    let mut relist: Option<HashMap<String, Arc<PodMeta>>> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => relist = Some(HashMap::default()),
            Ok(watcher::Event::InitApply(pod)) => {
                if let (Some(r), Some(meta)) = (relist.as_mut(), PodMeta::from_pod(&pod)) {
                    r.insert(meta.uid.clone(), Arc::new(meta));
                }
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(r) = relist.take() {
                    index.replace(r);
                }
                index.synced.store(true, Relaxed);
            }
            Ok(watcher::Event::Apply(pod)) => index.upsert(&pod),
            Ok(watcher::Event::Delete(pod)) => index.remove(&pod),
            Err(e) => {
                index.watch_errors.fetch_add(1, Relaxed);
                log::warn!("watching this node's pods: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn workloads_and_service_names() {
        let p = pod(serde_json::json!({
            "metadata": {
                "name": "checkout-7d9f8b6c5-x2x9z", "namespace": "shop", "uid": "u1",
                "labels": {"pod-template-hash": "7d9f8b6c5"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "checkout-7d9f8b6c5", "uid": "rs1"}]
            },
            "spec": {"nodeName": "node-a", "containers": []},
            "status": {"containerStatuses": [{"name": "app", "containerID": "containerd://ABC123",
                "image": "", "imageID": "", "ready": true, "restartCount": 0}]}
        }));
        let m = PodMeta::from_pod(&p).unwrap();
        assert_eq!(
            m.workloads,
            [
                ("k8s.deployment.name", "checkout".to_string()),
                ("k8s.replicaset.name", "checkout-7d9f8b6c5".to_string())
            ]
        );
        assert_eq!((m.node.as_str(), m.namespace.as_str()), ("node-a", "shop"));
        assert_eq!(m.container_name(Some("abc123")), Some("app"));
        assert_eq!(m.service_name(Some("abc123")), "checkout");

        let mut labelled = m.clone();
        labelled.service_label = Some("cart".into());
        assert_eq!(labelled.service_name(None), "cart");
        let bare = PodMeta {
            workloads: vec![],
            ..m.clone()
        };
        assert_eq!(bare.service_name(Some("abc123")), "app");
        assert_eq!(bare.service_name(Some("other")), "checkout-7d9f8b6c5-x2x9z");

        let annotated = pod(serde_json::json!({
            "metadata": {"name": "db-0", "uid": "u2",
                "labels": {"app.kubernetes.io/name": "postgres"},
                "annotations": {"resource.opentelemetry.io/service.name": "orders-db"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "s"}]}
        }));
        let m = PodMeta::from_pod(&annotated).unwrap();
        assert_eq!(m.service_name(None), "orders-db", "annotation first");
        assert_eq!(m.workloads, [("k8s.statefulset.name", "db".to_string())]);
        assert!(PodMeta::from_pod(&pod(serde_json::json!({"metadata": {"name": "x"}}))).is_none());
    }
}
