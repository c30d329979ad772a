//! PEM files for rustls: CA bundles, certificate chains and private keys named in the config.
//! One loader for every TLS user (probes, the relay's STARTTLS, the mirror channel), so each
//! reports a bad file the same way: with its path.
use std::{path::Path, sync::Arc};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

/// A PEM file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PemError {
    pub path: String,
    pub message: String,
}

fn pem_error(path: &Path, message: impl ToString) -> PemError {
    PemError { path: path.display().to_string(), message: message.to_string() }
}

/// The certificates of a CA bundle, as trust anchors.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, PemError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| pem_error(path, e))? {
        roots.add(cert.map_err(|e| pem_error(path, e))?).map_err(|e| pem_error(path, e))?;
    }
    if roots.is_empty() {
        return Err(pem_error(path, "no certificate in the file"));
    }
    Ok(roots)
}

/// A certificate chain (leaf first).
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if chain.is_empty() {
        return Err(pem_error(path, "no certificate in the file"));
    }
    Ok(chain)
}

/// A private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, e))
}

/// Which clients of a TLS server show a certificate, verified against a CA bundle.
#[derive(Debug, Clone, Copy)]
pub enum ClientCerts<'a> {
    /// None is asked for (the proxy, the relay without a client CA).
    Ignored,
    /// Verified when shown; clients without one are still served (the relay's STARTTLS, where a
    /// certificate lets a client relay).
    Optional(&'a Path),
    /// Every client must show one (the mirror channel).
    Required(&'a Path),
}

/// A server config for the certificate chain `cert` and key `key`. The one builder for every
/// TLS server in mxlb, so each uses the same provider and protocol versions, and an unusable
/// file is named in the error.
pub fn server_config(cert: &Path, key: &Path, clients: ClientCerts<'_>) -> Result<Arc<rustls::ServerConfig>, PemError> {
    let chain = load_chain(cert)?;
    let key_der = load_key(key)?;
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| pem_error(cert, e))?;
    let builder = match clients {
        ClientCerts::Ignored => builder.with_no_client_auth(),
        ClientCerts::Optional(ca) | ClientCerts::Required(ca) => {
            let roots = Arc::new(load_roots(ca)?);
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider);
            let verifier = match clients {
                ClientCerts::Optional(_) => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| pem_error(ca, e))?)
        }
    };
    let config = builder.with_single_cert(chain, key_der).map_err(|e| pem_error(key, e))?;
    Ok(Arc::new(config))
}

/// The crypto provider every mxlb TLS config uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = std::env::temp_dir().join(format!("mxlb-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a pem file\n").unwrap();
        let e = load_roots(&empty).unwrap_err();
        assert!(e.to_string().starts_with(&empty.display().to_string()), "{e}");
        assert!(load_chain(&empty).is_err());
        assert!(load_key(&empty).is_err());
        let missing = dir.join("missing.pem");
        assert!(load_roots(&missing).unwrap_err().path.ends_with("missing.pem"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
