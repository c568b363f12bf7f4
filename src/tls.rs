//! TLS on both sides, with rustls and its `ring` provider: TLS 1.2 and 1.3 only.
//!
//! Inbound, [`ServerTls`] holds the listener's certificate in an `ArcSwap` that every new
//! handshake reads, so a renewed certificate is picked up (on reload, or when the files change)
//! without a restart and without touching open connections. A certificate that does not load is
//! logged and counted, and the one in use stays.
//!
//! Outbound, [`ClientTls`] is an upstream's client configuration: the public (webpki) roots or a
//! CA bundle of its own, an optional client certificate, and ALPN `http/1.1` (the pool speaks
//! HTTP/1.1). Verification can only be turned off explicitly, and that is logged.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// How often the certificate files are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The crypto provider every TLS configuration here is built with. Named explicitly (rather than
/// the process default) so that another crate enabling a second provider cannot make the choice
/// ambiguous.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Which of the files a problem is about, so the config loader can name the right key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
    Ca,
}

/// A certificate, key or CA file that cannot be used. The message names the file, never its
/// content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    pub file: TlsFile,
    pub message: String,
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

fn problem(file: TlsFile, message: String) -> FileProblem {
    FileProblem { file, message }
}

fn read(file: TlsFile, path: &Path) -> Result<Vec<u8>, FileProblem> {
    std::fs::read(path)
        .map_err(|e| problem(file, format!("`{}`: cannot read ({e})", path.display())))
}

/// Every certificate in a PEM file, in order (the leaf first in a full chain).
pub fn read_certs(file: TlsFile, path: &Path) -> Result<Vec<CertificateDer<'static>>, FileProblem> {
    let bytes = read(file, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(file, format!("`{}`: not valid PEM ({e})", path.display())))?;
    if certs.is_empty() {
        return Err(problem(
            file,
            format!(
                "`{}`: no certificate in it (expected PEM `-----BEGIN CERTIFICATE-----` blocks)",
                path.display()
            ),
        ));
    }
    // A CA bundle (often the system's) may hold a few certificates webpki cannot use; they are
    // skipped when the trust store is built. A chain we present must be usable whole.
    if file == TlsFile::Ca {
        return Ok(certs);
    }
    for (i, c) in certs.iter().enumerate() {
        if let Err(e) = webpki_parse(c) {
            return Err(problem(
                file,
                format!(
                    "`{}`: certificate {} of {} is not a valid X.509 certificate ({e})",
                    path.display(),
                    i + 1,
                    certs.len()
                ),
            ));
        }
    }
    Ok(certs)
}

fn webpki_parse(c: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    rustls::server::ParsedCertificate::try_from(c).map(|_| ())
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, FileProblem> {
    let bytes = read(TlsFile::Key, path)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(k) => Ok(k),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => {
            let encrypted = String::from_utf8_lossy(&bytes).contains("ENCRYPTED PRIVATE KEY");
            Err(problem(
                TlsFile::Key,
                format!(
                    "`{}`: no private key in it ({})",
                    path.display(),
                    if encrypted {
                        "an encrypted key is not supported; store it unencrypted with tight file permissions"
                    } else {
                        "expected a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block"
                    }
                ),
            ))
        }
        Err(e) => Err(problem(
            TlsFile::Key,
            format!("`{}`: not valid PEM ({e})", path.display()),
        )),
    }
}

/// A certificate chain with its private key, checked to belong together. Problems with either
/// file are all reported.
fn certified_key(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Vec<FileProblem>> {
    let (chain, key_der) = match (read_certs(TlsFile::Cert, cert), read_key(key)) {
        (Ok(c), Ok(k)) => (c, k),
        (c, k) => return Err(c.err().into_iter().chain(k.err()).collect()),
    };
    let provider = provider();
    match rustls::sign::CertifiedKey::from_der(chain.clone(), key_der.clone_key(), &provider) {
        Ok(_) => Ok((chain, key_der)),
        Err(rustls::Error::InconsistentKeys(_)) => Err(vec![problem(
            TlsFile::Key,
            format!(
                "`{}`: does not match the certificate in `{}` (its first certificate must be the one this key signs for)",
                key.display(),
                cert.display()
            ),
        )]),
        Err(e) => Err(vec![problem(
            TlsFile::Key,
            format!("`{}`: unusable private key ({e})", key.display()),
        )]),
    }
}

/// Problems as one line, for logs.
pub fn join(problems: &[FileProblem]) -> String {
    problems
        .iter()
        .map(|p| p.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The configuration for `cert` and `key`, and the SHA-256 of the leaf certificate.
fn server_config(
    cert: &Path,
    key: &Path,
    http2: bool,
) -> Result<(rustls::ServerConfig, String), Vec<FileProblem>> {
    let (chain, key_der) = certified_key(cert, key)?;
    let fingerprint = sha256_hex(chain[0].as_ref());
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| vec![problem(TlsFile::Key, format!("`{}`: {e}", key.display()))])?;
    c.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok((c, fingerprint))
}

/// What the files looked like when last read: a change of either means reading them again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Vec<Option<(SystemTime, u64)>>);

impl Stamp {
    fn of(paths: &[&Path]) -> Stamp {
        Stamp(
            paths
                .iter()
                .map(|p| {
                    std::fs::metadata(p)
                        .ok()
                        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
                })
                .collect(),
        )
    }
}

/// The listener's certificate: the files it comes from and the configuration every new
/// handshake uses. Two are equal when they read the same files with the same ALPN; what the files
/// hold may change without a restart.
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    http2: bool,
    current: ArcSwap<rustls::ServerConfig>,
    /// SHA-256 of the certificate in use (its leaf), for logs.
    fingerprint: Mutex<String>,
    /// The files as they were at the last attempt to read them, successful or not.
    seen: Mutex<Stamp>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("http2", &self.http2)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        self.cert == other.cert && self.key == other.key && self.http2 == other.http2
    }
}

