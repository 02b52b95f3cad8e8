//! Mutual TLS for the QUIC fabric: a per-job certificate authority and per-rank certificates.
//!
//! The controller generates a [`JobCa`] when the job starts and issues each rank a
//! [`RankIdentity`]: a certificate for the DNS name `rank-<r>.flotilla` signed by the job CA, its
//! key, and the CA certificate. Both sides of a connection present their certificate and verify
//! the other's chains to the job CA (TLS 1.3 only, ring crypto), so a peer of another job or
//! without a certificate is refused during the handshake. The dialler also checks that the
//! listener's certificate names the rank it dialled (TLS server-name verification); the listener
//! checks that the dialler's certificate names the rank its hello claims
//! ([`cert_names_rank`]).

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;

use super::QuicError;
use crate::fabric::Rank;

/// ALPN protocol id of the fabric.
pub const ALPN: &[u8] = b"flotilla-fabric/1";

/// The DNS name in the certificate of `rank`.
pub fn rank_name(rank: Rank) -> String {
    format!("rank-{rank}.flotilla")
}

/// A per-job certificate authority (its key never leaves the controller).
pub struct JobCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for JobCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobCa").finish_non_exhaustive()
    }
}

fn cert_err(e: rcgen::Error) -> QuicError {
    QuicError::Cert(e.to_string())
}

impl JobCa {
    /// A fresh CA with a new ECDSA P-256 key.
    pub fn generate() -> Result<Self, QuicError> {
        Self::with_key(KeyPair::generate().map_err(cert_err)?)
    }

    /// The CA whose PKCS#8 key is `key_der` (as [`Self::key_der`] wrote it): the issuer of the
    /// certificates of a job's processes, which all read it from the job directory.
    pub fn from_key_der(key_der: &[u8]) -> Result<Self, QuicError> {
        Self::with_key(KeyPair::try_from(key_der).map_err(cert_err)?)
    }

