//! natgw as its users run it: installed with its chart, from its image,
//! on a real single-node Kubernetes (scripts/k8s/cluster), with real pods,
//! Multus networks and packets. `scripts/e2e` brings the cluster up and
//! runs this; a plain `cargo test` lists it as ignored.
//!
//! Environment: NATGW_E2E_KUBECONFIG (the cluster's admin), NATGW_E2E_TAG
//! and NATGW_E2E_TAG2 (two tags of the image scripts/image built, already
//! imported), NATGW_E2E_FIGURES (a file the measured times are appended to).

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use natgw_lab::traffic::{tcp_connect, tcp_server, tcp_source, udp_server, udp_source};
use serde_json::Value;

const NS: &str = "natgw-system";
const UPSTREAM: &str = "ngwc-upstream";
const UPSTREAM_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const EGRESS_SERVER_NS: &str = "ngwc-egress";
const EGRESS_SERVER: Ipv4Addr = Ipv4Addr::new(10, 198, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 100);
const FIP_EIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const VPC_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 10);
const VPC_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 11);

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run scripts/e2e"))
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .env("KUBECONFIG", env("NATGW_E2E_KUBECONFIG"))
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{program} {}: {}{}", args.join(" "), stdout, String::from_utf8_lossy(&out.stderr)))
    }
}

fn bin(name: &str) -> String {
    natgw_bin_dir().join(name).to_string_lossy().into_owned()
}

fn natgw_bin_dir() -> std::path::PathBuf {
    std::env::var_os("NATGW_K8S_BIN").map(Into::into).unwrap_or_else(|| "/var/cache/natgw/bin".into())
}

fn kubectl(args: &[&str]) -> String {
    run(&bin("kubectl"), args, None).unwrap_or_else(|e| panic!("{e}"))
}

fn apply(yaml: &str) {
    run(&bin("kubectl"), &["apply", "-f", "-"], Some(yaml)).unwrap_or_else(|e| panic!("{e}"));
}

fn get(args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&kubectl(&all)).expect("kubectl JSON")
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Polls `check` until it holds, for at most `secs`.
fn eventually(what: &str, secs: u64, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if check() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what}: not within {secs} s");
}

fn figure(line: &str) {
    println!("figure: {line}");
    if let Ok(path) = std::env::var("NATGW_E2E_FIGURES") {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("figures file");
        let _ = writeln!(f, "{line}");
    }
}

/// Waits until the controller's Lease is held by one of its current pods:
/// the restarted controller leads (a signal, not a sleep).
fn a_current_controller_leads() {
    eventually("a current controller pod holds the Lease", 60, || {
        let lease = get(&["-n", NS, "get", "lease", "natgw-controller"]);
        let Some(holder) = lease["spec"]["holderIdentity"].as_str().map(str::to_string) else { return false };
        let pods = get(&["-n", NS, "get", "pod", "-l", "app.kubernetes.io/name=natgw-controller"]);
        pods["items"].as_array().is_some_and(|ps| {
            ps.iter().any(|p| p["metadata"]["name"] == holder.as_str() && p["metadata"]["deletionTimestamp"].is_null())
        })
    });
}

fn condition(obj: &Value, type_: &str) -> Option<(String, String, String)> {
    obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_).map(|c| {
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
        (s("status"), s("reason"), s("message"))
    })
}

/// The network namespace (a name under /run/netns) of a running pod.
fn pod_netns(namespace: &str, pod: &str) -> String {
    let ip = get(&["-n", namespace, "get", "pod", pod])["status"]["podIP"].as_str().unwrap_or_default().to_string();
    assert!(!ip.is_empty(), "pod {namespace}/{pod} has no IP");
    for line in sh("ip netns list").lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with("cni-")
            && sh(&format!("ip -n {name} -4 -o addr show dev eth0")).contains(&format!(" {ip}/"))
        {
            return name.to_string();
        }
    }
    panic!("no network namespace holds {ip} ({namespace}/{pod})");
}

fn helm(args: &[&str]) -> Result<String, String> {
    run(&bin("helm"), args, None)
}