impl ServerTls {
    /// Reads and checks the certificate chain and key; ALPN offers `h2` only when `http2`.
    pub fn load(cert: &Path, key: &Path, http2: bool) -> Result<ServerTls, Vec<FileProblem>> {
        let seen = Stamp::of(&[cert, key]);
        let (config, fingerprint) = server_config(cert, key, http2)?;
        Ok(ServerTls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            http2,
            fingerprint: Mutex::new(fingerprint),
            current: ArcSwap::from_pointee(config),
            seen: Mutex::new(seen),
        })
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current.load_full()
    }

    /// SHA-256 (hex) of the certificate in use.
    pub fn fingerprint(&self) -> String {
        self.fingerprint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the files again and, if they load, uses them for every handshake from now on.
    /// Otherwise the certificate in use stays. Logged and counted in
    /// `breakwater_tls_reloads_total{result}` either way.
    pub fn reload(&self, trigger: &'static str) -> Result<(), String> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Stamp::of(&[&self.cert, &self.key]);
        match server_config(&self.cert, &self.key, self.http2) {
            Ok((config, fingerprint)) => {
                let before = std::mem::replace(
                    &mut *self.fingerprint.lock().unwrap_or_else(|p| p.into_inner()),
                    fingerprint.clone(),
                );
                self.current.store(Arc::new(config));
                metrics::counter!("breakwater_tls_reloads_total", "result" => "ok").increment(1);
                tracing::info!(
                    trigger,
                    cert = %self.cert.display(),
                    sha256 = %fingerprint,
                    changed = before != fingerprint,
                    "TLS certificate loaded"
                );
                Ok(())
            }
            Err(problems) => {
                let e = join(&problems);
                metrics::counter!("breakwater_tls_reloads_total", "result" => "error").increment(1);
                tracing::error!(
                    trigger,
                    problem = %e,
                    sha256 = %self.fingerprint(),
                    "TLS certificate not reloaded; keeping the one in use"
                );
                Err(e)
            }
        }
    }

    /// Reloads when either file changed (modification time or size) since it was last read.
    /// Returns whether it tried.
    pub fn reload_if_changed(&self) -> bool {
        let now = Stamp::of(&[&self.cert, &self.key]);
        let changed = *self.seen.lock().unwrap_or_else(|p| p.into_inner()) != now;
        if changed {
            let _ = self.reload("file change");
        }
        changed
    }

    /// Checks the files every `interval` until `shutdown` (or its sender goes away).
    pub async fn watch(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::listener::stopped(&mut shutdown) => return,
            }
            // Metadata and small files: cheap enough for the runtime, but kept off it anyway.
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
        }
    }
}

/// SHA-256 (hex) of a DER certificate.
pub fn sha256_hex(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An upstream's TLS client configuration, built when the configuration is loaded. Two are equal
/// when they were built from the same settings and the same file contents, so a reload that finds
/// a renewed CA bundle or client certificate opens new connections with it.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    digest: [u8; 32],
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl ClientTls {
    /// `ca`: a PEM bundle that replaces the public roots. `client`: a certificate chain and its
    /// key, presented when the upstream asks (mTLS). `insecure`: accept any certificate.
    pub fn build(
        ca: Option<&Path>,
        client: Option<(&Path, &Path)>,
        insecure: bool,
    ) -> Result<ClientTls, Vec<FileProblem>> {
        let mut problems = Vec::new();
        let mut digest = Sha256::new();
        digest.update([insecure as u8]);
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(VERSIONS)
            .expect("the ring provider supports TLS 1.2 and 1.3");
        let builder = if insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider.clone())))
        } else {
            let mut roots = rustls::RootCertStore::empty();
            match ca {
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
                Some(path) => match read_certs(TlsFile::Ca, path) {
                    Ok(certs) => {
                        for c in &certs {
                            digest.update(c.as_ref());
                        }
                        let (added, ignored) = roots.add_parsable_certificates(certs);
                        if added > 0 && ignored > 0 {
                            tracing::warn!(
                                ca_file = %path.display(),
                                ignored,
                                "some certificates in the CA bundle cannot be trust anchors; skipped"
                            );
                        }
                        if added == 0 {
                            problems.push(problem(
                                TlsFile::Ca,
                                format!(
                                    "`{}`: none of its {ignored} certificate(s) can be a trust anchor",
                                    path.display()
                                ),
                            ));
                        }
                    }
                    Err(e) => problems.push(e),
                },
            }
            builder.with_root_certificates(roots)
        };
        let config = match client {
            None => Some(builder.with_no_client_auth()),
            Some((cert, key)) => match certified_key(cert, key) {
                Ok((chain, key_der)) => {
                    for c in &chain {
                        digest.update(c.as_ref());
                    }
                    digest.update(key_der.secret_der());
                    match builder.with_client_auth_cert(chain, key_der) {
                        Ok(c) => Some(c),
                        Err(e) => {
                            problems
                                .push(problem(TlsFile::Key, format!("`{}`: {e}", key.display())));
                            None
                        }
                    }
                }
                Err(e) => {
                    problems.extend(e);
                    None
                }
            },
        };
        match config {
            Some(mut config) if problems.is_empty() => {
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                Ok(ClientTls {
                    config: Arc::new(config),
                    digest: digest.finalize().into(),
                })
            }
            _ => Err(problems),
        }
    }

    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }
}

/// `insecure_skip_verify: true`: any certificate is accepted. The handshake signatures are still
/// checked (so the session is at least bound to the certificate that was presented).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
