//! A real control plane for tests: etcd and kube-apiserver on loopback
//! ports, TLS from a throw-away CA, RBAC on. Tests get an admin client and
//! clients acting as ServiceAccounts (client certificates whose user name is
//! `system:serviceaccount:NS:NAME`, which RBAC matches like a token).
//!
//! The binaries come from `scripts/k8s/build.sh` (cached under
//! `$NATGW_CACHE/bin`, default /var/cache/natgw/bin). Missing binaries are an
//! error with the command to run, never a skipped test.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DynamicObject, GroupVersionKind, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::Scope;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("{0} not found: run scripts/k8s/build.sh (it caches the binaries under $NATGW_CACHE/bin)")]
    Missing(PathBuf),
    #[error("test environment: {0}")]
    Io(#[from] std::io::Error),
    #[error("certificates: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("kube client: {0}")]
    Kube(String),
    #[error("{what} did not become ready in {secs} s; its log ends with:\n{log}")]
    NotReady { what: &'static str, secs: u64, log: String },
}

/// Where the cached control-plane binaries live.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("NATGW_K8S_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("NATGW_CACHE").map(PathBuf::from).unwrap_or_else(|| "/var/cache/natgw".into());
        cache.join("bin")
    })
}

/// A port free now, below the kernel's ephemeral range (32768 and up by
/// default): a port the kernel handed out for bind(0) can be taken as the
/// source port of any outgoing connection (etcd's clients included) before
/// the server binds it, which failed a test with "address already in use".
fn free_port() -> Result<u16, EnvError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 16);
    for _ in 0..1000 {
        let n = NEXT.fetch_add(0x9E37_79B9, Ordering::Relaxed).wrapping_add(seed);
        let port = 20_000 + (n % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A client certificate and key, PEM files in the environment's folder.
#[derive(Clone, Debug)]
pub struct Identity {
    pub user: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct TestEnv {
    dir: PathBuf,
    /// etcd, then kube-apiserver.
    children: Vec<Child>,
    etcd_url: String,
    api_port: u16,
    pub url: String,
    ca: PathBuf,
    ca_issuer: Issuer<'static, KeyPair>,
    admin: Identity,
}

impl TestEnv {
    /// Starts etcd and kube-apiserver and waits until the API answers.
    pub async fn start() -> Result<Self, EnvError> {
        let bin = bin_dir();
        for b in ["etcd", "kube-apiserver"] {
            if !bin.join(b).exists() {
                return Err(EnvError::Missing(bin.join(b)));
            }
        }
        let dir = std::env::temp_dir().join(format!("natgw-testenv-{}-{}", std::process::id(), free_port()?));
        std::fs::create_dir_all(&dir)?;
        let mut env = Self::with_pki(dir)?;
        let (etcd_port, peer_port, api_port) = (free_port()?, free_port()?, free_port()?);
        env.url = format!("https://127.0.0.1:{api_port}");
        let etcd_log = env.dir.join("etcd.log");
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        env.children.push(
            Command::new(bin.join("etcd"))
                .args(["--data-dir", &env.dir.join("etcd").to_string_lossy()])
                .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("default={peer_url}"), "--unsafe-no-fsync", "--log-level", "warn"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&etcd_log)?)
                .spawn()?,
        );
        env.etcd_url = etcd_url;
        env.api_port = api_port;
        let apiserver = env.spawn_apiserver()?;
        env.children.push(apiserver);
        env.write_kubeconfig()?;
        env.wait_ready().await?;
        Ok(env)
    }

    fn spawn_apiserver(&self) -> Result<Child, EnvError> {
        let bin = bin_dir();
        let d = |f: &str| self.dir.join(f).to_string_lossy().into_owned();
        let api_port = self.api_port;
        let api_log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("kube-apiserver.log"))?;
        Ok(Command::new(bin.join("kube-apiserver"))
            .arg(format!("--etcd-servers={}", self.etcd_url))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", &format!("--secure-port={api_port}")])
            .arg(format!("--tls-cert-file={}", d("apiserver.crt")))
            .arg(format!("--tls-private-key-file={}", d("apiserver.key")))
            .arg(format!("--client-ca-file={}", d("ca.crt")))
            .args(["--authorization-mode=RBAC", "--service-cluster-ip-range=10.0.0.0/16"])
            .arg(format!("--service-account-issuer=https://127.0.0.1:{api_port}"))
            .arg(format!("--service-account-key-file={}", d("sa.pub")))
            .arg(format!("--service-account-signing-key-file={}", d("sa.key")))
            .args(["--disable-admission-plugins=ServiceAccount", "--endpoint-reconciler-type=none"])
            // /debug/pprof, for a benchmark that asks where the API
            // server's CPU goes (natgw-cp-bench --api-profile).
            .arg(format!("--profiling={}", std::env::var_os("NATGW_APISERVER_PROFILING").is_some()))
            .stdout(Stdio::null())
            .stderr(api_log)
            .spawn()?)
    }

    /// Waits until the API server answers /readyz with ok.
    async fn wait_ready(&self) -> Result<(), EnvError> {
        let start = Instant::now();
        let client = self.admin().await?;
        loop {
            if client.apiserver_version().await.is_ok() {
                let ready: Result<String, _> = client.request_text(http_get("/readyz")).await;
                // And the namespace Events about cluster-scoped objects go
                // to: the API server creates it a moment after /readyz, and
                // an Event posted before was lost (a flake under load).
                let default: Result<String, _> = client.request_text(http_get("/api/v1/namespaces/default")).await;
                if ready.is_ok_and(|r| r.trim() == "ok") && default.is_ok() {
                    return Ok(());
                }
            }
            if start.elapsed() > Duration::from_secs(90) {
                return Err(EnvError::NotReady {
                    what: "kube-apiserver",
                    secs: 90,
                    log: tail(&self.dir.join("kube-apiserver.log")) + "\n" + &tail(&self.dir.join("etcd.log")),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Kills the API server and starts it again on the same port and
    /// etcd; returns once it is ready.
    pub async fn restart_apiserver(&mut self) -> Result<(), EnvError> {
        if let Some(old) = self.children.get_mut(1) {
            let _ = old.kill();
            let _ = old.wait();
        }
        let new = self.spawn_apiserver()?;
        match self.children.get_mut(1) {
            Some(slot) => *slot = new,
            None => self.children.push(new),
        }
        self.wait_ready().await
    }

    fn with_pki(dir: PathBuf) -> Result<Self, EnvError> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "natgw-test-ca");
        let ca_cert = ca.self_signed(&ca_key)?;
        std::fs::write(dir.join("ca.crt"), ca_cert.pem())?;
        let ca_issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate()?;
        let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
        server.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        server.subject_alt_names.push(SanType::IpAddress([10, 0, 0, 1].into()));
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        std::fs::write(dir.join("apiserver.crt"), server.signed_by(&server_key, &ca_issuer)?.pem())?;
        std::fs::write(dir.join("apiserver.key"), server_key.serialize_pem())?;

        let sa = KeyPair::generate()?;
        std::fs::write(dir.join("sa.key"), sa.serialize_pem())?;
        std::fs::write(dir.join("sa.pub"), sa.public_key_pem())?;

        let mut env = TestEnv {
            ca: dir.join("ca.crt"),
            dir,
            children: Vec::new(),
            etcd_url: String::new(),
            api_port: 0,
            url: String::new(),
            ca_issuer,
            admin: Identity { user: String::new(), cert: PathBuf::new(), key: PathBuf::new() },
        };
        env.admin = env.identity("natgw-test-admin", &["system:masters"])?;
        Ok(env)
    }

    /// A client certificate for `user` in `groups`.
    pub fn identity(&self, user: &str, groups: &[&str]) -> Result<Identity, EnvError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, user);
        for g in groups {
            p.distinguished_name.push(DnType::OrganizationName, *g);
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let file = user.replace([':', '/'], "_");
        let (cert, keyf) = (self.dir.join(format!("{file}.crt")), self.dir.join(format!("{file}.key")));
        std::fs::write(&cert, p.signed_by(&key, &self.ca_issuer)?.pem())?;
        std::fs::write(&keyf, key.serialize_pem())?;
        Ok(Identity { user: user.to_string(), cert, key: keyf })
    }

    /// The identity of ServiceAccount `ns/name`, as RBAC sees it: its user
    /// name and the group of its namespace's accounts, which natgw binds
    /// (a client certificate carries one group here: rcgen keeps one
    /// value per attribute; the API server adds system:authenticated).
    pub fn service_account(&self, ns: &str, name: &str) -> Result<Identity, EnvError> {
        let ns_group = format!("system:serviceaccounts:{ns}");
        self.identity(&format!("system:serviceaccount:{ns}:{name}"), &[&ns_group])
    }

    fn kubeconfig(&self, who: &Identity) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: user\ncurrent-context: test\n",
            self.url,
            self.ca.display(),
            who.cert.display(),
            who.key.display()
        )
    }

    /// Writes `kubeconfig` (admin) into the environment's folder, for
    /// poking at a failing test with kubectl.
    fn write_kubeconfig(&self) -> Result<(), EnvError> {
        std::fs::write(self.dir.join("kubeconfig"), self.kubeconfig(&self.admin))?;
        Ok(())
    }

    /// Writes a kubeconfig acting as `who` and returns its path, for a
    /// natgw process started beside the test.
    pub fn kubeconfig_file(&self, who: &Identity) -> Result<PathBuf, EnvError> {
        let path = self.dir.join(format!("{}.kubeconfig", who.user.replace([':', '/'], "_")));
        std::fs::write(&path, self.kubeconfig(who))?;
        Ok(path)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A client acting as `who`.
    pub async fn client(&self, who: &Identity) -> Result<Client, EnvError> {
        let kc = Kubeconfig::from_yaml(&self.kubeconfig(who)).map_err(|e| EnvError::Kube(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| EnvError::Kube(e.to_string()))?;
        Client::try_from(config).map_err(|e| EnvError::Kube(e.to_string()))
    }

    /// A client acting as `who` that reaches the API server at `server`
    /// (`https://127.0.0.1:PORT`: a proxy in front of it, say).
    pub async fn client_via(&self, who: &Identity, server: &str) -> Result<Client, EnvError> {
        let text = self.kubeconfig(who).replace(&format!("server: {}", self.url), &format!("server: {server}"));
        let kc = Kubeconfig::from_yaml(&text).map_err(|e| EnvError::Kube(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| EnvError::Kube(e.to_string()))?;
        Client::try_from(config).map_err(|e| EnvError::Kube(e.to_string()))
    }

    /// A cluster-admin client.
    pub async fn admin(&self) -> Result<Client, EnvError> {
        self.client(&self.admin).await
    }
}

/// Creates CRDs and waits until the API server serves them.
pub async fn install_crds(client: &Client, crds: &[CustomResourceDefinition]) -> Result<(), EnvError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds {
        api.create(&PostParams::default(), crd).await.map_err(|e| EnvError::Kube(e.to_string()))?;
    }
    for crd in crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let mut established = false;
        for _ in 0..200 {
            let c = api.get(&name).await.map_err(|e| EnvError::Kube(e.to_string()))?;
            let conditions = c.status.and_then(|s| s.conditions).unwrap_or_default();
            established = conditions.iter().any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !established {
            return Err(EnvError::Kube(format!("CRD {name} never became Established")));
        }
    }
    Ok(())
}

/// Creates every object of a multi-document YAML text (Namespaces,
/// ServiceAccounts, RBAC ...), as the admin would with `kubectl create -f`.
pub async fn apply_yaml(client: &Client, yaml: &str) -> Result<(), EnvError> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| EnvError::Kube(format!("YAML: {e}")))?;
    for doc in docs.into_iter().filter(|d| !d.is_null()) {
        let obj: DynamicObject = serde_json::from_value(doc).map_err(|e| EnvError::Kube(e.to_string()))?;
        let types = obj.types.clone().ok_or_else(|| EnvError::Kube("object without apiVersion/kind".into()))?;
        let gvk = GroupVersionKind::try_from(&types).map_err(|e| EnvError::Kube(e.to_string()))?;
        let (ar, caps) = kube::discovery::pinned_kind(client, &gvk).await.map_err(|e| EnvError::Kube(e.to_string()))?;
        let api: Api<DynamicObject> = match (&caps.scope, obj.metadata.namespace.as_deref()) {
            (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
            _ => Api::all_with(client.clone(), &ar),
        };
        api.create(&PostParams::default(), &obj)
            .await
            .map_err(|e| EnvError::Kube(format!("create {}: {e}", types.kind)))?;
    }
    Ok(())
}

/// The cluster networks the tests declare: apart from every VPC the tests
/// use (their API server's own service range is not used by natgw objects).
pub const TEST_CLUSTER_NETWORKS: &str = "10.96.0.0/12,10.244.0.0/16";

/// Admission policies take effect a moment after they are created: waits
/// until a request that the cluster-networks policy refuses is refused.
async fn wait_for_policies(admin: &Client) -> Result<(), EnvError> {
    natgw_kube_support::admission::wait_writable(admin, Duration::from_secs(10), Duration::from_millis(50))
        .await
        .map(drop)
        .map_err(|e| EnvError::Kube(e.to_string()))
}

/// The namespace natgw's ServiceAccounts live in (deploy/rbac.yaml).
pub const NATGW_NAMESPACE: &str = "natgw-system";

impl TestEnv {
    /// Installs natgw as a cluster admin would: the CRDs given, exactly
    /// the RBAC, roles and admission policies in deploy/, and the cluster
    /// networks ConfigMap with `TEST_CLUSTER_NETWORKS`.
    pub async fn install_natgw(&self, crds: &[CustomResourceDefinition]) -> Result<Client, EnvError> {
        let admin = self.admin().await?;
        install_crds(&admin, crds).await?;
        for file in ["rbac.yaml", "roles.yaml", "policy.yaml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy").join(file);
            apply_yaml(&admin, &std::fs::read_to_string(path)?).await?;
        }
        let networks = format!(
            "apiVersion: natgw.io/v1alpha1\nkind: ClusterNetworks\nmetadata: {{name: natgw}}\nspec: {{cidrs: [{TEST_CLUSTER_NETWORKS}]}}\n"
        );
        apply_yaml(&admin, &networks).await?;
        wait_for_policies(&admin).await?;
        Ok(admin)
    }

    /// A fresh client acting as one of natgw's ServiceAccounts (a new
    /// client per call, as a new process would have).
    pub async fn natgw_client(&self, service_account: &str) -> Result<Client, EnvError> {
        self.client(&self.service_account(NATGW_NAMESPACE, service_account)?).await
    }
}

