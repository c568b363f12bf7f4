//! TLS on both sides and the connection-level protections, end to end and in process on loopback:
//! inbound HTTPS (handshake, ALPN, every key form, hot certificate swap), https upstreams (CA
//! bundle, untrusted, server name override, mTLS, insecure_skip_verify), the PROXY protocol
//! (v1, v2, malformed, with TLS) and the per-source connection limit. Every certificate is made
//! here with rcgen.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

// ---------------------------------------------------------------------------------------------
// Certificates

struct Ca {
    pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `names` (DNS names or IP addresses) with `key`; returns the chain PEM (leaf,
    /// then this CA) and the leaf's DER.
    fn leaf(
        &self,
        names: &[&str],
        key: &KeyPair,
        client: bool,
    ) -> (String, CertificateDer<'static>) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(key, &self.issuer).unwrap();
        (format!("{}{}", cert.pem(), self.pem), cert.der().clone())
    }
}

/// A server certificate for localhost/127.0.0.1 written to files.
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    leaf: CertificateDer<'static>,
}

fn write_leaf(
    dir: &Path,
    stem: &str,
    ca: &Ca,
    names: &[&str],
    key: &KeyPair,
    client: bool,
) -> CertFiles {
    let (chain, leaf) = ca.leaf(names, key, client);
    let cert = dir.join(format!("{stem}.crt"));
    let key_path = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, chain).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    CertFiles {
        cert,
        key: key_path,
        leaf,
    }
}

fn server_files(dir: &Path, ca: &Ca) -> CertFiles {
    write_leaf(
        dir,
        "server",
        ca,
        &["localhost", "127.0.0.1"],
        &KeyPair::generate().unwrap(),
        false,
    )
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(Path::new("tests/fixtures").join(name)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Gateway and clients

async fn start_yaml(yaml: &str, path: Option<&Path>) -> Gateway {
    let loaded = breakwater::prepare::from_yaml(yaml, Vec::new()).expect("test config is valid");
    let running = breakwater::gateway::start_from(loaded, path.map(Path::to_path_buf))
        .await
        .expect("gateway starts");
    Gateway {
        addr: running.addr,
        admin: running.admin_addr,
        running: Some(running),
    }
}

fn routes(upstream_url: &str, upstream_extra: &str) -> String {
    format!(
        r#"
upstreams:
  app:
    url: "{upstream_url}"
    pool: {{ max_connections: 4, min_idle: 0 }}
    circuit: {{ enabled: false }}
{upstream_extra}
routes:
  - name: all
    match: {{ path_prefix: / }}
    upstream: app
    budget: 5s
"#
    )
}

fn server_yaml(extra: &str) -> String {
    format!("server:\n  listen: 127.0.0.1:0\n  header_read_timeout: 2s\n{extra}admin:\n  listen: 127.0.0.1:0\n")
}

fn tls_yaml(files: &CertFiles, extra: &str) -> String {
    server_yaml(&format!(
        "  tls:\n    cert: {}\n    key: {}\n{extra}",
        files.cert.display(),
        files.key.display()
    ))
}

/// A TLS client connection trusting `ca`, offering `alpn`.
async fn tls_connect(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tls_over(tcp, ca, alpn).await.expect("handshake")
}

async fn tls_over<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    ca: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<S>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), io)
        .await
}

