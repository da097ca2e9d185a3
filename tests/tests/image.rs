//! The agent's container image (`cargo xtask image`) runs as deploy/daemonset.yaml runs it: the
//! test builds the image (cached when current), reads the DaemonSet's container spec (args,
//! env, capabilities, seccomp, read-only root, volume mounts) and starts the image with podman
//! exactly so, not privileged. "Host network" is a test namespace: podman is started inside it
//! (`nsenter --net`), so the container's host network holds the server end `s0` of a veth pair
//! and nothing of the machine's own. The node's bpffs is a bpffs mounted for this test, the
//! ConfigMap a scratch directory. A client namespace floods past a per-source limit: the agent
//! in the container drops what the policy says (counted, seen through `podman exec ...
//! limiter-agent top`, as `kubectl exec` would), and answers the gRPC health check of its rate
//! limit service on the port the DaemonSet's readiness probe checks.
//!
//! Then a rollout, as the kubelet does it: the pod is stopped (SIGTERM), the shield keeps
//! dropping while no pod runs, and the next pod adopts the pinned state (no fresh burst, the
//! counts go on). Last, `limiter-agent detach` from the image with the node's bpffs mounted
//! (README's node debug pod) removes the shield: no pin, no XDP, traffic passes. Containers are
//! removed (`podman rm -f`) even when the test fails.

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::{PinDir, TempDir},
    netns::{Netns, Topology},
    rawsock::{udp_count, udp_socket},
    require_root, require_tool,
};
use serde_json::Value;

const UDP_PORT: u16 = 9000;
/// The DaemonSet's interface variable, pointed at the test's veth.
const IFACE: &str = "s0";

const POLICY: &str = "apiVersion: limiter.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: image-test
spec:
  targetRefs:
    - {kind: Port, port: 9000, protocol: UDP}
  rateLimit:
    local:
      rules:
        - name: per-source
          clientSelectors: [{sourceCIDR: {type: Distinct, value: 0.0.0.0/0}}]
          count: Packets
          limit: {requests: 5, unit: Hour}
";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Podman as `cargo xtask image` runs it on this machine kind: runc and cgroupfs (TOOLCHAIN.md).
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

