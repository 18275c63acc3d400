//! TLS on the TCP listeners, so that credentials need not cross a network in clear text when no
//! proxy stands in front: the certificate chain and key, read from PEM files at start and again
//! on reload (a renewed certificate), for the connections accepted after it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use anyhow::{Context, bail};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

pub struct Tls {
    certificate: PathBuf,
    key: PathBuf,
    acceptor: RwLock<TlsAcceptor>,
}

impl Tls {
    /// Reads the certificate chain and key; the error names the file and what is wrong.
    pub fn load(certificate: &Path, key: &Path) -> anyhow::Result<Tls> {
        let acceptor = acceptor(certificate, key)?;
        Ok(Tls {
            certificate: certificate.to_owned(),
            key: key.to_owned(),
            acceptor: RwLock::new(acceptor),
        })
    }

    /// Reads both files again and uses them for new connections; on an error the old ones stay.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = acceptor(&self.certificate, &self.key)?;
        *self
            .acceptor
            .write()
            .unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn describe(&self) -> String {
        format!("TLS with {}", self.certificate.display())
    }
}

fn acceptor(certificate: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
        .and_then(|certs| certs.collect())
        .with_context(|| {
            format!(
                "cannot read the TLS certificate {} (api.tls_certificate_file)",
                certificate.display()
            )
        })?;
    if chain.is_empty() {
        bail!(
            "no certificate in {} (api.tls_certificate_file): expected PEM `BEGIN CERTIFICATE` blocks",
            certificate.display()
        );
    }
    let private = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "cannot read the TLS private key {} (api.tls_key_file)",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .with_context(|| {
            format!(
                "the TLS certificate {} and key {} do not go together",
                certificate.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
