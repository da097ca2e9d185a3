//! The Kubernetes manifests in `deploy/` stay consistent with the agent: every policy in the
//! ConfigMap loads and compiles, and the DaemonSet reads the policies where it mounts them.

use std::path::Path;

use limiter_agent::policy;
use serde_json::Value;

fn documents() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/daemonset.yaml readable");
    text.split("\n---\n").map(|doc| serde_saphyr::from_str(doc).expect("manifest document is YAML")).collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in deploy/daemonset.yaml"))
}

#[test]
fn configmap_policies_load_and_compile() {
    let docs = documents();
    let data = of_kind(&docs, "ConfigMap")["data"].as_object().expect("ConfigMap data");
    assert!(!data.is_empty());
    for (key, text) in data {
        let text = text.as_str().expect("ConfigMap values are strings");
        let file = Path::new("deploy/daemonset.yaml").join(key);
        let policies = policy::load_str(&file, text).unwrap_or_else(|e| panic!("{key}:\n{e}"));
        let set = policy::PolicySet { policies, ..Default::default() };
        let compiled = policy::compile(&set);
        assert!(!compiled.plan.rules.is_empty(), "{key}: no kernel rule");
        assert!(!compiled.plan.allow.is_empty(), "{key}: a node shield must allow-list the cluster networks");
    }
}

#[test]
fn daemonset_reads_the_mounted_policies() {
    let docs = documents();
    let pod = &of_kind(&docs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true, "XDP attaches to the node's interface");
    let agent = &pod["containers"][0];
    let args: Vec<&str> = agent["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let policy_dir = args.iter().find_map(|a| a.strip_prefix("--policy=")).expect("--policy=DIR");
    let mounts = agent["volumeMounts"].as_array().unwrap();
    let mount = mounts.iter().find(|m| m["mountPath"] == policy_dir).expect("the policy dir is a mount");
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    let configmap = of_kind(&docs, "ConfigMap");
    assert_eq!(volume["configMap"]["name"], configmap["metadata"]["name"]);
    assert_eq!(args.first(), Some(&"run"));

    // Every flag is one `run` accepts, and the probe checks the port the service listens on.
    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        args: limiter_agent::cli::run::RunArgs,
    }
    let argv = std::iter::once("limiter-agent".to_owned())
        .chain(args.iter().skip(1).map(|a| a.replace("$(HOST_IP)", "10.0.0.5")));
    let run = <Run as clap::Parser>::try_parse_from(argv).unwrap_or_else(|e| panic!("the DaemonSet's args: {e}"));
    assert_eq!(run.args.rls.rls_listen, "10.0.0.5:8081".parse().unwrap());
    assert_eq!(agent["readinessProbe"]["grpc"]["port"], 8081);
    let env = agent["env"].as_array().unwrap();
    assert!(env.iter().any(|e| e["name"] == "HOST_IP" && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"));
}
