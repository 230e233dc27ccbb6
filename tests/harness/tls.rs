//! TLS for tests: a private CA whose certificates the `openssl` CLI issues, and a TLS terminator
//! (tokio-rustls) on a free port of 127.0.0.1 that pipes each connection to a plain TCP server,
//! e.g. the harness's ClickHouse HTTP port, so that the relay reaches it over https; or, in
//! front of a PostgreSQL server with TLS, a man in the middle of its TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::util::TempDir;

/// Whether the `openssl` command is there (tests that need it skip, saying so, when it is not).
pub fn openssl_available() -> bool {
    Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A certificate authority of the test's own, in a directory removed on drop.
pub struct TestCa {
    dir: TempDir,
    count: std::cell::Cell<u32>,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA (P-256, valid for two days).
    pub fn new() -> Result<TestCa> {
        let dir = TempDir::new("test_ca")?;
        openssl(
            &dir.0,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=outbox-relay test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )?;
        Ok(TestCa {
            dir,
            count: std::cell::Cell::new(0),
        })
    }

    /// The CA's certificate (PEM): what `clickhouse_ca_file` points at.
    pub fn cert(&self) -> PathBuf {
        self.dir.0.join("ca.pem")
    }

    /// Issues a certificate for `names` (`DNS:localhost`, `IP:127.0.0.1`, ...), good for server
    /// and client authentication.
    pub fn issue(&self, names: &[&str]) -> Result<Issued> {
        let n = self.count.get() + 1;
        self.count.set(n);
        let (key, csr, cert, ext) = (
            format!("{n}.key"),
            format!("{n}.csr"),
            format!("{n}.pem"),
            format!("{n}.ext"),
        );
        let cn = names
            .first()
            .and_then(|n| n.split_once(':'))
            .map_or("test", |(_, v)| v);
        std::fs::write(
            self.dir.0.join(&ext),
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth,clientAuth\n",
                names.join(",")
            ),
        )?;
        openssl(
            &self.dir.0,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={cn}"),
            ],
        )?;
        openssl(
            &self.dir.0,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        )?;
        Ok(Issued {
            cert: self.dir.0.join(cert),
            key: self.dir.0.join(key),
        })
    }
}

/// Accepts TLS on 127.0.0.1 and pipes each connection to `upstream`; stops when dropped.
pub struct TlsTerminator {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsTerminator {
    /// Serves `server` (certificate and key); with `client_ca`, requires client certificates
    /// that CA signed.
    pub fn start(
        server: &Issued,
        client_ca: Option<&Path>,
        upstream: SocketAddr,
    ) -> Result<TlsTerminator> {
        let acceptor = acceptor(server, client_ca)?;
        serve(move |tcp| {
            let acceptor = acceptor.clone();
            async move {
                // A failed handshake is the client's to report.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            }
        })
    }

    /// A man in the middle of PostgreSQL's TLS: answers a client's SSLRequest itself and
    /// terminates its TLS with `own` (a certificate of its own), then opens TLS to `upstream`
    /// (SSLRequest, a handshake verifying the server against `upstream_ca` as `localhost`) and
    /// pipes the two. Everything inside TLS, a SCRAM exchange included, passes unchanged: only
    /// channel binding can tell.
    pub fn postgres_in_the_middle(
        own: &Issued,
        upstream: SocketAddr,
        upstream_ca: &Path,
    ) -> Result<TlsTerminator> {
        let acceptor = acceptor(own, None)?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(upstream_ca)? {
            roots.add(cert?)?;
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        serve(move |mut tcp| {
            let (acceptor, connector) = (acceptor.clone(), connector.clone());
            async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut request = [0u8; 8];
                if tcp.read_exact(&mut request).await.is_err() || request != SSL_REQUEST {
                    return;
                }
                let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let mut answer = [0u8; 1];
                if up.write_all(&SSL_REQUEST).await.is_err()
                    || up.read_exact(&mut answer).await.is_err()
                    || answer != *b"S"
                    || tcp.write_all(b"S").await.is_err()
                {
                    return;
                }
                let Ok(mut client_side) = acceptor.accept(tcp).await else {
                    return;
                };
                let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
                let Ok(mut server_side) = connector.connect(name, up).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut client_side, &mut server_side).await;
            }
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 4, 210, 22, 47];

/// A TLS acceptor serving `server`; with `client_ca`, requiring client certificates it signed.
fn acceptor(server: &Issued, client_ca: Option<&Path>) -> Result<tokio_rustls::TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(&server.cert)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{}: {e}", server.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&server.key)
        .map_err(|e| anyhow!("{}: {e}", server.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)? {
                roots.add(cert?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections on a free port of 127.0.0.1 in a thread of its own, each handled by
/// `handle` on a task, until the returned terminator is dropped.
fn serve<F, Fut>(handle: F) -> Result<TlsTerminator>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        runtime.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            loop {
                let tcp = tokio::select! {
                    _ = &mut stopped => return,
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                };
                tokio::spawn(handle(tcp));
            }
        })
    });
    Ok(TlsTerminator {
        port,
        stop: Some(stop),
        thread: Some(thread),
    })
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
