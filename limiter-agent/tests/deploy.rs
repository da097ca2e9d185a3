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

/// The DaemonSet keeps the shield across pods: the node's bpffs is mounted where `--pin-dir`
/// points, a rollout takes one node at a time with no surge (one agent per pin directory and
/// host port), nothing on the way out detaches, and the pod has time to stop its servers.
#[test]
fn daemonset_pins_in_the_nodes_bpffs_and_rolls_without_detaching() {
    let docs = documents();
    let ds = of_kind(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = &pod["containers"][0];
    let args: Vec<&str> = agent["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        args: limiter_agent::cli::run::RunArgs,
    }
    let argv = std::iter::once("limiter-agent".to_owned())
        .chain(args.iter().skip(1).map(|a| a.replace("$(HOST_IP)", "10.0.0.5")));
    let run = <Run as clap::Parser>::try_parse_from(argv).unwrap_or_else(|e| panic!("the DaemonSet's args: {e}"));
    assert!(!run.args.detach_on_exit, "a pod that exits must leave the shield pinned");

    // The pin directory lies in a hostPath mount of the node's /sys/fs/bpf.
    let mount = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| run.args.pin_dir.starts_with(m["mountPath"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("no volume mount holds --pin-dir {}", run.args.pin_dir.display()));
    assert_eq!(mount["mountPath"], "/sys/fs/bpf");
    assert_ne!(mount["readOnly"], true, "the agent pins into it");
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    assert_eq!(volume["hostPath"]["path"], "/sys/fs/bpf", "the node's bpffs, so the next pod adopts the pins");

    let rolling = &ds["spec"]["updateStrategy"];
    assert_eq!(rolling["type"], "RollingUpdate");
    assert_eq!(rolling["rollingUpdate"]["maxSurge"], 0, "two agents cannot share one pin directory");
    assert_eq!(rolling["rollingUpdate"]["maxUnavailable"], 1, "one node at a time");
    assert!(ds["spec"]["minReadySeconds"].as_u64().unwrap_or(0) > 0, "a new pod proves itself before the next node");

    // Nothing on the way out removes the shield, and there is time to stop the servers.
    let pre_stop = &agent["lifecycle"]["preStop"];
    assert!(pre_stop.is_object(), "a preStop hook");
    assert!(!pre_stop.to_string().contains("detach"), "preStop must not detach: {pre_stop}");
    let pause = pre_stop["sleep"]["seconds"].as_u64().unwrap_or(0);
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    let drain = limiter_agent::rls::RlsConfig::default().drain_timeout.as_secs();
    assert!(grace > pause + drain, "grace {grace}s leaves no time after a {pause}s preStop and the {drain}s drain");
}

/// The manifest runs the image `cargo xtask image` builds: tagged with this crate's version,
/// with the capabilities tests/tests/image.rs starts it with, never privileged.
#[test]
fn daemonset_runs_this_versions_image_unprivileged() {
    let docs = documents();
    let agent = &of_kind(&docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(agent["image"], format!("limiter-agent:{}", env!("CARGO_PKG_VERSION")));
    let security = &agent["securityContext"];
    assert_ne!(security["privileged"], true);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let caps: Vec<&str> =
        security["capabilities"]["add"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert!(caps.contains(&"BPF") && caps.contains(&"NET_ADMIN"), "{caps:?}");
    assert!(!caps.contains(&"SYS_ADMIN"), "CAP_BPF and CAP_NET_ADMIN cover loading and attaching: {caps:?}");
    // Default seccomp profiles refuse bpf() without CAP_SYS_ADMIN.
    assert_eq!(security["seccompProfile"]["type"], "Unconfined");
}
