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

/// A certificate's SHA-256 fingerprint as Patronus prints it: `sha256:` and 64 lowercase hex
/// digits, over the certificate's DER bytes (the same digest as
/// `openssl x509 -noout -fingerprint -sha256`, which prints it in upper case with colons).
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(der);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A fingerprint to pin, in Patronus's form (`sha256:…`) or openssl's (`AB:CD:…`, with or
/// without `SHA256 Fingerprint=` before it): 32 bytes of hex, in any case, colons allowed.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let t = s.trim();
    let t = t
        .strip_prefix("sha256 Fingerprint=")
        .or_else(|| t.strip_prefix("SHA256 Fingerprint="))
        .or_else(|| t.strip_prefix("sha256:"))
        .or_else(|| t.strip_prefix("SHA256:"))
        .unwrap_or(t);
    let hex: Vec<u8> = t.bytes().filter(|&b| b != b':').collect();
    let bad = || {
        format!(
            "{s:?} is not a SHA-256 certificate fingerprint (sha256: and 64 hex digits, as the \
             controller prints it at start)"
        )
    };
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// A client configuration that trusts exactly the certificates whose fingerprints are `pins`
/// (a controller's self-signed one, or those of several controllers over one database), as
/// SSH trusts a host key: no CA, no name, no validity dates. The server must still prove it
/// holds the certificate's private key (its handshake signature is checked with the pinned
/// certificate's public key), so the pin cannot be used by anyone who merely has the
/// certificate.
pub fn pinned_client_config(pins: Vec<[u8; 32]>) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned {
        pins,
        algorithms: provider.signature_verification_algorithms,
    });
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// The verifier of [`pinned_client_config`].
#[derive(Debug)]
struct Pinned {
    pins: Vec<[u8; 32]>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

/// The error a client gets from a controller whose certificate is not the pinned one.
#[derive(Debug)]
pub struct NotPinned {
    /// The fingerprint of the certificate the server showed.
    pub seen: String,
}

impl std::fmt::Display for NotPinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the controller's certificate has fingerprint {}, which is not the pinned one: \
             this is another server, or the controller's certificate was replaced (then pin \
             the new fingerprint it prints at start)",
            self.seen
        )
    }
}

impl std::error::Error for NotPinned {}

/// The [`NotPinned`] inside a failed TLS connection's error, if that is why it failed (rustls
/// shows it only in debug form).
pub fn not_pinned(e: &std::io::Error) -> Option<&NotPinned> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
            o.0.downcast_ref::<NotPinned>()
        }
        _ => None,
    }
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if self.pins.contains(&digest) {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(NotPinned {
                seen: fingerprint(end_entity.as_ref()),
            }))),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// When an X.509 certificate (DER) expires: its `notAfter`, Unix seconds; `None` if the bytes
/// are not a certificate this reads. A few lines of DER, not a parser crate: the path is
/// Certificate → tbsCertificate → (version, serial, signature, issuer) → validity → notAfter.
pub fn not_after(der: &[u8]) -> Option<i64> {
    /// One DER element at the start of `b`: (tag, contents, the rest after it).
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, b) = b.split_first()?;
        let (&first, mut b) = b.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || b.len() < n {
                return None;
            }
            let (l, rest) = b.split_at(n);
            b = rest;
            l.iter().fold(0usize, |a, &x| (a << 8) | usize::from(x))
        };
        (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
    }
    let (0x30, cert, _) = tlv(der)? else {
        return None;
    };
    let (0x30, mut tbs, _) = tlv(cert)? else {
        return None;
    };
    // The version, [0] EXPLICIT, is there for v2 and v3.
    if tbs.first() == Some(&0xa0) {
        tbs = tlv(tbs)?.2;
    }
    // serialNumber, signature, issuer.
    for _ in 0..3 {
        tbs = tlv(tbs)?.2;
    }
    let (0x30, validity, _) = tlv(tbs)? else {
        return None;
    };
    let (_, _, rest) = tlv(validity)?;
    let (tag, t, _) = tlv(rest)?;
    let t = std::str::from_utf8(t).ok()?.strip_suffix('Z')?;
    let (year, t) = match tag {
        // UTCTime, YYMMDDHHMMSS: 50..99 are the 1900s (RFC 5280).
        0x17 => {
            let yy: i64 = t.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, t.get(2..)?)
        }
        // GeneralizedTime, YYYYMMDDHHMMSS.
        0x18 => (t.get(..4)?.parse().ok()?, t.get(4..)?),
        _ => return None,
    };
    if t.len() != 10 || !t.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n = |i: usize| -> i64 { t[i..i + 2].parse().unwrap_or(0) };
    let (month, day, h, m, s) = (n(0), n(2), n(4), n(6), n(8));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm), proleptic Gregorian.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_certificates_expiry_is_read_from_its_der() {
        for (year, unix) in [
            (2036, 2_082_758_400),
            (2049, 2_493_072_000),
            (2051, 2_556_144_000),
        ] {
            let mut params = rcgen::CertificateParams::new(vec!["x.test".into()]).unwrap();
            params.not_after = rcgen::date_time_ymd(year, 1, 1);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            assert_eq!(super::not_after(cert.der()), Some(unix), "{year}");
        }
        assert_eq!(super::not_after(b"not a certificate"), None);
        assert_eq!(super::not_after(&[0x30, 0x82, 0xff]), None);
    }
}