fn install_args(tag: &str) -> Vec<&str> {
    vec![
        "natgw",
        "charts/natgw",
        "--namespace",
        NS,
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "clusterNetworks={10.244.0.0/16,10.96.0.0/16}",
        "--set",
        "egress.enabled=true",
        "--set",
        "egress.resync=5",
        "--set",
        "gateway.externalNetwork=natgw-system/ext",
        "--set",
        "controller.releaseAfter=30",
        "--wait",
        "--timeout",
        "120s",
        "--set",
        tag,
    ]
}

const NETWORK: &str = r#"
apiVersion: natgw.io/v1alpha1
kind: Vpc
metadata: {name: vpc1}
spec: {}
---
apiVersion: natgw.io/v1alpha1
kind: Subnet
metadata: {name: vpc1-net}
spec: {vpc: vpc1, cidr: 10.0.1.0/24, gateway: 10.0.1.254}
---
apiVersion: natgw.io/v1alpha1
kind: Subnet
metadata: {name: ext}
spec: {cidr: 198.51.100.0/24, gateway: 198.51.100.1, excludeIps: ["198.51.100.1..198.51.100.9"]}
---
apiVersion: natgw.io/v1alpha1
kind: NatGateway
metadata: {name: gw1}
spec: {vpc: vpc1, lanInterface: lan0, externalInterface: ext0, externalSubnet: ext, lanNetwork: natgw-system/vpc1, lanIp: 10.0.1.254}
---
apiVersion: natgw.io/v1alpha1
kind: Eip
metadata: {name: e-snat}
spec: {gateway: gw1}
---
apiVersion: natgw.io/v1alpha1
kind: Eip
metadata: {name: e-fip}
spec: {gateway: gw1, ip: 198.51.100.20}
---
apiVersion: natgw.io/v1alpha1
kind: Eip
metadata: {name: e-dnat}
spec: {gateway: gw1}
---
apiVersion: natgw.io/v1alpha1
kind: Eip
metadata: {name: e-churn}
spec: {gateway: gw1}
---
apiVersion: natgw.io/v1alpha1
kind: FloatingIp
metadata: {name: fip1}
spec: {eip: e-fip, internalIp: 10.0.1.10}
---
apiVersion: natgw.io/v1alpha1
kind: SnatRule
metadata: {name: snat1}
spec: {eip: e-snat, internalCidr: 10.0.1.0/24}
---
apiVersion: natgw.io/v1alpha1
kind: DnatRule
metadata: {name: web}
spec: {eip: e-dnat, protocol: tcp, externalPort: 80, internalIp: 10.0.1.11, internalPort: 8080}
---
apiVersion: natgw.io/v1alpha1
kind: DnatRule
metadata: {name: dns}
spec: {eip: e-dnat, protocol: udp, externalPort: 53, internalIp: 10.0.1.11, internalPort: 5353}
"#;

/// A VPC pod: its second interface on the VPC network with a fixed
/// address; the attachment routes the external subnet through the
/// gateway's LAN address.
fn vpc_pod(name: &str, ip: Ipv4Addr) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: vpc-test
  annotations:
    k8s.v1.cni.cncf.io/networks: '[{{"name": "vpc1-hosts", "namespace": "natgw-system", "interface": "net1", "ips": ["{ip}/24"]}}]'
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - {{name: c, image: "natgw.invalid/busybox:1", imagePullPolicy: Never, command: [sleep, "100000"]}}
"#
    )
}

fn ip_of(eip: &str) -> Ipv4Addr {
    let e = get(&["get", "eip", eip]);
    e["status"]["ip"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("Eip {eip} has no address: {e}"))
}

fn gateway_pod() -> String {
    "natgw-gw-gw1-0".into()
}

/// `natgw audit` inside the gateway pod, against the objects the API
/// server holds (allocated addresses written as spec.ip): exit 0 means the
/// pod's kernel holds exactly the plan, conntrack included.
/// The in-pod audit exactly as the README shows it: the pod reads its
/// gateway's objects from the API server itself.
fn audit_in_pod() -> Result<String, String> {
    let pod = gateway_pod();
    run(&bin("kubectl"), &["-n", NS, "exec", &pod, "--", "natgw", "audit"], None)
}