    /// The CA's key as PKCS#8 DER (secret: keep it in a directory only the job's user reads).
    pub fn key_der(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    /// The CA certificate of `key`. The same key gives a certificate with the same subject and
    /// key, so a CA rebuilt from its key issues certificates that chain to any of its copies.
    fn with_key(key: KeyPair) -> Result<Self, QuicError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "flotilla job CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate (DER), which every rank trusts.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// Issue the certificate and key of `rank`.
    pub fn issue(&self, rank: Rank) -> Result<RankIdentity, QuicError> {
        let (cert, key) = self.issue_cert(&rank_name(rank))?;
        Ok(RankIdentity {
            rank,
            cert,
            key,
            ca: self.cert_der(),
        })
    }

    /// Issue a certificate for the DNS name `name` (a control-plane peer: the controller, an
    /// agent, a rank process).
    pub fn issue_named(&self, name: &str) -> Result<NamedIdentity, QuicError> {
        let (cert, key) = self.issue_cert(name)?;
        Ok(NamedIdentity {
            name: name.to_owned(),
            cert,
            key,
            ca: self.cert_der(),
        })
    }

    fn issue_cert(
        &self,
        name: &str,
    ) -> Result<(CertificateDer<'static>, PrivatePkcs8KeyDer<'static>), QuicError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let name = name.to_owned();
        let mut params = CertificateParams::new(vec![name.clone()]).map_err(cert_err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(cert_err)?;
        Ok((
            cert.der().clone(),
            PrivatePkcs8KeyDer::from(key.serialize_der()),
        ))
    }
}

/// A certificate for a DNS name, its key, and the job CA to trust (the control plane's peers).
pub struct NamedIdentity {
    pub name: String,
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub ca: CertificateDer<'static>,
}

impl std::fmt::Debug for NamedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedIdentity")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl NamedIdentity {
    /// The QUIC server side for protocol `alpn`: present our certificate, require one from the
    /// job CA.
    pub fn server_config(
        &self,
        alpn: &[u8],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, QuicError> {
        server_config(&self.cert, &self.key, &self.ca, alpn, transport)
    }

    /// The QUIC client side for protocol `alpn`: trust only the job CA, present our certificate.
    pub fn client_config(
        &self,
        alpn: &[u8],
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, QuicError> {
        client_config(&self.cert, &self.key, &self.ca, alpn, transport)
    }
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, QuicError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(tls_err)?;
    Ok(Arc::new(roots))
}

/// Mutual TLS 1.3, server side: `cert` and `key` presented, a client certificate from `ca`
/// required.
fn server_config(
    cert: &CertificateDer<'static>,
    key: &PrivatePkcs8KeyDer<'static>,
    ca: &CertificateDer<'static>,
    alpn: &[u8],
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, QuicError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider.clone())
        .build()
        .map_err(tls_err)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert.clone()], PrivateKeyDer::Pkcs8(key.clone_key()))
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// Mutual TLS 1.3, client side: only `ca` trusted, `cert` and `key` presented.
fn client_config(
    cert: &CertificateDer<'static>,
    key: &PrivatePkcs8KeyDer<'static>,
    ca: &CertificateDer<'static>,
    alpn: &[u8],
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, QuicError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(vec![cert.clone()], PrivateKeyDer::Pkcs8(key.clone_key()))
        .map_err(tls_err)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(tls_err)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// What one rank needs to join the mesh: its certificate and key, and the job CA to trust.
pub struct RankIdentity {
    pub rank: Rank,
    pub cert: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub ca: CertificateDer<'static>,
}

impl Clone for RankIdentity {
    fn clone(&self) -> Self {
        Self {
            rank: self.rank,
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

impl std::fmt::Debug for RankIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankIdentity")
            .field("rank", &self.rank)
            .finish_non_exhaustive()
    }
}

fn tls_err(e: impl std::fmt::Display) -> QuicError {
    QuicError::Tls(e.to_string())
}

impl RankIdentity {
    /// The identity as bytes, to ship to the process that runs the rank: the rank (u32 LE),
    /// then the certificate, key and CA certificate, each as a u32 LE length and DER.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = (self.rank as u32).to_le_bytes().to_vec();
        for der in [
            self.cert.as_ref(),
            self.key.secret_pkcs8_der(),
            self.ca.as_ref(),
        ] {
            out.extend_from_slice(&(der.len() as u32).to_le_bytes());
            out.extend_from_slice(der);
        }
        out
    }

    /// Parse [`Self::to_bytes`]; any malformed input is an error.
    pub fn from_bytes(b: &[u8]) -> Result<Self, QuicError> {
        let bad = |what: &str| QuicError::Cert(format!("malformed rank identity: {what}"));
        let mut rest = b;
        let u32_next = |rest: &mut &[u8]| -> Result<u32, QuicError> {
            let (n, tail) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| bad("truncated"))?;
            *rest = tail;
            Ok(u32::from_le_bytes(*n))
        };
        let rank = u32_next(&mut rest)? as Rank;
        let mut ders = Vec::with_capacity(3);
        for _ in 0..3 {
            let n = u32_next(&mut rest)? as usize;
            if rest.len() < n {
                return Err(bad("truncated"));
            }
            let (der, tail) = rest.split_at(n);
            ders.push(der.to_vec());
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let ca = ders.pop().ok_or_else(|| bad("no CA"))?;
        let key = ders.pop().ok_or_else(|| bad("no key"))?;
        let cert = ders.pop().ok_or_else(|| bad("no certificate"))?;
        Ok(Self {
            rank,
            cert: CertificateDer::from(cert),
            key: PrivatePkcs8KeyDer::from(key),
            ca: CertificateDer::from(ca),
        })
    }

    /// The QUIC server side: present our certificate, require one from the job CA.
    pub(crate) fn server_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ServerConfig, QuicError> {
        server_config(&self.cert, &self.key, &self.ca, ALPN, transport)
    }

    /// The QUIC client side: trust only the job CA, present our certificate.
    pub(crate) fn client_config(
        &self,
        transport: Arc<quinn::TransportConfig>,
    ) -> Result<quinn::ClientConfig, QuicError> {
        client_config(&self.cert, &self.key, &self.ca, ALPN, transport)
    }
}

/// Whether a (verified) certificate carries the DNS subject-alternative name of `rank`.
///
/// The certificate has already been verified against the job CA, so only the job's controller
/// could have put the name there; we look for the DER encoding of the dNSName entry
/// (context tag `[2]`, short length, the name), which cannot match a longer name such as
/// `rank-12.flotilla` for rank 2.
pub fn cert_names_rank(der: &[u8], rank: Rank) -> bool {
    cert_names(der, &rank_name(rank))
}

/// Whether a (verified) certificate carries the DNS subject-alternative name `name` exactly
/// (see [`cert_names_rank`]).
pub fn cert_names(der: &[u8], name: &str) -> bool {
    let Ok(len) = u8::try_from(name.len()) else {
        return false;
    };
    if len >= 0x80 {
        return false;
    }
    let mut needle = vec![0x82, len];
    needle.extend_from_slice(name.as_bytes());
    der.windows(needle.len()).any(|w| w == needle.as_slice())
}

/// The leaf certificate the peer of `conn` presented, if any.
pub fn peer_cert(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let id = conn.peer_identity()?;
    let chain = id.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_name_their_rank_only() {
        let ca = JobCa::generate().expect("ca");
        let id = ca.issue(2).expect("issue");
        assert!(cert_names_rank(&id.cert, 2));
        assert!(!cert_names_rank(&id.cert, 12));
        assert!(!cert_names_rank(&id.cert, 1));
        let id12 = ca.issue(12).expect("issue");
        assert!(!cert_names_rank(&id12.cert, 2));
    }

    #[test]
    fn identities_round_trip_as_bytes_and_refuse_garbage() {
        let ca = JobCa::generate().expect("ca");
        let id = ca.issue(5).expect("issue");
        let b = id.to_bytes();
        let back = RankIdentity::from_bytes(&b).expect("parse");
        assert_eq!(back.rank, 5);
        assert_eq!(back.to_bytes(), b);
        for cut in [0, 3, 10, b.len() - 1] {
            assert!(RankIdentity::from_bytes(&b[..cut]).is_err(), "cut {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(RankIdentity::from_bytes(&long).is_err());
    }
}