fn peer_leaf<S>(tls: &TlsStream<S>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

fn alpn<S>(tls: &TlsStream<S>) -> Option<Vec<u8>> {
    tls.get_ref().1.alpn_protocol().map(|p| p.to_vec())
}

/// An HTTP/1.1 client over an established connection.
async fn h1<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn h1_get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
) -> (StatusCode, http::HeaderMap, Bytes) {
    sender.ready().await.unwrap();
    let resp = sender
        .send_request(
            Request::get(path)
                .header("host", "localhost")
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

/// Raw HTTP/1.1 request with `Connection: close`; returns the whole answer, or "" when the
/// gateway closed the connection without one.
async fn raw_exchange<S: AsyncRead + AsyncWrite + Unpin>(mut io: S, prefix: &[u8]) -> String {
    let mut data = prefix.to_vec();
    data.extend_from_slice(b"GET /x HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    let _ = io.write_all(&data).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut out))
        .await
        .expect("the gateway answers or closes");
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Inbound TLS

#[tokio::test]
async fn https_listener_serves_http1_and_h2_by_alpn() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let files = server_files(dir.path(), &ca);
    let gw = start_yaml(&(tls_yaml(&files, "") + &routes(&backend.url(), "")), None).await;

    // HTTP/1.1 offered alone.
    let tls = tls_connect(gw.addr, &ca.der, &[b"http/1.1"]).await;
    assert_eq!(alpn(&tls).as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(peer_leaf(&tls), files.leaf);
    let version = tls.get_ref().1.protocol_version();
    assert!(matches!(
        version,
        Some(rustls::ProtocolVersion::TLSv1_3) | Some(rustls::ProtocolVersion::TLSv1_2)
    ));
    let mut c = h1(tls).await;
    let (status, _, body) = h1_get(&mut c, "/a").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    let seen = backend.last_request().1;
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");

    // h2 preferred when offered.
    let tls = tls_connect(gw.addr, &ca.der, &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn(&tls).as_deref(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("https://localhost/h2")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(backend.last_request().1["x-forwarded-proto"], "https");

    // No ALPN at all: HTTP/1.1.
    let tls = tls_connect(gw.addr, &ca.der, &[]).await;
    assert_eq!(alpn(&tls), None);
    let mut c = h1(tls).await;
    assert_eq!(h1_get(&mut c, "/none").await.0, StatusCode::OK);

    // Plain HTTP to the TLS port gets no answer.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let answer = raw_exchange(tcp, b"").await;
    assert!(!answer.contains("200"), "{answer}");
}

#[tokio::test]
async fn without_http2_alpn_offers_only_http1_and_tls12_still_works() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let files = server_files(dir.path(), &ca);
    let gw = start_yaml(
        &(tls_yaml(&files, "  http2: false\n") + &routes(&backend.url(), "")),
        None,
    )
    .await;
    let tls = tls_connect(gw.addr, &ca.der, &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn(&tls).as_deref(), Some(&b"http/1.1"[..]));

    // TLS 1.2 still works, forced from the client side.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let mut c = h1(tls).await;
    assert_eq!(h1_get(&mut c, "/").await.0, StatusCode::OK);
}

#[tokio::test]
async fn every_key_form_loads_and_handshakes() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let ecdsa_p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let rsa = KeyPair::from_pem(&fixture("rsa-pkcs8.key.pem")).unwrap();
    let ec = KeyPair::from_pem(&fixture("ec-pkcs8.key.pem")).unwrap();
    let cases: Vec<(&str, &KeyPair, Option<String>)> = vec![
        ("ed25519", &ed25519, None),
        ("ecdsa-p384", &ecdsa_p384, None),
        ("rsa-pkcs8", &rsa, None),
        ("rsa-pkcs1", &rsa, Some(fixture("rsa-pkcs1.key.pem"))),
        ("ec-sec1", &ec, Some(fixture("ec-sec1.key.pem"))),
    ];
    for (name, key, key_text) in cases {
        let files = write_leaf(dir.path(), name, &ca, &["localhost"], key, false);
        if let Some(text) = key_text {
            std::fs::write(&files.key, text).unwrap();
        }
        let gw = start_yaml(&(tls_yaml(&files, "") + &routes(&backend.url(), "")), None).await;
        let tls = tls_connect(gw.addr, &ca.der, &[b"http/1.1"]).await;
        assert_eq!(peer_leaf(&tls), files.leaf, "{name}");
        let mut c = h1(tls).await;
        assert_eq!(h1_get(&mut c, "/").await.0, StatusCode::OK, "{name}");
    }
}

#[tokio::test]
async fn certificate_is_swapped_without_dropping_connections() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let first = server_files(dir.path(), &ca);
    let yaml = tls_yaml(&first, "") + &routes(&backend.url(), "");
    let config_path = dir.path().join("breakwater.yaml");
    std::fs::write(&config_path, &yaml).unwrap();
    let gw = start_yaml(&yaml, Some(&config_path)).await;
    let shared = gw.running.as_ref().unwrap().shared.clone();

    let old_conn = tls_connect(gw.addr, &ca.der, &[b"http/1.1"]).await;
    assert_eq!(peer_leaf(&old_conn), first.leaf);
    let mut old = h1(old_conn).await;
    assert_eq!(h1_get(&mut old, "/1").await.0, StatusCode::OK);

    // Renewal: a new certificate and key written over the same files, then SIGHUP's reload.
    let second = server_files(dir.path(), &ca);
    assert_ne!(second.leaf, first.leaf);
    breakwater::reload::reload(shared.clone())
        .await
        .expect("reload accepts the renewed files");
    let new_conn = tls_connect(gw.addr, &ca.der, &[b"http/1.1"]).await;
    assert_eq!(
        peer_leaf(&new_conn),
        second.leaf,
        "new handshakes see the new certificate"
    );
    let mut new = h1(new_conn).await;
    assert_eq!(h1_get(&mut new, "/2").await.0, StatusCode::OK);
    assert_eq!(
        h1_get(&mut old, "/3").await.0,
        StatusCode::OK,
        "a connection made before the swap keeps working"
    );

    // A broken certificate is refused and the one in use stays.
    std::fs::write(&second.cert, "not a certificate").unwrap();
    assert!(breakwater::reload::reload(shared.clone()).await.is_err());
    let conn = tls_connect(gw.addr, &ca.der, &[b"http/1.1"]).await;
    assert_eq!(peer_leaf(&conn), second.leaf);
    // A key that does not match the certificate too.
    let third = server_files(dir.path(), &ca);
    std::fs::write(&third.key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    assert!(breakwater::reload::reload(shared.clone()).await.is_err());
    let conn = tls_connect(gw.addr, &ca.der, &[b"http/1.1"]).await;
    assert_eq!(peer_leaf(&conn), second.leaf);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("breakwater_tls_reloads_total{result=\"error\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("breakwater_tls_reloads_total{result=\"ok\"}"));

    // The file watcher picks up a good pair without any reload.
    let fourth = server_files(dir.path(), &ca);
    let deadline = tokio::time::Instant::now() + breakwater::tls::WATCH_INTERVAL * 3;
    loop {
        let conn = tls_connect(gw.addr, &ca.der, &[b"http/1.1"]).await;
        if peer_leaf(&conn) == fourth.leaf {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watcher did not load the changed files"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(h1_get(&mut old, "/4").await.0, StatusCode::OK);
}

#[tokio::test]
async fn slow_or_absent_handshake_is_cut_off() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let files = server_files(dir.path(), &ca);
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:0\n  header_read_timeout: 300ms\n  tls:\n    cert: {}\n    key: {}\nadmin:\n  enabled: false\n{}",
        files.cert.display(),
        files.key.display(),
        routes(&backend.url(), "")
    );
    let gw = start_yaml(&yaml, None).await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    let start = tokio::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf))
        .await
        .expect("closed by the gateway")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(start.elapsed() >= Duration::from_millis(250));
}

// ---------------------------------------------------------------------------------------------
// Upstream TLS

/// An HTTPS backend: answers 200 `secure` with `x-client-cert: yes|no`, optionally requiring a
/// client certificate signed by `client_ca`.
struct TlsBackend {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    handshakes_failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsBackend {
    async fn start(files: &CertFiles, client_ca: Option<&Ca>) -> TlsBackend {
        let chain: Vec<CertificateDer<'static>> =
            rustls::pki_types::pem::PemObject::pem_file_iter(&files.cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
        let key = rustls::pki_types::pem::PemObject::from_pem_file(&files.key).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.der.clone()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (r, f) = (requests.clone(), failed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, r, f) = (acceptor.clone(), r.clone(), f.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        f.fetch_add(1, Ordering::SeqCst);
                        return;
                    };
                    let client_cert = tls.get_ref().1.peer_certificates().is_some();
                    let svc = hyper::service::service_fn(move |_req| {
                        r.fetch_add(1, Ordering::SeqCst);
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("x-client-cert", if client_cert { "yes" } else { "no" })
                                    .body(Full::new(Bytes::from_static(b"secure")))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsBackend {
            addr,
            requests,
            handshakes_failed: failed,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

async fn plain_gateway(upstream_url: &str, upstream_extra: &str) -> Gateway {
    start_yaml(
        &(server_yaml("") + &routes(upstream_url, upstream_extra)),
        None,
    )
    .await
}

fn tls_block(lines: &[(&str, String)]) -> String {
    let mut s = "    tls:\n".to_string();
    for (k, v) in lines {
        s.push_str(&format!("      {k}: {v}\n"));
    }
    s
}

#[tokio::test]
async fn https_upstream_trusted_through_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("backend ca");
    std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
    let files = server_files(dir.path(), &ca);
    let backend = TlsBackend::start(&files, None).await;
    let gw = plain_gateway(
        &backend.url(),
        &tls_block(&[("ca_file", dir.path().join("ca.pem").display().to_string())]),
    )
    .await;
    let a = get(&client(), &gw.url("/x")).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(&a.body[..], b"secure");
    assert_eq!(a.header("x-client-cert"), Some("no"));
    // The pooled connection is reused.
    let a = get(&client(), &gw.url("/y")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(backend.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn untrusted_upstream_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("backend ca");
    let other = Ca::new("some other ca");
    std::fs::write(dir.path().join("other.pem"), &other.pem).unwrap();
    let files = server_files(dir.path(), &ca);
    let backend = TlsBackend::start(&files, None).await;

    // Against the public roots, and against a CA bundle that did not sign it.
    for extra in [
        String::new(),
        tls_block(&[(
            "ca_file",
            dir.path().join("other.pem").display().to_string(),
        )]),
    ] {
        let gw = plain_gateway(&backend.url(), &extra).await;
        let a = get(&client(), &gw.url("/x")).await;
        a.assert_refusal("upstream_unavailable");
    }
    assert_eq!(backend.requests.load(Ordering::SeqCst), 0);
    assert!(backend.handshakes_failed.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn server_name_overrides_the_verified_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("backend ca");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    // The certificate names neither 127.0.0.1 nor localhost.
    let files = write_leaf(
        dir.path(),
        "internal",
        &ca,
        &["backend.internal"],
        &KeyPair::generate().unwrap(),
        false,
    );
    let backend = TlsBackend::start(&files, None).await;
    let without = plain_gateway(
        &backend.url(),
        &tls_block(&[("ca_file", ca_file.display().to_string())]),
    )
    .await;
    get(&client(), &without.url("/"))
        .await
        .assert_refusal("upstream_unavailable");
    let with = plain_gateway(
        &backend.url(),
        &tls_block(&[
            ("ca_file", ca_file.display().to_string()),
            ("server_name", "backend.internal".into()),
        ]),
    )
    .await;
    assert_eq!(get(&client(), &with.url("/")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn client_certificate_for_mtls_upstreams() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("backend ca");
    let client_ca = Ca::new("client ca");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let files = server_files(dir.path(), &ca);
    let client_files = write_leaf(
        dir.path(),
        "client",
        &client_ca,
        &["breakwater"],
        &KeyPair::generate().unwrap(),
        true,
    );
    let backend = TlsBackend::start(&files, Some(&client_ca)).await;

    let gw = plain_gateway(
        &backend.url(),
        &tls_block(&[
            ("ca_file", ca_file.display().to_string()),
            ("client_cert", client_files.cert.display().to_string()),
            ("client_key", client_files.key.display().to_string()),
        ]),
    )
    .await;
    let a = get(&client(), &gw.url("/")).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    assert_eq!(a.header("x-client-cert"), Some("yes"));

    // Without the client certificate the backend refuses the connection: never a 200.
    let gw = plain_gateway(
        &backend.url(),
        &tls_block(&[("ca_file", ca_file.display().to_string())]),
    )
    .await;
    let a = get(&client(), &gw.url("/")).await;
    assert!(
        a.status == StatusCode::SERVICE_UNAVAILABLE || a.status == StatusCode::BAD_GATEWAY,
        "{} {:?}",
        a.status,
        a.body
    );
    assert_eq!(backend.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn insecure_skip_verify_connects_and_is_never_silent() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("backend ca");
    let files = server_files(dir.path(), &ca);
    let backend = TlsBackend::start(&files, None).await;
    let extra = tls_block(&[("insecure_skip_verify", "true".into())]);
    let gw = plain_gateway(&backend.url(), &extra).await;
    assert_eq!(get(&client(), &gw.url("/")).await.status, StatusCode::OK);

    let path = dir.path().join("insecure.yaml");
    std::fs::write(&path, routes(&backend.url(), &extra)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("WARNING") && stdout.contains("insecure_skip_verify"),
        "{stdout}"
    );
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol

fn v2_header(src: [u8; 4], sport: u16, tlvs: &[u8]) -> Vec<u8> {
    let mut body = src.to_vec();
    body.extend_from_slice(&[10, 0, 0, 1]);
    body.extend_from_slice(&sport.to_be_bytes());
    body.extend_from_slice(&443u16.to_be_bytes());
    body.extend_from_slice(tlvs);
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.push(0x21);
    out.push(0x11);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[tokio::test]
async fn proxy_protocol_names_the_client() {
    let backend = Backend::start().await;
    let gw = start_yaml(
        &(server_yaml("  proxy_protocol: true\n") + &routes(&backend.url(), "")),
        None,
    )
    .await;

    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let a = raw_exchange(tcp, b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 80\r\n").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert_eq!(backend.last_request().1["x-forwarded-for"], "203.0.113.9");

    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let a = raw_exchange(tcp, b"PROXY TCP6 2001:db8::5 2001:db8::1 5555 80\r\n").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert_eq!(backend.last_request().1["x-forwarded-for"], "2001:db8::5");

    // v2 with an AWS VPC endpoint TLV.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let a = raw_exchange(
        tcp,
        &v2_header([198, 51, 100, 7], 40000, &[0xEA, 0, 4, 1, b'v', b'p', b'c']),
    )
    .await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert_eq!(backend.last_request().1["x-forwarded-for"], "198.51.100.7");

    // UNKNOWN and LOCAL keep the TCP peer.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let a = raw_exchange(tcp, b"PROXY UNKNOWN\r\n").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert_eq!(backend.last_request().1["x-forwarded-for"], "127.0.0.1");
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let a = raw_exchange(tcp, &local).await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert_eq!(backend.last_request().1["x-forwarded-for"], "127.0.0.1");

    // Malformed or missing headers close the connection without an answer.
    let requests = backend.count(|s| &s.requests);
    for bad in [
        &b""[..],
        b"PROXY TCP4 203.0.113.9 10.0.0.1 5555\r\n",
        b"PROXY TCP4 nonsense 10.0.0.1 5555 80\r\n",
        b"PROXY TCP9 1.2.3.4 10.0.0.1 5555 80\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c",
    ] {
        let tcp = TcpStream::connect(gw.addr).await.unwrap();
        let a = raw_exchange(tcp, bad).await;
        assert_eq!(a, "", "{:?}", String::from_utf8_lossy(bad));
    }
    assert_eq!(backend.count(|s| &s.requests), requests);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("breakwater_connections_refused_total{reason=\"proxy_protocol\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn proxy_protocol_source_is_what_allow_cidrs_sees() {
    let backend = Backend::start().await;
    let yaml = server_yaml("  proxy_protocol: true\n")
        + &routes(&backend.url(), "")
        + "auth:\n  allow_cidrs: [\"203.0.113.0/24\"]\n";
    let gw = start_yaml(&yaml, None).await;
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let a = raw_exchange(tcp, b"PROXY TCP4 203.0.113.9 10.0.0.1 5555 80\r\n").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let a = raw_exchange(tcp, b"PROXY TCP4 198.51.100.1 10.0.0.1 5555 80\r\n").await;
    assert!(a.starts_with("HTTP/1.1 403"), "{a}");
}

#[tokio::test]
async fn proxy_protocol_before_tls() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let files = server_files(dir.path(), &ca);
    let gw = start_yaml(
        &(tls_yaml(&files, "  proxy_protocol: true\n") + &routes(&backend.url(), "")),
        None,
    )
    .await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(&v2_header([192, 0, 2, 44], 1234, &[]))
        .await
        .unwrap();
    let tls = tls_over(tcp, &ca.der, &[b"http/1.1"]).await.unwrap();
    let mut c = h1(tls).await;
    assert_eq!(h1_get(&mut c, "/").await.0, StatusCode::OK);
    let seen = backend.last_request().1;
    assert_eq!(seen["x-forwarded-for"], "192.0.2.44");
    assert_eq!(seen["x-forwarded-proto"], "https");

    // A TLS ClientHello where the header should be: closed.
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    assert!(tls_over(tcp, &ca.der, &[b"http/1.1"]).await.is_err());
}

// ---------------------------------------------------------------------------------------------
// Per-source connection limit

/// Opens a connection and completes one request on it (so the gateway has counted it), keeping
/// it open; `None` when the gateway closed it instead.
async fn open_conn(addr: SocketAddr, prefix: &[u8]) -> Option<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut data = prefix.to_vec();
    data.extend_from_slice(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n");
    tcp.write_all(&data).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("answered or closed")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if text.starts_with("HTTP/1.1 200") && text.ends_with("ok") {
            return Some(tcp);
        }
    }
}

#[tokio::test]
async fn connections_per_source_are_limited() {
    let backend = Backend::start().await;
    let gw = start_yaml(
        &(server_yaml("  max_connections_per_source: 2\n") + &routes(&backend.url(), "")),
        None,
    )
    .await;
    let a = open_conn(gw.addr, b"").await.expect("first");
    let _b = open_conn(gw.addr, b"").await.expect("second");
    assert!(
        open_conn(gw.addr, b"").await.is_none(),
        "third from the same source is closed"
    );
    drop(a);
    // The slot comes back once the gateway has seen the close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if open_conn(gw.addr, b"").await.is_some() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("breakwater_connections_refused_total{reason=\"per_source_limit\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn per_source_limit_counts_the_proxy_protocol_source() {
    let backend = Backend::start().await;
    let gw = start_yaml(
        &(server_yaml("  proxy_protocol: true\n  max_connections_per_source: 1\n")
            + &routes(&backend.url(), "")),
        None,
    )
    .await;
    let one: &[u8] = b"PROXY TCP4 203.0.113.1 10.0.0.1 1000 80\r\n";
    let two: &[u8] = b"PROXY TCP4 203.0.113.2 10.0.0.1 1000 80\r\n";
    let _a = open_conn(gw.addr, one).await.expect("first client");
    assert!(open_conn(gw.addr, one).await.is_none(), "same client again");
    let _b = open_conn(gw.addr, two)
        .await
        .expect("another client via the same balancer");
}
