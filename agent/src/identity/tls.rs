//! rustls configurations for HBONE, as hbone.md fixes them: TLS 1.3, AES-GCM suites, ALPN h2, no
//! SNI, no resumption; the server presents the destination workload's certificate and requires the
//! client's; both sides check the chain against the trust bundle; the client also checks that the
//! server is exactly the identity it meant to reach; the server that the client is in its own trust
//! domain.

use std::sync::Arc;

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, ring},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use super::{CertManager, IdentityError, SpiffeId, manager::Issued};

pub const ALPN_H2: &[u8] = b"h2";

/// ring, restricted to the suites and groups HBONE uses.
pub fn provider() -> CryptoProvider {
    let mut provider = ring::default_provider();
    provider.cipher_suites =
        vec![ring::cipher_suite::TLS13_AES_256_GCM_SHA384, ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    provider.kx_groups = vec![ring::kx_group::X25519, ring::kx_group::SECP256R1, ring::kx_group::SECP384R1];
    provider
}

/// The HBONE server side of one local workload.
pub fn server_config(
    certs: &Arc<CertManager>,
    identity: SpiffeId,
) -> Result<Arc<ServerConfig>, IdentityError> {
    let provider = certs.provider();
    let verifier = Arc::new(SameTrustDomainClient {
        certs: certs.clone(),
        trust_domain: identity.trust_domain().to_owned(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentCert { certs: certs.clone(), identity }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Checks client certificate chains against `roots` (EKU clientAuth).
pub(super) fn client_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, IdentityError> {
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| IdentityError::Tls(Error::General(e.to_string())))
}

/// The HBONE client side: the source's certificate `issued`, and a server that must be
/// `expected`, verified against the roots trusted now.
pub fn client_config(
    certs: &CertManager,
    issued: &Issued,
    expected: SpiffeId,
) -> Result<Arc<ClientConfig>, IdentityError> {
    let provider = certs.provider();
    let verifier =
        Arc::new(ExactServerIdentity { roots: certs.roots(), provider: provider.clone(), expected });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(FixedClientCert(issued.certified_key.clone())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The name rustls needs for a connection; an IP address, so no SNI is ever sent.
pub fn server_name(ip: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

/// The identity the peer's leaf certificate asserts (after the handshake verified it).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs.and_then(|c| c.first()).and_then(|leaf| SpiffeId::from_cert(leaf).ok())
}

#[derive(Debug)]
struct CurrentCert {
    certs: Arc<CertManager>,
    identity: SpiffeId,
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certs.current(&self.identity).map(|issued| issued.certified_key.clone())
    }
}

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Chain to the trust bundle in force (EKU clientAuth, via webpki), then the same trust domain.
#[derive(Debug)]
struct SameTrustDomainClient {
    certs: Arc<CertManager>,
    trust_domain: String,
}

impl ClientCertVerifier for SameTrustDomainClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: peers pick their one workload certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self.certs.client_verifier().verify_client_cert(end_entity, intermediates, now)?;
        let id = SpiffeId::from_cert(end_entity).map_err(|e| {
            Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
        })?;
        if id.trust_domain() != self.trust_domain {
            return Err(Error::General(format!(
                "client identity {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.certs.client_verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.certs.client_verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.certs.client_verifier().supported_verify_schemes()
    }
}

/// Chain to the trust bundle (EKU serverAuth), then exactly the expected SPIFFE identity; DNS/IP
/// names are not used in the mesh.
#[derive(Debug)]
struct ExactServerIdentity {
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<CryptoProvider>,
    expected: SpiffeId,
}

/// Prefix of the error a server with the wrong identity produces; logged and counted as such.
pub const IDENTITY_MISMATCH: &str = "identity verification error";

impl ServerCertVerifier for ExactServerIdentity {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match SpiffeId::from_cert(end_entity) {
            Ok(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(id) => {
                Err(Error::General(format!("{IDENTITY_MISMATCH}: expected {}, got {id}", self.expected)))
            }
            Err(e) => Err(Error::General(format!("{IDENTITY_MISMATCH}: {e}"))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