fn assert_audit_clean(when: &str) {
    let mut last = String::new();
    // The agent converges within a moment of a change.
    for _ in 0..50 {
        match audit_in_pod() {
            Ok(out) => {
                assert!(out.contains("converged"), "{when}: {out}");
                return;
            }
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{when}: the gateway pod's kernel differs from the plan:\n{last}");
}

fn gateway_ready() -> bool {
    let Ok(text) = run(&bin("kubectl"), &["-n", NS, "get", "statefulset", "natgw-gw-gw1", "-o", "json"], None) else {
        return false;
    };
    let sts: Value = serde_json::from_str(&text).unwrap_or_default();
    sts["status"]["readyReplicas"].as_i64() == Some(1)
        && condition(&get(&["get", "natgateway", "gw1"]), "WorkloadReady").is_some_and(|c| c.0 == "True")
}

#[test]
#[ignore = "needs the real cluster: scripts/e2e"]
fn natgw_on_a_real_cluster() {
    let tag = format!("image.tag={}", env("NATGW_E2E_TAG"));
    let tag2 = format!("image.tag={}", env("NATGW_E2E_TAG2"));
    std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).unwrap();

    // Install: the Deployment and the DaemonSet become ready.
    let started = Instant::now();
    let _ = helm(&["uninstall", "natgw", "-n", NS, "--wait"]);
    let mut args = vec!["install"];
    args.extend(install_args(&tag));
    helm(&args).unwrap_or_else(|e| panic!("{e}"));
    kubectl(&["-n", NS, "rollout", "status", "deployment/natgw-controller", "--timeout=60s"]);
    kubectl(&["-n", NS, "rollout", "status", "daemonset/natgw-node-agent", "--timeout=60s"]);
    let installed = started.elapsed();
    figure(&format!("helm install to ready: {:.1} s", installed.as_secs_f64()));

    // The network, the gateway and its rules.
    apply(NETWORK);
    eventually("the gateway pod ready with both networks", 120, gateway_ready);
    for e in ["e-snat", "e-fip", "e-dnat", "e-churn"] {
        eventually(&format!("Eip {e} ready"), 60, || {
            condition(&get(&["get", "eip", e]), "Ready").is_some_and(|c| c.0 == "True")
        });
    }
    // A gateway whose network is missing says so; nothing else changes.
    apply(
        "apiVersion: natgw.io/v1alpha1\nkind: NatGateway\nmetadata: {name: gw-missing}\n\
         spec: {vpc: vpc1, lanInterface: lan0, externalInterface: ext0, externalSubnet: ext, lanNetwork: natgw-system/nowhere}\n",
    );
    eventually("WorkloadReady=False naming the missing network", 60, || {
        condition(&get(&["get", "natgateway", "gw-missing"]), "WorkloadReady")
            .is_some_and(|c| c.0 == "False" && c.1 == "NetworkMissing" && c.2.contains("natgw-system/nowhere"))
    });
    kubectl(&["delete", "natgateway", "gw-missing", "--wait=true", "--timeout=30s"]);
    assert!(gateway_ready(), "the other gateway is untouched");

    let gw_ns = pod_netns(NS, &gateway_pod());
    let links = sh(&format!("ip -n {gw_ns} -4 -o addr"));
    assert!(links.contains("lan0") && links.contains("10.0.1.254/24"), "the LAN attachment: {links}");
    // ext0 carries no address: EIPs are local routes.
    let ext = sh(&format!("ip -n {gw_ns} -o link show ext0"));
    assert!(ext.contains("ext0"), "the external attachment: {ext}");

    kubectl(&["create", "namespace", "vpc-test"]);
    apply(&(vpc_pod("vpc-a", VPC_A) + "---" + &vpc_pod("vpc-b", VPC_B)));
    kubectl(&["-n", "vpc-test", "wait", "--for=condition=Ready", "pod/vpc-a", "pod/vpc-b", "--timeout=60s"]);
    let (a, b) = (pod_netns("vpc-test", "vpc-a"), pod_netns("vpc-test", "vpc-b"));

    // Traffic: out through SNAT and the floating IP, in through the
    // floating IP and both port forwards.
    let snat_eip = ip_of("e-snat");
    let dnat_eip = ip_of("e-dnat");
    let _tcp = tcp_server(UPSTREAM, UPSTREAM_IP, 9000).unwrap();
    let _udp = udp_server(UPSTREAM, UPSTREAM_IP, 9000).unwrap();
    let first_packet =
        eventually("SNAT from a VPC pod", 30, || tcp_source(&b, UPSTREAM_IP, 9000).ok() == Some(snat_eip));
    let _ = first_packet;
    figure(&format!("helm install to first translated packet: {:.1} s", started.elapsed().as_secs_f64()));
    assert_eq!(udp_source(&b, UPSTREAM_IP, 9000).unwrap(), snat_eip);
    assert_eq!(tcp_source(&a, UPSTREAM_IP, 9000).unwrap(), FIP_EIP, "the floating IP wins over SNAT");
    let _ssh = tcp_server(&a, VPC_A, 22).unwrap();
    assert_eq!(tcp_source(UPSTREAM, FIP_EIP, 22).unwrap(), UPSTREAM_IP);
    let _web = tcp_server(&b, VPC_B, 8080).unwrap();
    let _dns = udp_server(&b, VPC_B, 5353).unwrap();
    assert_eq!(tcp_source(UPSTREAM, dnat_eip, 80).unwrap(), UPSTREAM_IP);
    assert_eq!(udp_source(UPSTREAM, dnat_eip, 53).unwrap(), UPSTREAM_IP);
    assert_audit_clean("after install");
    // `natgw top` inside the gateway pod: the SNAT flows just made (UDP
    // entries live 30 s) show on their EIP, towards the upstream server.
    let top = kubectl(&["-n", NS, "exec", &gateway_pod(), "--", "natgw", "top", "--once"]);
    assert!(top.contains(&snat_eip.to_string()) && top.contains(&format!("{UPSTREAM_IP}:9000")), "{top}");
    // What `kubectl get eips` shows in its UsedBy column.
    eventually("usedBy on the Eips", 30, || {
        get(&["get", "eip", "e-fip"])["status"]["usedBy"] == "FloatingIp/fip1"
            && get(&["get", "eip", "e-dnat"])["status"]["usedBy"] == "DnatRule/dns, DnatRule/web"
    });

    // Report 1: deleting a SNAT rule removes its translation.
    kubectl(&["delete", "snatrule", "snat1", "--wait=true", "--timeout=30s"]);
    assert_audit_clean("SnatRule deleted");
    assert!(tcp_source(&b, UPSTREAM_IP, 9000).is_err(), "no SNAT, no way back");
    apply(NETWORK);
    eventually("SNAT back", 30, || tcp_source(&b, UPSTREAM_IP, 9000).ok() == Some(snat_eip));

    // Report 2: 100 floating IPs created and deleted without a pause.
    for i in 0..100 {
        let yaml = format!(
            "apiVersion: natgw.io/v1alpha1\nkind: FloatingIp\nmetadata: {{name: churn-{i}}}\nspec: {{eip: e-churn, internalIp: 10.0.1.50}}\n"
        );
        apply(&yaml);
        kubectl(&["delete", "floatingip", &format!("churn-{i}"), "--wait=false"]);
    }
    eventually("every churned FloatingIp gone", 120, || {
        get(&["get", "floatingips"])["items"]
            .as_array()
            .is_some_and(|l| l.iter().all(|f| f["metadata"]["name"] == "fip1"))
    });
    assert_audit_clean("100 FloatingIps created and deleted");

    // Report 3: an Eip's exact address leaves the gateway (EIPs are local
    // routes marked 110; one line per EIP, the address then a space).
    let churn = ip_of("e-churn");
    let eips = format!("ip -n {gw_ns} -4 -o route show table local proto 110 dev ext0");
    assert!(sh(&eips).contains(&format!("local {churn} ")));
    kubectl(&["delete", "eip", "e-churn", "--wait=true", "--timeout=30s"]);
    assert!(!sh(&eips).contains(&format!("local {churn} ")));
    assert_audit_clean("Eip deleted");

    // Report 4: a VPC with live subnets is not deleted, even while the
    // controller's pods are deleted and recreated.
    kubectl(&["delete", "vpc", "vpc1", "--wait=false"]);
    kubectl(&["-n", NS, "delete", "pod", "-l", "app.kubernetes.io/name=natgw-controller", "--wait=false"]);
    eventually("DeletionBlocked on the VPC", 60, || {
        condition(&get(&["get", "vpc", "vpc1"]), "DeletionBlocked").is_some_and(|c| c.0 == "True")
    });
    kubectl(&["-n", NS, "rollout", "status", "deployment/natgw-controller", "--timeout=60s"]);
    a_current_controller_leads();
    assert!(get(&["get", "vpc", "vpc1"])["metadata"]["deletionTimestamp"].is_string(), "the VPC waits");
    assert_eq!(tcp_source(&a, UPSTREAM_IP, 9000).unwrap(), FIP_EIP, "the gateway still serves");
    assert_audit_clean("VPC deletion blocked across a controller restart");

    // The gateway pod deleted: the StatefulSet recreates it, the agent
    // converges before the pod is ready, and traffic returns.
    // The old pod serves until it is gone; the outage runs from then
    // until traffic passes the new one.
    let (mut restored, mut outage) = (Vec::new(), Vec::new());
    // Between the old pod's end and the new one's creation kubectl prints
    // nothing (--ignore-not-found): no uid then.
    let uid = || {
        let text = kubectl(&["-n", NS, "get", "pod", &gateway_pod(), "--ignore-not-found", "-o", "json"]);
        serde_json::from_str::<Value>(&text).unwrap_or_default()["metadata"]["uid"].clone()
    };
    for _ in 0..5 {
        let old = uid();
        let deleted = Instant::now();
        kubectl(&["-n", NS, "delete", "pod", &gateway_pod(), "--wait=false"]);
        eventually("the old gateway pod gone", 120, || {
            let now = uid();
            !now.is_null() && now != old
        });
        let gone = Instant::now();
        eventually("traffic through the new gateway pod", 120, || {
            tcp_source(&a, UPSTREAM_IP, 9000).ok() == Some(FIP_EIP)
        });
        restored.push(deleted.elapsed());
        outage.push(gone.elapsed());
        eventually("the new gateway pod ready", 60, gateway_ready);
        // Ready means converged: the first audit after it is clean.
        let first = audit_in_pod().unwrap_or_else(|e| panic!("a ready gateway pod must hold its plan: {e}"));
        assert!(first.contains("converged"), "{first}");
    }
    restored.sort();
    outage.sort();
    let show = |v: &[Duration]| v.iter().map(|d| format!("{:.1}", d.as_secs_f64())).collect::<Vec<_>>().join(", ");
    figure(&format!(
        "gateway pod deleted to traffic restored: median {:.1} s (of 5: {}); old pod gone to traffic restored: median {:.1} s ({})",
        restored[2].as_secs_f64(),
        show(&restored),
        outage[2].as_secs_f64(),
        show(&outage)
    ));

    egress();

    // helm upgrade to a new image tag with rules in force: the gateway's
    // open session survives (its pod is not replaced), nothing leaks.
    let gw_ns = pod_netns(NS, &gateway_pod());
    let mut session = tcp_connect(&a, UPSTREAM_IP, 9000).unwrap();
    session.echo("before").unwrap();
    let gw_uid = get(&["-n", NS, "get", "pod", &gateway_pod()])["metadata"]["uid"].clone();
    let mut args = vec!["upgrade"];
    args.extend(install_args(&tag2));
    helm(&args).unwrap_or_else(|e| panic!("{e}"));
    kubectl(&["-n", NS, "rollout", "status", "deployment/natgw-controller", "--timeout=60s"]);
    kubectl(&["-n", NS, "rollout", "status", "daemonset/natgw-node-agent", "--timeout=60s"]);
    a_current_controller_leads();
    session.echo("after-the-upgrade").unwrap();
    assert_eq!(get(&["-n", NS, "get", "pod", &gateway_pod()])["metadata"]["uid"], gw_uid, "the gateway pod stays");
    assert_eq!(pod_netns(NS, &gateway_pod()), gw_ns);
    assert_audit_clean("after helm upgrade");

    // Clean up as an operator would: objects first (the gateway tears
    // down), then the chart. Nothing natgw made stays on the node.
    kubectl(&["delete", "namespace", "vpc-test", "--wait=false"]);
    kubectl(&["delete", "dnatrules,snatrules,floatingips", "--all", "--wait=true", "--timeout=60s"]);
    kubectl(&["delete", "eips", "--all", "--wait=true", "--timeout=60s"]);
    kubectl(&["delete", "natgateways,subnets,vpcs", "--all", "--wait=true", "--timeout=60s"]);
    eventually("the gateway StatefulSet gone", 60, || {
        run(&bin("kubectl"), &["-n", NS, "get", "statefulset", "natgw-gw-gw1"], None).is_err()
    });
    helm(&["uninstall", "natgw", "-n", NS, "--wait", "--timeout", "60s"]).unwrap_or_else(|e| panic!("{e}"));
    eventually("the node agent gone", 60, || {
        kubectl(&["-n", NS, "get", "pods", "-l", "app.kubernetes.io/name=natgw-node-agent", "-o", "name"])
            .trim()
            .is_empty()
    });
    let left = sh("nft list tables");
    assert!(!left.contains("natgw"), "a natgw table is left on the node: {left}");
    // What natgw marks as its own (protocol 110 on addresses, routes and
    // rules), read over netlink as the agents read it.
    let node = natgw_dataplane::Gateway::open(None).expect("the node's namespace");
    let k = node.snapshot().expect("kernel snapshot");
    let owned: Vec<_> = k.addresses.iter().filter(|(_, owned)| **owned).map(|(a, _)| a.addr).collect();
    assert!(owned.is_empty(), "addresses natgw marked are left: {owned:?}");
    assert!(k.locals.is_empty() && k.subnets.is_empty(), "EIP routes are left: {:?} {:?}", k.locals, k.subnets);
    assert!(
        k.routes.is_empty() && k.rules.is_empty(),
        "routes or rules natgw marked are left: {:?} {:?}",
        k.routes,
        k.rules
    );
    let flows = sh("conntrack -L 2>/dev/null");
    assert!(!flows.contains(&VIP.to_string()), "a flow translated to the VIP is left:\n{flows}");
}

/// Service egress with real pods, a real EndpointSlice controller and the
/// node agent from the DaemonSet.
fn egress() {
    // The VIP is on the node, as a load balancer's announcer would put it.
    sh(&format!("ip addr add {VIP}/32 dev ngwc-node"));
    kubectl(&["create", "namespace", "egress-test"]);
    apply(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: egress-test}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - {name: c, image: "natgw.invalid/busybox:1", imagePullPolicy: Never, command: [sleep, "100000"]}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: egress-test
  annotations: {natgw.io/egress: "true"}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{port: 80}]
"#,
    );
    kubectl(&["-n", "egress-test", "rollout", "status", "deployment/web", "--timeout=60s"]);
    // What a load-balancer controller does: the VIP in the Service status.
    let status = format!(r#"{{"status": {{"loadBalancer": {{"ingress": [{{"ip": "{VIP}"}}]}}}}}}"#);
    kubectl(&["-n", "egress-test", "patch", "service", "web", "--subresource=status", "--type=merge", "-p", &status]);
    let _server = tcp_server(EGRESS_SERVER_NS, EGRESS_SERVER, 9100).unwrap();
    let pods = || -> Vec<String> {
        get(&["-n", "egress-test", "get", "pods", "-l", "app=web", "--field-selector=status.phase=Running"])["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
            .collect()
    };
    let leaves_with = |pod: &str| tcp_source(&pod_netns("egress-test", pod), EGRESS_SERVER, 9100).ok();
    for pod in pods() {
        eventually(&format!("{pod} leaves with the VIP"), 60, || leaves_with(&pod) == Some(VIP));
    }
    // Scaled up: the new pod's translation follows its endpoint.
    kubectl(&["-n", "egress-test", "scale", "deployment/web", "--replicas=3"]);
    kubectl(&["-n", "egress-test", "rollout", "status", "deployment/web", "--timeout=60s"]);
    eventually("three pods", 30, || pods().len() == 3);
    for pod in pods() {
        eventually(&format!("{pod} leaves with the VIP"), 60, || leaves_with(&pod) == Some(VIP));
    }
    // The Service deleted: its pods leave with their own address again.
    kubectl(&["-n", "egress-test", "delete", "service", "web", "--wait=true"]);
    for pod in pods() {
        eventually(&format!("{pod} no longer translated"), 60, || leaves_with(&pod).is_some_and(|ip| ip != VIP));
    }
    kubectl(&["delete", "namespace", "egress-test", "--wait=false"]);
    sh(&format!("ip addr del {VIP}/32 dev ngwc-node"));
}
