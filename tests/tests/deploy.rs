//! The deployment files: the Helm chart renders exactly the reviewed plain manifest, with the
//! least privilege the README promises.
//!
//! No Helm binary can be installed here, so the chart is rendered by the small renderer below,
//! which knows only what the chart may use: value references (`.Values.*`, `.Release.Name`,
//! `.Release.Namespace`, `.Chart.Name`), `quote`, `toYaml` and `nindent`, and whitespace
//! trimming. Anything else in a template fails this test, which keeps the chart inside that
//! subset (whose meaning is the same in Helm).
use std::path::{Path, PathBuf};

use serde_yaml::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn lookup<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| {
        v.get(*k)
            .unwrap_or_else(|| panic!("no value at {path:?} (missing {k:?})"))
    })
}

struct Context {
    values: Value,
    chart: Value,
    release: (String, String),
}

impl Context {
    fn value(&self, reference: &str) -> Value {
        let parts: Vec<&str> = reference.trim_start_matches('.').split('.').collect();
        match parts.as_slice() {
            ["Values", rest @ ..] => lookup(&self.values, rest).clone(),
            ["Release", "Name"] => Value::String(self.release.0.clone()),
            ["Release", "Namespace"] => Value::String(self.release.1.clone()),
            ["Chart", "Name"] => lookup(&self.chart, &["name"]).clone(),
            _ => panic!("unsupported reference {reference:?}"),
        }
    }

    fn eval(&self, action: &str) -> String {
        let mut stages = action.split('|').map(str::trim);
        let head: Vec<&str> = stages
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let mut out = match head.as_slice() {
            ["toYaml", reference] => serde_yaml::to_string(&self.value(reference))
                .unwrap()
                .trim_end()
                .to_string(),
            [reference] if reference.starts_with('.') => match self.value(reference) {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => panic!("{reference} is not a scalar: {other:?}"),
            },
            _ => panic!("unsupported action {action:?}"),
        };
        for stage in stages {
            match stage.split_whitespace().collect::<Vec<_>>().as_slice() {
                // Go's %q and JSON agree on the escapes YAML double quotes understand.
                ["quote"] => out = serde_json::to_string(&out).unwrap(),
                ["nindent", n] => {
                    let pad = " ".repeat(n.parse().expect("nindent width"));
                    out = out.lines().map(|l| format!("\n{pad}{l}")).collect();
                }
                _ => panic!("unsupported function {stage:?} in {action:?}"),
            }
        }
        out
    }

    fn render(&self, template: &str) -> String {
        let mut out = String::new();
        let mut rest = template;
        while let Some(at) = rest.find("{{") {
            let (before, after) = rest.split_at(at);
            let after = &after[2..];
            let end = after.find("}}").expect("unclosed action");
            let action = &after[..end];
            out.push_str(if action.starts_with('-') {
                before.trim_end()
            } else {
                before
            });
            out.push_str(&self.eval(action.trim_start_matches('-').trim_end_matches('-').trim()));
            rest = &after[end + 2..];
            if action.ends_with('-') {
                rest = rest.trim_start();
            }
        }
        out.push_str(rest);
        out
    }
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn key(doc: &Value) -> (String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (s(&doc["kind"]), s(&doc["metadata"]["name"]))
}

fn render_chart(values_override: Option<&str>) -> Vec<Value> {
    let chart_dir = root().join("deploy/helm/kspan");
    let read = |p: &str| std::fs::read_to_string(chart_dir.join(p)).unwrap();
    let mut values: Value = serde_yaml::from_str(&read("values.yaml")).unwrap();
    if let Some(extra) = values_override {
        // Helm merges maps key by key.
        fn merge(into: &mut Value, from: &Value) {
            match (into, from) {
                (Value::Mapping(a), Value::Mapping(b)) => {
                    for (k, v) in b {
                        match a.get_mut(k) {
                            Some(slot) => merge(slot, v),
                            None => {
                                a.insert(k.clone(), v.clone());
                            }
                        }
                    }
                }
                (slot, v) => *slot = v.clone(),
            }
        }
        merge(&mut values, &serde_yaml::from_str(extra).unwrap());
    }
    let ctx = Context {
        values,
        chart: serde_yaml::from_str(&read("Chart.yaml")).unwrap(),
        release: ("kspan".into(), "kspan".into()),
    };
    let mut names: Vec<_> = std::fs::read_dir(chart_dir.join("templates"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
        .iter()
        .flat_map(|n| documents(&ctx.render(&read(&format!("templates/{n}")))))
        .collect()
}

#[test]
fn chart_renders_the_plain_manifest() {
    let manifest =
        documents(&std::fs::read_to_string(root().join("deploy/daemonset.yaml")).unwrap());
    let mut expected: Vec<&Value> = manifest
        .iter()
        .filter(|d| d["kind"] != "Namespace") // Helm installs into an existing namespace.
        .collect();
    let mut rendered = render_chart(None);
    expected.sort_by_key(|d| key(d));
    rendered.sort_by_key(key);
    assert_eq!(
        expected.iter().map(|d| key(d)).collect::<Vec<_>>(),
        rendered.iter().map(key).collect::<Vec<_>>()
    );
    for (want, got) in expected.iter().zip(&rendered) {
        assert_eq!(*want, got, "{:?} differs", key(got));
    }
}

#[test]
fn chart_values_reach_the_objects() {
    let docs = render_chart(Some(
        "image: {tag: \"9.9.9\"}\notlp: {endpoint: \"http://collector:4318\", protocol: \"http/protobuf\"}\nconfig: |\n  capture-header = [\"x-tenant\"]\n",
    ));
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "kspan:9.9.9");
    let env = |name: &str| {
        c["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    assert_eq!(
        env("OTEL_EXPORTER_OTLP_ENDPOINT"),
        Some("http://collector:4318".into())
    );
    assert_eq!(
        env("OTEL_EXPORTER_OTLP_PROTOCOL"),
        Some("http/protobuf".into())
    );
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    assert_eq!(
        cm["data"]["kspan.toml"],
        "capture-header = [\"x-tenant\"]\n"
    );
}

#[test]
fn manifest_asks_for_least_privilege() {
    let docs = documents(&std::fs::read_to_string(root().join("deploy/daemonset.yaml")).unwrap());
    let role = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let rules: Value = serde_yaml::from_str(
        "- apiGroups: [\"\"]\n  resources: [\"pods\"]\n  verbs: [\"get\", \"list\", \"watch\"]\n",
    )
    .unwrap();
    assert_eq!(role["rules"], rules, "read pods, nothing else");
    assert!(
        docs.iter()
            .all(|d| d["kind"] != "Role" && d["kind"] != "Secret")
    );
    let pod = &docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap()["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert!(pod["hostNetwork"].is_null(), "no host network");
    let sc = &pod["containers"][0]["securityContext"];
    assert!(sc["privileged"].is_null(), "not privileged");
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    let added: Vec<&str> = sc["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(added, ["BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE"]);
    for m in pod["containers"][0]["volumeMounts"].as_sequence().unwrap() {
        assert_eq!(m["readOnly"], true, "{m:?}");
    }
    // The config file the ConfigMap provides is one the agent accepts.
    let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let toml = cm["data"]["kspan.toml"].as_str().unwrap();
    let dir = std::env::temp_dir().join(format!("kspan-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kspan.toml"), toml).unwrap();
    let out = std::process::Command::new(kspan_tests::kspan_bin())
        .arg("--config")
        .arg(dir.join("kspan.toml"))
        .arg("--print-config")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
