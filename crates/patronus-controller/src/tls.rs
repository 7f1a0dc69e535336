//! The TLS client configuration Patronus uses wherever it calls out over `https://` (the
//! controller's webhooks, the CLI and the edges): rustls on the ring provider, trusting the
//! Mozilla roots compiled in (`webpki-roots`: nothing is fetched) and, if given, the CA
//! certificates of a PEM file.

use std::path::Path;
use std::sync::Arc;

/// The client configuration; `ca_file` adds its certificates to the roots. A file that cannot
/// be read or holds no certificate is an error (named after `what`, the setting that gave
/// it), never a silent fallback to the built-in roots alone.
pub fn client_config(
    ca_file: Option<&Path>,
    what: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let err = |e: &dyn std::fmt::Display| format!("{what} {}: {e}", path.display());
        let mut added = 0;
        for c in CertificateDer::pem_file_iter(path).map_err(|e| err(&e))? {
            roots.add(c.map_err(|e| err(&e))?).map_err(|e| err(&e))?;
            added += 1;
        }
        if added == 0 {
            return Err(err(&"holds no PEM certificate"));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(tls))
}