fn output(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

/// `cargo xtask image`: builds the static agent and the image, or finds both current. Returns
/// the tag it reports.
fn build_image() -> String {
    let out = output(Command::new(env!("CARGO")).current_dir(workspace()).args(["xtask", "image"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tag = stdout
        .lines()
        .find_map(|l| l.strip_prefix("image: built ")?.split_whitespace().next())
        .unwrap_or_else(|| panic!("`cargo xtask image` named no image:\n{stdout}"))
        .to_owned();
    eprintln!("{stdout}");
    tag
}

/// The DaemonSet's pod spec from deploy/daemonset.yaml.
fn daemonset_pod() -> Value {
    let text = std::fs::read_to_string(workspace().join("deploy/daemonset.yaml")).expect("deploy/daemonset.yaml");
    let docs: Vec<Value> =
        text.split("\n---\n").map(|doc| serde_saphyr::from_str(doc).expect("manifest document is YAML")).collect();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet in deploy/daemonset.yaml");
    ds["spec"]["template"]["spec"].clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// A container started by this test; `podman rm -f` on drop, with its log printed first.
struct Container(String);

impl Container {
    fn name() -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        format!("lt-image-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
    }

    fn logs(&self) -> String {
        let out = podman().args(["logs", &self.0]).output().expect("podman logs");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// `podman exec NAME limiter-agent ARGS`: what `kubectl exec` runs on a node.
    fn agent(&self, args: &[&str]) -> Output {
        podman().args(["exec", &self.0, "/usr/local/bin/limiter-agent"]).args(args).output().expect("podman exec")
    }

    /// Waits until the agent's log says it attached to the test's interface.
    fn wait_attached(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.logs().contains(&format!("attached to {IFACE}")) {
            assert!(Instant::now() < deadline, "the agent in {} did not attach to {IFACE} within 60s", self.0);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `podman stop`: SIGTERM, as the kubelet sends it once the preStop hook is done; the
    /// agent must exit cleanly.
    fn stop(&self) {
        output(podman().args(["stop", "--time", "15", &self.0]));
        let out = output(podman().args(["inspect", "--format", "{{.State.ExitCode}}", &self.0]));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "the agent's exit code after SIGTERM");
    }

    /// The rule's (passed, dropped) packets, once `done` holds for them or after 10 s.
    fn rule_counts(&self, done: impl Fn(u64, u64) -> bool) -> (u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.agent(&["top", "--once", "--json", "--interval", "500ms"]);
            assert!(out.status.success(), "top in the container: {}", String::from_utf8_lossy(&out.stderr));
            let json: Value = serde_json::from_slice(&out.stdout).expect("top --json prints JSON");
            assert_eq!(json["rules"][0]["name"], "image-test/per-source", "{json}");
            assert_eq!(json["interfaces"][0]["name"], IFACE, "{json}");
            assert_eq!(json["version"], env!("CARGO_PKG_VERSION"), "{json}");
            let rule = &json["rules"][0];
            let counts = (rule["passed_packets"].as_u64().unwrap(), rule["dropped_packets"].as_u64().unwrap());
            if done(counts.0, counts.1) || Instant::now() >= deadline {
                eprintln!("top --json: {json}");
                return counts;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        eprintln!("--- container {} log ---\n{}--- end ---", self.0, self.logs());
        match podman().args(["rm", "--force", "--time", "0", &self.0]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("podman rm -f {}: {}", self.0, String::from_utf8_lossy(&out.stderr)),
            Err(e) => eprintln!("podman rm -f {}: {e}", self.0),
        }
    }
}

/// Root here lacks CAP_SYS_RESOURCE, so podman cannot set its default rlimits (TOOLCHAIN.md):
/// these can be set. The process limit counts every process of root on the machine (the
/// container is not in a user namespace), so it is not TOOLCHAIN.md's 1024, which a busy
/// machine exceeds; 65536 cannot be set here.
const ULIMITS: [&str; 4] = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=16384:16384"];

/// `podman run -d` of `tag` as the DaemonSet's pod spec runs it, in `ns`'s network namespace.
/// Returns the container and the port its readiness probe checks.
fn run_as_daemonset(tag: &str, ns: &Netns, policies: &Path, run_dir: &Path, bpffs: &Path) -> (Container, u16) {
    let pod = daemonset_pod();
    assert_eq!(pod["hostNetwork"], true);
    let spec = &pod["containers"][0];

    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display())).arg("--").arg("podman");
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs", "run", "--detach", "--network", "host"]);
    let name = Container::name();
    cmd.args(["--name", &name]);
    cmd.args(ULIMITS);

    let security = &spec["securityContext"];
    assert_eq!(security["privileged"], Value::Null, "the DaemonSet is not privileged");
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let caps = strings(&security["capabilities"]["add"]);
    assert!(!caps.is_empty() && !caps.iter().any(|c| c == "SYS_ADMIN"), "capabilities {caps:?}");
    cmd.args(["--cap-drop", "ALL", "--cap-add", &caps.join(",")]);
    match security["seccompProfile"]["type"].as_str() {
        Some("Unconfined") => {
            cmd.args(["--security-opt", "seccomp=unconfined"]);
        }
        None | Some("RuntimeDefault") => {}
        Some(other) => panic!("seccompProfile {other}: the test does not know it"),
    }
    if security["readOnlyRootFilesystem"] == true {
        cmd.arg("--read-only");
    }

    // Environment: values as written, the node's address as loopback, the test's interface.
    let mut env: Vec<(String, String)> = Vec::new();
    for e in spec["env"].as_array().expect("env") {
        let name = e["name"].as_str().expect("env name").to_owned();
        let value = match (name.as_str(), e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            ("LIMITER_IFACE", _, _) => IFACE.to_owned(),
            (_, Some(v), _) => v.to_owned(),
            (_, None, Some("status.hostIP")) => "127.0.0.1".to_owned(),
            other => panic!("env {other:?}: the test does not know what to give it"),
        };
        env.push((name, value));
    }
    for (k, v) in &env {
        cmd.args(["--env", &format!("{k}={v}")]);
    }

    // Volumes: the ConfigMap, emptyDirs and the node's bpffs, each from the test.
    let volumes = pod["volumes"].as_array().expect("volumes");
    let mut mounted_bpffs = false;
    for mount in spec["volumeMounts"].as_array().expect("volumeMounts") {
        let volume = volumes.iter().find(|v| v["name"] == mount["name"]).expect("a volume for each mount");
        let source = if volume["configMap"].is_object() {
            policies.to_path_buf()
        } else if volume["emptyDir"].is_object() {
            run_dir.to_path_buf()
        } else if volume["hostPath"]["path"] == "/sys/fs/bpf" {
            mounted_bpffs = true;
            bpffs.to_path_buf()
        } else {
            panic!("volume {volume}: the test does not know what to mount for it")
        };
        let read_only = if mount["readOnly"] == true { ":ro" } else { "" };
        cmd.args(["--volume", &format!("{}:{}{read_only}", source.display(), mount["mountPath"].as_str().unwrap())]);
    }
    assert!(mounted_bpffs, "the DaemonSet mounts the node's /sys/fs/bpf");

    cmd.arg(tag);
    for arg in strings(&spec["args"]) {
        let mut arg = arg;
        for (k, v) in &env {
            arg = arg.replace(&format!("$({k})"), v);
        }
        cmd.arg(arg);
    }
    eprintln!("{cmd:?}");
    let out = cmd.output().expect("nsenter podman run");
    let container = Container(name);
    assert!(out.status.success(), "podman run failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    let port = spec["readinessProbe"]["grpc"]["port"].as_u64().expect("a gRPC readiness probe");
    (container, u16::try_from(port).unwrap())
}

/// grpc.health.v1 Check of the rate limit service on `127.0.0.1:port` in `ns`.
fn health(ns: &Netns, port: u16) -> Result<i32, String> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    ns.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(2));
            let channel = endpoint.connect().await.map_err(|e| format!("connect: {e}"))?;
            let service = "envoy.service.ratelimit.v3.RateLimitService".to_owned();
            let resp = HealthClient::new(channel)
                .check(HealthCheckRequest { service })
                .await
                .map_err(|e| format!("check: {e}"))?;
            Ok(resp.into_inner().status)
        })
    })
}

#[test]
fn the_image_runs_as_the_daemonset_says_enforces_and_answers_health_checks() {
    require_root();
    for tool in ["podman", "runc", "nsenter"] {
        require_tool(tool);
    }
    let tag = build_image();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(tag, format!("limiter-agent:{version}"), "tagged with the crate version");
    let image_in_manifest = daemonset_pod()["containers"][0]["image"].as_str().unwrap().to_owned();
    assert_eq!(image_in_manifest, tag, "the DaemonSet runs the image `cargo xtask image` builds");

    let topo = Topology::new("image", 1).unwrap();
    let policies = TempDir::with_files("image-policies", &[("shield.yaml", POLICY)]);
    let run_dir = TempDir::new("image-run");
    // The node's /sys/fs/bpf: a bpffs of this test's, unmounted (pins and all) on drop.
    let pins = PinDir::new("image");
    let bpffs = pins.path().parent().expect("the pin dir lies in its bpffs").to_path_buf();
    // Declared after the namespaces and the bpffs: the containers go first.
    let (first, rls_port) = run_as_daemonset(&tag, &topo.server, policies.root(), run_dir.root(), &bpffs);
    first.wait_attached();

    // The rate limit service answers the readiness probe's health check: SERVING.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        match health(&topo.server, rls_port) {
            Ok(status) => break status,
            Err(e) if Instant::now() < deadline => {
                eprintln!("health: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("no health answer on 127.0.0.1:{rls_port} within 20s: {e}"),
        }
    };
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // 5 datagrams an hour per source: of 50 from the client, 5 reach the server's socket.
    let c = topo.client(0);
    let server_addr = c.server.ipv4().unwrap();
    let receiver = udp_socket(&topo.server, (server_addr, UDP_PORT).into()).unwrap();
    let sender: UdpSocket = udp_socket(&c.ns, (c.client.ipv4().unwrap(), 0).into()).unwrap();
    let to: SocketAddr = (server_addr, UDP_PORT).into();
    let send = |n: usize| -> usize {
        for _ in 0..n {
            sender.send_to(b"limiter-image-test", to).unwrap();
        }
        udp_count(&receiver, Instant::now() + Duration::from_secs(2), |p| p == b"limiter-image-test").unwrap()
    };
    assert_eq!(send(50), 5, "the per-source limit lets 5 of 50 through");
    // The agent counts what it dropped; `kubectl exec ... limiter-agent top` shows it.
    assert_eq!(first.rule_counts(|_, d| d == 45), (5, 45));

    // Rollout: the pod stops; the pinned shield keeps dropping with no pod on the node.
    first.stop();
    assert!(pins.entries().iter().any(|e| e.starts_with("link-")), "pins after the pod stopped: {:?}", pins.entries());
    assert_eq!(send(10), 0, "no pod runs, the shield still holds the limit");

    // The next pod adopts the pinned state: no fresh burst, and the counts go on.
    let (second, _) = run_as_daemonset(&tag, &topo.server, policies.root(), run_dir.root(), &bpffs);
    second.wait_attached();
    assert_eq!(send(10), 0, "the new pod starts with the old buckets, not a fresh burst");
    assert_eq!(second.rule_counts(|_, d| d == 65), (5, 65), "counters carried over from the old pod");
    second.stop();
    drop(second);
    drop(first);

    // Removing the shield from the node: `limiter-agent detach` from the image with the node's
    // bpffs mounted, as from a node debug pod.
    let out = podman()
        .args(["run", "--rm", "--network", "none", "--cap-drop", "ALL", "--cap-add", "BPF,NET_ADMIN,PERFMON"])
        .args(["--security-opt", "seccomp=unconfined"])
        .args(ULIMITS)
        .arg("--volume")
        .arg(format!("{}:/sys/fs/bpf", bpffs.display()))
        .args([&tag, "detach", "--pin-dir", "/sys/fs/bpf/limiter"])
        .output()
        .expect("podman run detach");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "detach in a container failed: {said}");
    assert!(said.contains("detached s0"), "{said}");
    assert!(pins.entries().is_empty(), "pins left after detach: {:?}", pins.entries());
    let link = topo.server.ip(&["link", "show", IFACE]).unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"), "XDP still on {IFACE}");
    assert_eq!(send(10), 10, "no shield: everything passes");
}