/// A natgw object of `kind` built from its spec (tests and benchmarks).
pub fn natgw_object<K: serde::de::DeserializeOwned>(
    kind: &str,
    name: &str,
    spec: serde_json::Value,
) -> Result<K, EnvError> {
    let doc = serde_json::json!({ "apiVersion": "natgw.io/v1alpha1", "kind": kind, "metadata": { "name": name }, "spec": spec });
    serde_json::from_value(doc).map_err(|e| EnvError::Kube(e.to_string()))
}

/// A cluster-scoped object the tests create (every natgw kind).
pub trait ClusterObject:
    kube::Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::Serialize
    + serde::de::DeserializeOwned
{
}

impl<K> ClusterObject for K where
    K: kube::Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned
{
}

/// Creates natgw object `name` of kind K from its spec.
pub async fn create_spec<K: ClusterObject>(
    client: &Client,
    name: &str,
    spec: serde_json::Value,
) -> Result<(), EnvError> {
    let obj: K = natgw_object(&K::kind(&()), name, spec)?;
    create(client, &obj).await
}

/// Creates a cluster-scoped object.
pub async fn create<K: ClusterObject>(client: &Client, obj: &K) -> Result<(), EnvError> {
    Api::<K>::all(client.clone())
        .create(&PostParams::default(), obj)
        .await
        .map_err(|e| EnvError::Kube(e.to_string()))?;
    Ok(())
}

fn http_get(path: &str) -> http::Request<Vec<u8>> {
    let mut req = http::Request::new(Vec::new());
    *req.uri_mut() = path.parse().unwrap_or_default();
    req
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("NATGW_KEEP_TESTENV").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Polls `check` until it holds; panics naming `what` after 30 s. The one
/// way tests wait for the control plane.
pub async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
